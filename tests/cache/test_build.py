"""fastkd cache build: rows are the teacher's logits on the exact training views, the top-k rows
follow docs/methods.md §10, a killed build is finished without a half-used epoch, and 2 gloo
processes write the same files as one."""
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fastkd import cli
from fastkd.cache import CacheMismatchError, CacheReader
from fastkd.cache import store
from fastkd.engine import config as C
from fastkd.engine import distributed as D
from fastkd.engine.runner import TeacherRunner
from fastkd.models import create_model, load_weights

HERE = Path(__file__).resolve().parent


def build_args(root, ckpt, out, *extra, epochs=2):
    return [str(a) for a in ["cache", "build", "--data", root, "--data-backend", "torch", "--teacher", "fastkd:resnet8",
            "--teacher-checkpoint", ckpt, "--image-size", "16", "--batch-size", "8", "--workers", "0",
            "--device", "cpu", "--seed", "3", "--epochs", epochs, "--output", out, *extra]]


@pytest.fixture(scope="module")
def caches(tiny_jpegs, teacher_ckpt, tmp_path_factory):
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("caches")
    out = {}
    for name, extra in {"full": [], "bf16": ["--dtype", "bf16"], "fp16": ["--dtype", "fp16"],
                        "topk": ["--format", "topk", "--top-k", "2"]}.items():
        assert cli.main(build_args(tiny_jpegs, teacher_ckpt, base / name, *extra)) == 0
        out[name] = base / name
    return out


def online_rows(root, ckpt, epoch):
    """The teacher logits of the training views exactly as the trainer draws them, by sample index."""
    from fastkd.cache.build import train_loader

    cfg = C.TrainConfig(data=str(root), data_backend="torch", image_size=16, batch_size=8, workers=0, seed=3,
                        device="cpu")
    loader = train_loader(cfg, D.DistInfo(), teacher_view=True)
    runner = TeacherRunner(load_weights(create_model("fastkd:resnet8", 4), ckpt), torch.device("cpu"))
    loader.set_epoch(epoch)
    rows = torch.full((45, 4), float("nan"))
    for batch in loader:
        t_in = batch.teacher_images if batch.teacher_images is not None else batch.images
        rows[batch.indices] = runner(t_in).logits
    return rows


def test_full_fp32_rows_are_the_teachers_logits_on_the_training_views(caches, tiny_jpegs, teacher_ckpt):
    reader = CacheReader(caches["full"])
    m = reader.manifest
    assert m["epochs_done"] == [0, 1] and m["format"] == "full" and m["dtype"] == "fp32"
    assert m["data"]["num_samples"] == 45 and m["data"]["num_classes"] == 4 and m["seed"] == 3
    assert m["teacher_checkpoint_sha256"] == store.file_sha256(teacher_ckpt)
    assert m["view"]["teacher_image_size"] == 16 and m["augmentation"]["backend"] == "torch"
    for epoch in (0, 1):
        expect = online_rows(tiny_jpegs, teacher_ckpt, epoch)
        got = reader.rows(epoch, np.arange(45))["logits"]
        assert got.dtype == torch.float32
        assert torch.equal(got, expect), f"epoch {epoch}"
    # each epoch has its own crops
    assert not torch.equal(reader.rows(0, np.arange(45))["logits"], reader.rows(1, np.arange(45))["logits"])
    # one file per epoch, N x C fp32 (+ the .npy header)
    assert (caches["full"] / "epoch_0001.npy").stat().st_size < 45 * 4 * 4 + 256


def test_half_precision_rows_are_the_rounded_fp32_rows(caches):
    full = CacheReader(caches["full"]).rows(1, np.arange(45))["logits"]
    for name, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        got = CacheReader(caches[name]).rows(1, np.arange(45))["logits"]
        assert got.dtype == dt and torch.equal(got, full.to(dt))


def test_topk_rows_follow_methods_section_10(caches, tiny_jpegs):
    from fastkd.data import build_index

    full = CacheReader(caches["full"]).rows(0, np.arange(45))["logits"].double()
    labels = torch.from_numpy(build_index(tiny_jpegs, train=True).labels)
    rows = CacheReader(caches["topk"]).rows(0, np.arange(45))
    assert rows["values"].shape == (45, 2) and rows["indices"].dtype == torch.int64
    top = full.topk(2, dim=1)
    assert torch.equal(rows["indices"], top.indices)
    assert torch.equal(rows["values"], top.values.float())
    assert torch.equal(rows["label"], full.gather(1, labels[:, None]).squeeze(1).float())
    for i in range(45):  # fill: log-mean-exp of the logits outside S = top-2 plus the label
        rest = sorted(set(range(4)) - set(rows["indices"][i].tolist()) - {int(labels[i])})
        expect = torch.logsumexp(full[i, rest], 0) - math.log(len(rest))
        assert abs(float(rows["fill"][i]) - float(expect)) < 1e-6


def test_kill_during_an_epoch_then_rebuild_finishes_it_exactly(caches, tiny_jpegs, teacher_ckpt, tmp_path, run_py,
                                                               caplog):
    out = tmp_path / "killed"
    # 45 samples / batch 8 = 6 batches per epoch: the 9th encoded batch is inside epoch 1
    proc = run_py(build_args(tiny_jpegs, teacher_ckpt, out), module=(str(HERE / "kill_build.py"), "9"))
    assert proc.returncode == -9, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["epochs_done"] == [0]
    assert (out / ".epoch_0001.npy.tmp").exists() and not (out / "epoch_0001.npy").exists()
    with pytest.raises(CacheMismatchError, match="epoch 1 is not cached"):
        CacheReader(out).epoch(1)  # the half-written epoch is never handed out
    caplog.set_level("INFO", logger="fastkd")
    assert cli.main(build_args(tiny_jpegs, teacher_ckpt, out)) == 0  # the same command again
    assert "continuing" in caplog.text and "epochs 0 already done" in caplog.text
    assert not (out / ".epoch_0001.npy.tmp").exists()
    assert json.loads((out / "manifest.json").read_text())["epochs_done"] == [0, 1]
    for name in ("epoch_0000.npy", "epoch_0001.npy"):
        assert (out / name).read_bytes() == (caches["full"] / name).read_bytes(), name


def test_a_done_epoch_whose_file_is_damaged_is_rebuilt(caches, tiny_jpegs, teacher_ckpt, tmp_path, caplog):
    """The trainer refuses a truncated epoch file and says to rebuild: the build must then rebuild
    it, not answer that the epoch is already done."""
    out = tmp_path / "c"
    shutil.copytree(caches["full"], out)
    f = out / "epoch_0001.npy"
    f.write_bytes(f.read_bytes()[:-100])
    caplog.set_level("INFO", logger="fastkd")
    assert cli.main(build_args(tiny_jpegs, teacher_ckpt, out)) == 0
    assert "epoch 1 is rebuilt" in caplog.text
    assert f.read_bytes() == (caches["full"] / "epoch_0001.npy").read_bytes()


def test_rebuild_into_a_cache_of_other_settings_is_refused(caches, tiny_jpegs, teacher_ckpt, caplog):
    caplog.set_level("INFO", logger="fastkd")
    out = caches["full"]
    before = (out / "manifest.json").read_text()
    args = build_args(tiny_jpegs, teacher_ckpt, out)
    args[args.index("--seed") + 1] = "4"
    assert cli.main(args) == 2
    assert "holds a cache built with other settings (seed: cache has 3, this run has 4)" in caplog.text
    assert cli.main(build_args(tiny_jpegs, teacher_ckpt, out, "--dtype", "fp16")) == 2
    assert "dtype: cache has 'fp32', this build has 'fp16'" in caplog.text
    assert cli.main(build_args(tiny_jpegs, teacher_ckpt, out)) == 0  # same settings: nothing to do
    assert "already holds 2 epochs (0-1)" in caplog.text
    assert json.loads(before)["epochs_done"] == json.loads((out / "manifest.json").read_text())["epochs_done"]


def test_continuing_a_build_with_other_numerics_is_refused(caches, tiny_jpegs, teacher_ckpt, tmp_path, caplog):
    """Epochs done in fp32 and the rest under bf16 autocast would make one cache of two numerics
    (and a manifest naming only the last): refused, naming the setting."""
    out = tmp_path / "c"
    shutil.copytree(caches["full"], out)
    before = (out / "manifest.json").read_text()
    assert cli.main(build_args(tiny_jpegs, teacher_ckpt, out, "--amp", "bf16", epochs=3)) == 2
    assert "computed with amp 'none', this build would compute the rest with 'bf16'" in caplog.text
    assert (out / "manifest.json").read_text() == before


def test_fp16_overflow_of_the_teacher_logits_is_refused(tiny_jpegs, teacher_ckpt, tmp_path, caplog):
    """Logits beyond +-65504 would be stored as inf in fp16 (the run's loss then NaN): refused."""
    sd = torch.load(teacher_ckpt, map_location="cpu", weights_only=True)
    sd["fc.weight"] = sd["fc.weight"] * 1e6
    huge = tmp_path / "huge.pt"
    torch.save(sd, huge)
    assert cli.main(build_args(tiny_jpegs, huge, tmp_path / "c", "--dtype", "fp16", epochs=1)) == 2
    assert "beyond the fp16 range (65504)" in caplog.text and "use --dtype bf16 or fp32" in caplog.text
    assert cli.main(build_args(tiny_jpegs, huge, tmp_path / "b", "--dtype", "bf16", epochs=1)) == 0


@pytest.mark.parametrize("extra, message", [
    (["--format", "topk"], "--format topk needs --top-k K >= 1"),
    (["--format", "topk", "--top-k", "4"], "--top-k 4 must be smaller than the class count 4"),
    (["--top-k", "3"], "--top-k applies to --format topk only"),
    (["--data-backend", "synthetic"], "no sample index"),
])
def test_bad_build_settings_are_refused(tiny_jpegs, teacher_ckpt, tmp_path, caplog, extra, message):
    assert cli.main(build_args(tiny_jpegs, teacher_ckpt, tmp_path / "c", *extra, epochs=1)) == 2
    assert message in caplog.text


def test_build_without_teacher_checkpoint_is_refused(tiny_jpegs, tmp_path, caplog):
    args = [a for a in build_args(tiny_jpegs, "x", tmp_path / "c") if a not in ("--teacher-checkpoint", "x")]
    assert cli.main(args) == 2
    assert "no --teacher-checkpoint" in caplog.text


def test_two_gloo_processes_write_the_files_of_one(caches, tiny_jpegs, teacher_ckpt, tmp_path, run_py):
    out = tmp_path / "ddp"
    proc = run_py(["--standalone", "--nproc_per_node", "2", "-m", "fastkd",
                   *build_args(tiny_jpegs, teacher_ckpt, out, epochs=1)], module=("-m", "torch.distributed.run"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["build"]["world_size"] == 2 and m["epochs_done"] == [0]
    for name in ("epoch_0000.npy",):
        assert (out / name).read_bytes() == (caches["full"] / name).read_bytes(), name
