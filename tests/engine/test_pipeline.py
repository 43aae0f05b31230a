"""The step pipeline: each batch paired with its own teacher output, submitted one batch ahead,
with the loader state that resumes after it; the Trainer with a teacher source that has no model."""
import math

import pytest
import torch

from fastkd.data.loader import Batch
from fastkd.engine import config as C
from fastkd.engine.pipeline import steps
from fastkd.engine.runner import TeacherOutput
from fastkd.engine.teacher import TeacherSource


class ListLoader:
    """A loader over fixed batches of sample indices, with a resumable position."""

    def __init__(self, n_batches=5, batch_size=3):
        self.batches = [torch.arange(b * batch_size, (b + 1) * batch_size) for b in range(n_batches)]
        self.epoch, self.pos, self.log = 0, 0, []

    def set_epoch(self, epoch):
        self.epoch = epoch

    def state_dict(self):
        return {"epoch": self.epoch, "batch": self.pos}

    def __iter__(self):
        while self.pos < len(self.batches):
            idx = self.batches[self.pos]
            self.pos += 1
            self.log.append(("read", int(idx[0]) // len(idx)))
            yield Batch(images=idx.float()[:, None], labels=idx % 4, indices=idx)


class IndexTeacher(TeacherSource):
    """Logits that spell out the batch: column 0 holds each row's sample index, column 1 the epoch."""

    def __init__(self, classes=4, log=None):
        self.classes, self.log, self.epoch = classes, log if log is not None else [], None

    def set_epoch(self, epoch):
        self.epoch = epoch

    def submit(self, batch):
        self.log.append(("submit", int(batch.indices[0]) // len(batch)))
        return batch.indices.clone(), self.epoch

    def result(self, handle):
        indices, epoch = handle
        self.log.append(("result", int(indices[0]) // len(indices)))
        logits = torch.zeros(len(indices), self.classes)
        logits[:, 0] = indices.float()
        logits[:, 1] = float(epoch)
        return TeacherOutput(logits)


def test_each_step_carries_its_own_batchs_teacher_output_submitted_one_batch_ahead():
    loader = ListLoader()
    source = IndexTeacher(log=loader.log)  # one log: reads, submits and results in order
    seen = []
    for step in steps(loader, source, epoch=3):
        loader.log.append(("step", step.index))
        assert torch.equal(step.teacher.logits[:, 0], step.batch.indices.float())  # its own batch
        assert (step.teacher.logits[:, 1] == 3).all()  # the epoch reached the source
        # the state after step i resumes at batch i + 1, although batch i + 1 was already read
        assert step.loader_state_after == {"epoch": 3, "batch": step.index + 1}
        seen.append(step.index)
    assert seen == [0, 1, 2, 3, 4]
    expected = [("read", 0), ("submit", 0)]
    for i in range(5):
        expected += [("result", i)] + ([("read", i + 1), ("submit", i + 1)] if i < 4 else []) + [("step", i)]
    assert loader.log == expected  # T(i+1) is submitted before the student step of batch i


def test_states_only_where_wanted_and_a_resumed_epoch_counts_from_its_start():
    loader = ListLoader()
    loader.pos = 2  # a resume point: batches 0 and 1 already trained
    out = [(s.index, s.loader_state_after) for s in steps(loader, None, 0, start=2, want_state=lambda i: i == 3)]
    assert out == [(2, None), (3, {"epoch": 0, "batch": 4}), (4, None)]


def test_without_a_source_steps_carry_no_teacher():
    assert all(s.teacher is None for s in steps(ListLoader(), None, 0))


def test_trainer_runs_from_a_source_without_a_model(tiny_jpegs, tmp_path, monkeypatch):
    """No teacher model is built or evaluated, and every student step sees its own batch's logits."""
    from fastkd.engine.trainer import Trainer

    pairs = []
    original = Trainer._step

    def spy(self, batch, tout, loss_fn, epoch_pos):
        pairs.append(torch.equal(tout.logits[:, 0], batch.indices.float()))
        return original(self, batch, tout, loss_fn, epoch_pos)

    monkeypatch.setattr(Trainer, "_step", spy)
    cfg = C.make_config(data=str(tiny_jpegs), student="fastkd:resnet8", teacher="fastkd:resnet8", random_teacher=True,
                        method="kd", temperature=4.0, epochs=1, batch_size=8, image_size=12, lr=0.05, workers=0,
                        device="cpu", output=str(tmp_path / "src"))
    trainer = Trainer(cfg, teacher_source=lambda t: IndexTeacher(classes=len(t.classes)))
    result = trainer.run()
    assert trainer.teacher is None  # no teacher model, no teacher memory
    assert pairs == [True] * 4  # 31 images, batches of 8
    r = result["final"]
    assert r["teacher_forward"] and r["train_kd"] > 0 and math.isfinite(r["train_loss"])
    assert "teacher_top1" not in r and "kl" not in r  # validation needs a model: no teacher metrics


def test_dpk_refuses_a_source_without_features(tmp_path):
    from fastkd.engine.trainer import Trainer

    cfg = C.make_config(data_backend="synthetic", synthetic_samples=16, synthetic_classes=4, image_size=12,
                        batch_size=8, device="cpu", student="fastkd:resnet8", teacher="fastkd:resnet8",
                        random_teacher=True, method="dpk", epochs=1, output=str(tmp_path / "dpk"))
    with pytest.raises(ValueError, match="dpk needs the teacher's features.*online teacher"):
        Trainer(cfg, teacher_source=IndexTeacher()).setup()
