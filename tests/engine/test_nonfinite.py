"""Non-finite training stops with one line and never saves non-finite weights; an epoch without a
single valid image (every file corrupt under --skip-corrupt) is an error, not a loss of 0."""
import math
import shutil

import pytest
import torch

from fastkd import cli
from fastkd.engine import checkpoint as ckpt
from fastkd.engine import config as C
from fastkd.engine.metrics import read_metrics
from fastkd.engine.runner import TeacherOutput
from fastkd.engine.teacher import TeacherSource
from fastkd.errors import NonFiniteError

ARGS = ["train", "--data-backend", "torch", "--workers", "0", "--image-size", "16", "--batch-size", "8",
        "--student", "fastkd:resnet8", "--method", "ce", "--epochs", "2", "--device", "cpu", "--threads", "1"]


def test_a_huge_learning_rate_stops_with_one_line_and_saves_nothing(tiny_jpegs, tmp_path, caplog):
    out = tmp_path / "run"
    with caplog.at_level("ERROR", logger="fastkd"):
        assert cli.main([*ARGS, "--data", str(tiny_jpegs), "--output", str(out), "--lr", "1e30",
                         "--log-interval", "2"]) == 2
    [err] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert err.startswith("fastkd train: error: the training loss became non-finite")
    assert "between global steps 1 and 2 (epoch 1)" in err and "too high (1e+30; --lr)" in err and "fp16" in err
    assert "no checkpoint was written" in err
    assert not (out / ckpt.LAST).exists() and not (out / ckpt.BEST).exists()
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["kind"] for r in rows] == ["stop"]  # no epoch record, no "best top-1" of NaN weights
    assert rows[0]["reason"] == "non-finite" and rows[0]["global_step"] == 2


class PoisonedTeacher(TeacherSource):
    """Seeded random teacher logits per batch; one row is NaN in the step ``poison`` = (epoch, index)."""

    def __init__(self, classes, poison=None):
        self.classes, self.poison, self.epoch, self.count = classes, poison, 0, 0

    def set_epoch(self, epoch):
        self.epoch, self.count = epoch, 0

    def submit(self, batch):
        g = torch.Generator().manual_seed(int(batch.indices[0]) + 1000 * self.epoch)
        logits = torch.randn(len(batch.labels), self.classes, generator=g)
        if (self.epoch, self.count) == self.poison:
            logits[3, 1] = float("nan")
        self.count += 1
        return logits

    def result(self, handle):
        return TeacherOutput(handle)


def _cfg(data, out, **kw):
    return C.make_config(data=str(data), student="fastkd:resnet8", teacher="fastkd:resnet8", random_teacher=True,
                         method="kd", temperature=2.0, epochs=3, batch_size=8, image_size=12, lr=0.05, workers=0,
                         device="cpu", data_backend="torch", log_interval=1, output=str(out), **kw)


def test_one_nan_teacher_row_stops_at_its_step_and_resume_continues_the_last_good_checkpoint(tiny_jpegs, tmp_path):
    from fastkd.engine.trainer import Trainer

    out = tmp_path / "run"
    poisoned = lambda t: PoisonedTeacher(len(t.classes), poison=(1, 2))  # noqa: E731  epoch 2, its 3rd step
    with pytest.raises(NonFiniteError, match=r"non-finite \(nan at the logged step\) at global step 7 \(epoch 2\)"
                                             r".*teacher.*last good checkpoint is .*last\.pt"):
        Trainer(_cfg(tiny_jpegs, out), teacher_source=poisoned).run()
    state = ckpt.load(out / ckpt.LAST)
    assert (state["epoch"], state["step_in_epoch"]) == (1, 0)  # epoch 1's, the last good one
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in rows if r["kind"] == "epoch"] == [0]
    assert rows[-1]["kind"] == "stop" and rows[-1]["global_step"] == 7  # stopped, not finished

    # The same cause stops the resumed run at the same step; once fixed, it continues and finishes.
    with pytest.raises(NonFiniteError, match="at global step 7"):
        Trainer(_cfg(tiny_jpegs, out, resume="auto"), teacher_source=poisoned).run()
    result = Trainer(_cfg(tiny_jpegs, out, resume="auto"),
                     teacher_source=lambda t: PoisonedTeacher(len(t.classes))).run()
    assert [r["epoch"] for r in result["epochs"]] == [1, 2] and math.isfinite(result["final"]["train_loss"])
    kinds = [r["kind"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] != "step"]
    assert kinds == ["epoch", "epoch", "epoch"]  # the stop record went with the steps after the checkpoint


def test_a_checkpoint_of_non_finite_weights_is_never_written(tiny_jpegs, tmp_path):
    from fastkd.engine.trainer import Trainer

    out = tmp_path / "run"
    trainer = Trainer(C.make_config(data=str(tiny_jpegs), student="fastkd:resnet8", method="ce", epochs=1,
                                    batch_size=8, image_size=12, workers=0, device="cpu", data_backend="torch",
                                    output=str(out)))
    trainer.setup()
    try:
        with torch.no_grad():
            next(trainer.student.parameters())[0].fill_(float("inf"))
        with pytest.raises(NonFiniteError, match="weights became non-finite"):
            trainer._save(trainer._state(1, 0, trainer.train_loader.state_dict(), None), best=True)
    finally:
        trainer.metrics.close()
    assert not (out / ckpt.LAST).exists() and not (out / ckpt.BEST).exists()


def test_an_epoch_of_corrupt_images_only_is_an_error(tiny_jpegs, tmp_path, caplog):
    root = tmp_path / "data"
    shutil.copytree(tiny_jpegs, root)
    for f in (root / "train").rglob("*.jpg"):
        f.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "run"
    with caplog.at_level("ERROR", logger="fastkd"):
        assert cli.main([*ARGS, "--data", str(root), "--output", str(out), "--skip-corrupt"]) == 2
    err = caplog.text
    assert "epoch 1 trained on no valid image" in err and "skipped 31 corrupt file(s)" in err
    assert not (out / ckpt.LAST).exists()


@pytest.mark.slow
def test_two_processes_stop_together(tiny_jpegs, tmp_path, run_fastkd):
    """The check is summed over ranks: every rank stops at the same logging boundary with the one
    line (none waits for the others until --dist-timeout)."""
    out = tmp_path / "ddp"
    proc = run_fastkd(["--standalone", "--nproc_per_node", "2", "-m", "fastkd", *ARGS, "--data", tiny_jpegs,
                       "--lr", "1e30", "--dist-timeout", "120", "--output", out],
                      module=("-m", "torch.distributed.run"))
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "fastkd train: error:" in line]
    assert len(errors) == 2 and all("loss became non-finite" in e and "(epoch 1)" in e for e in errors), \
        proc.stderr[-3000:]
    assert not (out / ckpt.LAST).exists()
