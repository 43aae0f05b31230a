"""Checkpoints: atomic writes, ``--resume auto`` after kill -9 (also mid-write), bit-identical weights."""
import errno
import math
from pathlib import Path

import pytest
import torch

from fastkd import cli
from fastkd.engine import checkpoint as ckpt
from fastkd.engine.metrics import read_metrics

# 10 steps per epoch, 2 epochs, a mid-epoch checkpoint every 4 steps (steps 4, 8, 12, 16) plus
# one at each epoch end; a teacher, so the concurrent-teacher bookkeeping is part of the state.
ARGS = ["train", "--data-backend", "synthetic", "--synthetic-samples", "320", "--synthetic-classes", "10",
        "--image-size", "12", "--batch-size", "32", "--student", "fastkd:resnet8", "--teacher", "fastkd:resnet8",
        "--method", "kd", "--random-teacher", "--epochs", "2", "--checkpoint-interval", "4", "--lr", "0.05", "--warmup-epochs", "0.5",
        "--device", "cpu", "--seed", "3", "--log-interval", "1", "--deterministic", "--threads", "1"]
TOTAL_STEPS = 20
# Runs ``fastkd`` with a fault-injection hook installed (kill at a step or in a checkpoint write).
KILL_RUN = str(Path(__file__).with_name("kill_run.py"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("ref") / "run"
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the subprocess runs use one thread (module fixtures run before one_thread)
    try:
        assert cli.main([*ARGS, "--output", str(out)]) == 0
    finally:
        torch.set_num_threads(before)
    return out


def _assert_same_run(out, ref):
    a, b = ckpt.load(out / "last.pt"), ckpt.load(ref / "last.pt")
    assert a["global_step"] == b["global_step"] == TOTAL_STEPS
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"weights differ in {k}"
    for pid, state in b["optimizer"]["state"].items():
        assert torch.equal(a["optimizer"]["state"][pid]["momentum_buffer"], state["momentum_buffer"])
    assert a["scheduler"] == b["scheduler"]
    # The metrics file of the resumed run holds each step exactly once, with the same losses.
    steps_a, steps_b = read_metrics(out / "metrics.jsonl", "step"), read_metrics(ref / "metrics.jsonl", "step")
    assert [s["global_step"] for s in steps_a] == list(range(1, TOTAL_STEPS + 1))
    assert [s["loss"] for s in steps_a] == [s["loss"] for s in steps_b]
    ep_a, ep_b = read_metrics(out / "metrics.jsonl", "epoch"), read_metrics(ref / "metrics.jsonl", "epoch")
    keys = ("epoch", "train_loss", "train_ce", "train_kd", "val_correct_top1", "val_correct_top5", "agreement",
            "kl", "train_samples")
    assert [[r[k] for k in keys] for r in ep_a] == [[r[k] for k in keys] for r in ep_b]


def test_kill_during_training_then_resume_gives_identical_weights(reference, tmp_path, run_fastkd):
    out = tmp_path / "run"
    proc = run_fastkd([*ARGS, "--output", out], module=(KILL_RUN, "step:7"))
    assert proc.returncode == -9, proc.stderr[-3000:]
    state = ckpt.load(out / "last.pt")
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (0, 4, 4)  # steps 5-7 are lost
    assert cli.main([*ARGS, "--output", str(out), "--resume", "auto"]) == 0
    _assert_same_run(out, reference)


def test_kill_during_a_checkpoint_write_then_resume(reference, tmp_path, run_fastkd):
    out = tmp_path / "run"
    # the 2nd save (after step 8) dies with half its bytes written
    proc = run_fastkd([*ARGS, "--output", out], module=(KILL_RUN, "save:2"))
    assert proc.returncode == -9, proc.stderr[-3000:]
    torn = list(out.glob(".last.pt.tmp.*"))
    assert len(torn) == 1
    with pytest.raises(Exception):
        torch.load(torn[0], weights_only=True)  # really torn
    assert ckpt.load(out / "last.pt")["global_step"] == 4  # the previous checkpoint is intact
    assert cli.main([*ARGS, "--output", str(out), "--resume", "auto"]) == 0
    assert not list(out.glob(".last.pt.tmp.*"))
    _assert_same_run(out, reference)


def test_resume_from_an_explicit_path_and_bad_paths(reference, tmp_path, caplog):
    # resuming the finished reference run from its file trains nothing more
    out = tmp_path / "again"
    assert cli.main([*ARGS, "--output", str(out), "--resume", str(reference / "last.pt")]) == 0
    assert not (out / "last.pt").exists()
    assert cli.main([*ARGS, "--output", str(out), "--resume", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in caplog.text and "does not exist" in caplog.text
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 100)
    assert cli.main([*ARGS, "--output", str(out), "--resume", str(tmp_path / "junk.pt")]) == 2
    assert "cannot be read" in caplog.text


def test_atomic_save_and_latest_checkpoint_selection(tmp_path):
    state = {"model": {"w": torch.ones(3)}, "epoch": 1, "global_step": 5}
    ckpt.save_atomic(state, tmp_path / "last.pt")
    ckpt.link_atomic(tmp_path / "last.pt", tmp_path / "best.pt")
    assert (tmp_path / "best.pt").stat().st_ino == (tmp_path / "last.pt").stat().st_ino  # a link, no rewrite
    ckpt.save_atomic({**state, "global_step": 9}, tmp_path / "last.pt")
    assert ckpt.load(tmp_path / "best.pt")["global_step"] == 5  # the link kept the old file
    path, found = ckpt.find_latest(tmp_path)
    assert path.name == "last.pt" and found["global_step"] == 9
    # a corrupt last.pt falls back to the next newest loadable file
    (tmp_path / "last.pt").write_bytes(b"garbage")
    path, found = ckpt.find_latest(tmp_path)
    assert path.name == "best.pt" and found["global_step"] == 5
    (tmp_path / ".last.pt.tmp.123").write_bytes(b"torn")
    assert [p.name for p in ckpt.remove_stale_temp_files(tmp_path)] == [".last.pt.tmp.123"]
    assert ckpt.find_latest(tmp_path / "empty") is None


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = ckpt.rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert math.isfinite(b[2])


def test_resume_with_more_epochs_follows_the_longer_schedule(tmp_path):
    # --epochs may change on resume; the extra epochs must not run on the old schedule's final LR
    # (0 for a cosine ending at the old last epoch) but on the schedule of the longer run.
    base = ["train", "--data-backend", "synthetic", "--synthetic-samples", "128", "--synthetic-classes", "10",
            "--image-size", "12", "--batch-size", "32", "--student", "fastkd:resnet8", "--method", "ce",
            "--lr", "0.1", "--device", "cpu", "--seed", "1", "--log-interval", "1"]
    out, ref = tmp_path / "extended", tmp_path / "ref"
    assert cli.main([*base, "--epochs", "1", "--output", str(out)]) == 0
    assert cli.main([*base, "--epochs", "3", "--output", str(out), "--resume", "auto"]) == 0
    assert cli.main([*base, "--epochs", "3", "--output", str(ref)]) == 0
    lrs = [r["lr"] for r in read_metrics(out / "metrics.jsonl", "step")]
    want = [r["lr"] for r in read_metrics(ref / "metrics.jsonl", "step")]
    assert len(lrs) == len(want) == 12 and lrs[4:] == pytest.approx(want[4:], rel=1e-12)
    assert min(lrs[4:-1]) > 0


def _flip_tensor_bytes(path, marker: torch.Tensor, n=8):
    """Flip ``n`` bytes inside the stored data of ``marker`` (a tensor with a unique byte pattern)."""
    data = bytearray(Path(path).read_bytes())
    at = data.find(marker.numpy().tobytes())
    assert at >= 0
    for i in range(at + 4, at + 4 + n):
        data[i] ^= 0xFF
    Path(path).write_bytes(bytes(data))


def test_checksum_catches_flipped_bytes_and_resume_moves_to_the_next_good_file(tmp_path, caplog):
    # issue 11 item 6: eight flipped bytes in last.pt used to resume silently with a corrupted weight
    marker = torch.arange(64, dtype=torch.float32) * 1.2345
    ckpt.save_atomic({"model": {"w": marker}, "epoch": 1, "global_step": 5}, tmp_path / "best.pt")
    ckpt.save_atomic({"model": {"w": marker + 1}, "epoch": 2, "global_step": 9}, tmp_path / "last.pt")
    assert isinstance(ckpt.load(tmp_path / "last.pt")["checksum"], str)
    _flip_tensor_bytes(tmp_path / "last.pt", marker + 1)
    raw = torch.load(tmp_path / "last.pt", weights_only=True)  # PyTorch itself reads it without complaint
    assert not torch.equal(raw["model"]["w"], marker + 1)
    with pytest.raises(ValueError, match="last.pt.*fails its checksum"):
        ckpt.load(tmp_path / "last.pt")
    with caplog.at_level("WARNING", logger="fastkd"):
        path, state = ckpt.find_latest(tmp_path)
    assert path.name == "best.pt" and state["global_step"] == 5
    assert "skipping checkpoint last.pt" in caplog.text and "fails its checksum" in caplog.text


def test_disk_full_during_a_checkpoint_write_is_named_and_leaves_no_temp_file(tmp_path, monkeypatch):
    # issue 11 item 11: PyTorch's own message was "unexpected pos ...", and the .tmp file stayed
    ckpt.save_atomic({"model": {"w": torch.ones(3)}, "epoch": 1}, tmp_path / "last.pt")

    def full_disk(obj, fh, *args, **kwargs):
        fh.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    with pytest.raises(OSError, match=r"no space left on device while writing .*last\.pt") as exc:
        ckpt.save_atomic({"model": {"w": torch.zeros(3)}, "epoch": 2}, tmp_path / "last.pt")
    assert exc.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # the temporary file is gone
    monkeypatch.undo()
    assert ckpt.load(tmp_path / "last.pt")["epoch"] == 1  # the previous checkpoint is intact


SMALL = ["train", "--data-backend", "synthetic", "--synthetic-samples", "64", "--synthetic-classes", "4",
         "--image-size", "8", "--batch-size", "32", "--student", "fastkd:resnet8", "--method", "ce", "--epochs", "1",
         "--lr", "0.1", "--device", "cpu", "--seed", "1"]


def test_the_only_checkpoint_unreadable_says_what_happened_and_what_to_do(tmp_path, caplog):
    # issue 11 item 12: the log said "starting from scratch", then refused: "already holds a run"
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(b"\x00" * 200)
    with caplog.at_level("INFO", logger="fastkd"):
        assert cli.main([*SMALL, "--output", str(out), "--resume", "auto"]) == 2
    assert "none can be used" in caplog.text and "last.pt" in caplog.text and "--resume PATH" in caplog.text
    assert "starting from scratch" not in caplog.text and "already holds a run" not in caplog.text


def _small_run(out):
    assert cli.main([*SMALL, "--output", str(out)]) == 0
    return ckpt.load(out / "last.pt")


def test_resume_refuses_another_student_before_loading(tmp_path, caplog):
    # issue 12 item 4: a warning, then a 29-line state_dict traceback
    out = tmp_path / "run"
    _small_run(out)
    args = [a if a != "fastkd:resnet8" else "fastkd:resnet20" for a in SMALL]
    with caplog.at_level("ERROR", logger="fastkd"):
        assert cli.main([*args, "--epochs", "2", "--output", str(out), "--resume", "auto"]) == 2
    assert "trained with --student 'fastkd:resnet8', this run asks for 'fastkd:resnet20'" in caplog.text
    assert "state_dict" not in caplog.text


def _as_if_written_by(state, world, steps_factor):
    """A checkpoint as ``world`` processes would have written it at the same epoch end: as many RNG and
    loader states, ``steps_factor`` x the steps, and the LR of that global batch (no --lr given)."""
    state = dict(state)
    state["world_size"] = world
    state["rng"], state["loader"] = state["rng"] * world, state["loader"] * world
    state["global_step"] = int(state["global_step"] * steps_factor)
    sched = dict(state["scheduler"])
    sched["last_epoch"] = state["global_step"]
    sched["base_lrs"] = [b * world for b in sched["base_lrs"]]
    state["scheduler"] = sched
    return state


def test_resume_with_another_world_size_continues_on_the_new_grid(tmp_path):
    # issue 11 item 7: the old step count with the new steps per epoch, and the old scaled LR
    args = [a for a in SMALL if a not in ("--lr", "0.1")] + ["--batch-size", "16", "--threads", "1"]
    ref, out = tmp_path / "ref", tmp_path / "run"
    assert cli.main([*args, "--epochs", "2", "--save-every", "1", "--output", str(ref)]) == 0
    out.mkdir()
    ckpt.save_atomic(_as_if_written_by(ckpt.load(ref / "epoch_1.pt"), 2, 0.5), out / "last.pt")
    assert cli.main([*args, "--epochs", "2", "--output", str(out), "--resume", "auto"]) == 0
    a, b = ckpt.load(out / "last.pt"), ckpt.load(ref / "last.pt")
    assert a["global_step"] == b["global_step"] == 8
    assert a["scheduler"]["base_lrs"] == b["scheduler"]["base_lrs"]
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    lrs = [r["lr"] for r in read_metrics(out / "metrics.jsonl", "step") if r["global_step"] > 4]
    assert lrs == [r["lr"] for r in read_metrics(ref / "metrics.jsonl", "step") if r["global_step"] > 4]


def test_resume_mid_epoch_with_another_world_size_is_refused(tmp_path, caplog):
    out = tmp_path / "run"
    state = _small_run(out)
    state = {**_as_if_written_by(state, 2, 0.5), "step_in_epoch": 1, "epoch": 0}
    ckpt.save_atomic(state, out / "last.pt")
    with caplog.at_level("ERROR", logger="fastkd"):
        assert cli.main([*SMALL, "--epochs", "2", "--output", str(out), "--resume", "auto"]) == 2
    assert "middle of an epoch by 2 process(es) and this run has 1" in caplog.text


def test_teacher_and_student_weights_from_a_damaged_checkpoint_are_refused(tmp_path):
    # the same checksum guards --teacher-checkpoint / --student-checkpoint / fastkd analyze
    from fastkd.models import create_model, load_weights

    torch.manual_seed(0)
    model = create_model("fastkd:resnet8", 4)
    ckpt.save_atomic({"model": model.state_dict(), "epoch": 1}, tmp_path / "t.pt")
    load_weights(create_model("fastkd:resnet8", 4), tmp_path / "t.pt")  # intact: loads
    marker = model.state_dict()["fc.weight"].flatten()[:8].contiguous()
    _flip_tensor_bytes(tmp_path / "t.pt", marker, n=2)
    with pytest.raises(ValueError, match="t.pt.*fails its checksum"):
        load_weights(create_model("fastkd:resnet8", 4), tmp_path / "t.pt")


def test_disk_full_while_linking_best_or_writing_the_config_leaves_no_temp_file(tmp_path, monkeypatch):
    from fastkd.engine import config as C

    ckpt.save_atomic({"model": {"w": torch.ones(3)}, "epoch": 1}, tmp_path / "last.pt")

    def no_link(src, dst):
        raise OSError(errno.EXDEV, "cross-device link")

    def full_copy(src, dst):
        Path(dst).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.os, "link", no_link)
    monkeypatch.setattr(ckpt.shutil, "copyfile", full_copy)
    with pytest.raises(OSError, match=r"no space left on device while writing .*best\.pt"):
        ckpt.link_atomic(tmp_path / "last.pt", tmp_path / "best.pt")
    monkeypatch.setattr(Path, "write_text", lambda self, text: (Path.write_bytes(self, b"x"),
                                                                 (_ for _ in ()).throw(OSError(errno.ENOSPC, "full"))))
    with pytest.raises(OSError):
        C.save_yaml(C.make_config(data="/d", student="fastkd:resnet8", method="ce"), tmp_path / "config.yaml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_resume_auto_picks_by_name_and_progress_not_file_times(tmp_path):
    # a copied run folder (cp -r) gets fresh modification times in copy order: best.pt may look newest
    import os

    ckpt.save_atomic({"model": {}, "epoch": 2, "global_step": 8}, tmp_path / "last.pt")
    ckpt.save_atomic({"model": {}, "epoch": 1, "global_step": 4}, tmp_path / "best.pt")
    ckpt.save_atomic({"model": {}, "epoch": 2, "global_step": 8}, tmp_path / "epoch_2.pt")
    ckpt.save_atomic({"model": {}, "epoch": 1, "global_step": 4}, tmp_path / "epoch_1.pt")
    os.utime(tmp_path / "last.pt", ns=(1, 1))
    path, state = ckpt.find_latest(tmp_path)
    assert path.name == "last.pt" and state["global_step"] == 8
    (tmp_path / "last.pt").write_bytes(b"torn")
    os.utime(tmp_path / "epoch_2.pt", ns=(1, 1))
    path, state = ckpt.find_latest(tmp_path)
    assert path.name == "epoch_2.pt" and state["global_step"] == 8


def test_resume_warns_only_about_settings_that_really_changed(tmp_path, caplog):
    # the resolved config.yaml makes defaults explicit (lr, amp, weights): not a change on resume
    out = tmp_path / "run"
    args = [a for a in SMALL if a not in ("--lr", "0.1")]
    assert cli.main([*args, "--output", str(out)]) == 0
    with caplog.at_level("WARNING", logger="fastkd"):
        assert cli.main(["train", "--config", str(out / "config.yaml"), "--output", str(out), "--epochs", "2",
                         "--resume", "auto"]) == 0
    assert "differ" not in caplog.text
    with caplog.at_level("WARNING", logger="fastkd"):
        assert cli.main([*args, "--output", str(out), "--epochs", "3", "--weight-decay", "0.001",
                         "--resume", "auto"]) == 0
    assert "differ from the checkpoint's run: weight_decay: 0.0001 -> 0.001" in caplog.text
