"""GPU paths of the engine: the concurrent teacher stream and the CUDA-graph teacher are checked
against the sequential oracle (skipped without CUDA).

The tolerance comparisons below cannot see a stream race by themselves (a student given the
*next* batch's teacher logits moves a random teacher's KD loss by ~0.1 %), so
``test_concurrent_teacher_gives_each_step_its_own_output`` checks the pairing exactly, with a
teacher whose logits spell out its input and are written only after a long serial chain of work
on the teacher stream: a missing wait, a wrong batch or reused memory shows as other numbers.
"""
import math

import pytest
import torch
from torch import nn

from fastkd.engine import make_config, train
from fastkd.engine.metrics import read_metrics
from fastkd.engine.teacher import OnlineTeacher, teacher_input
from fastkd.engine.trainer import Trainer

COMMON = dict(data_backend="synthetic", synthetic_samples=12 * 64, synthetic_classes=100, image_size=32,
              batch_size=64, student="fastkd:resnet20", teacher="fastkd:resnet56", method="kd", temperature=4.0,
              epochs=1, amp="bf16", channels_last=True, device="cuda", log_interval=1, lr=0.05)


def _losses(tmp_path, name, **kw):
    out = tmp_path / name
    result = train(make_config(**{**COMMON, **kw}, output=str(out)))
    return [s["loss"] for s in read_metrics(out / "metrics.jsonl", "step")], result["final"]


@pytest.mark.gpu
@pytest.mark.parametrize("variant", [{}, {"teacher_cuda_graph": True}])
def test_concurrent_teacher_matches_the_sequential_oracle(tmp_path, variant):
    seq, seq_final = _losses(tmp_path, "seq", sequential=True)
    conc, conc_final = _losses(tmp_path, "conc", **variant)
    assert len(seq) == len(conc) == 12
    assert all(math.isfinite(x) for x in seq + conc)
    # Same math in another order on the GPU: equal up to bf16 rounding (cuDNN may pick other
    # algorithms in the two runs), growing slowly over the steps.
    for i, (a, b) in enumerate(zip(seq, conc)):
        assert abs(a - b) <= 2e-2 * abs(a) + 1e-3, (i, a, b)
    assert conc_final["step_time_ms"]["teacher"] > 0 and "teacher_wait" in conc_final["step_time_ms"]
    assert "teacher_wait" not in seq_final["step_time_ms"]


@pytest.mark.gpu
def test_compiled_models_with_a_cuda_graph_teacher(tmp_path):
    small = dict(student="fastkd:resnet8", teacher="fastkd:resnet8")
    eager, _ = _losses(tmp_path, "eager", sequential=True, **small)
    compiled, final = _losses(tmp_path, "compiled", compile=True, teacher_cuda_graph=True, **small)
    assert len(compiled) == len(eager) and all(math.isfinite(x) for x in compiled)
    # torch.compile fuses and reorders bf16 arithmetic: agreement to bf16 noise, looser than above
    for i, (a, b) in enumerate(zip(eager, compiled)):
        assert abs(a - b) <= 5e-2 * abs(a) + 1e-3, (i, a, b)
    assert final["teacher_forward"]


class EchoTeacher(nn.Module):
    """Logits = 8 x the first C values of each input row (exact in any precision), made to wait
    for ``chain`` serial matmuls on the stream the teacher runs on."""

    def __init__(self, classes: int, chain: int, width: int):
        super().__init__()
        self.classes, self.chain = classes, chain
        self.w = nn.Parameter(torch.randn(width, width) / width ** 0.5)

    @staticmethod
    def expected(images, classes):
        return images.flatten(1)[:, :classes].float() * 8

    def forward(self, x):
        h = self.w
        for _ in range(self.chain):
            h = torch.tanh(h @ self.w)  # serial: each matmul waits for the previous one
        return self.expected(x, self.classes) + 0.0 * h.sum().float()  # + 0 exactly, after the chain


@pytest.mark.parametrize("device, kw", [
    ("cpu", dict(concurrent=False)),
    pytest.param("cuda", dict(concurrent=True), marks=pytest.mark.gpu),
    pytest.param("cuda", dict(concurrent=True, cuda_graph=True), marks=pytest.mark.gpu),
])
def test_concurrent_teacher_gives_each_step_its_own_output(tmp_path, monkeypatch, device, kw):
    cuda = device == "cuda"
    checks = []
    original = Trainer._step

    def spy(self, batch, tout, loss_fn, epoch_pos):
        # On the student stream, after result() made it wait for this batch's teacher work.
        want = EchoTeacher.expected(teacher_input(batch), len(self.classes))
        checks.append(bool(torch.equal(tout.logits, want)))
        return original(self, batch, tout, loss_fn, epoch_pos)

    monkeypatch.setattr(Trainer, "_step", spy)
    # 11 full batches and a partial one (a CUDA graph pads it into its static buffer)
    cfg = make_config(**{**COMMON, "device": device, "amp": "bf16" if cuda else "none",
                         "channels_last": cuda, "teacher": "fastkd:resnet8", "random_teacher": True,
                         "student": "fastkd:resnet8", "synthetic_samples": 11 * 64 + 40, "synthetic_classes": 10,
                         "image_size": 12 if not cuda else 32, "batch_size": 64},
                      output=str(tmp_path / "echo"))

    def source(trainer):
        # On the GPU ~10 ms of teacher work per batch: longer than the host takes from submitting
        # batch i to checking it (a student step's launches), so a missing wait reads unwritten rows.
        teacher = EchoTeacher(len(trainer.classes), chain=60 if cuda else 2, width=4096 if cuda else 32)
        return OnlineTeacher.from_model(teacher, trainer.device, amp_dtype=trainer.amp_dtype,
                                        channels_last=cfg.channels_last, **kw)

    trainer = Trainer(cfg, teacher_source=source)
    result = trainer.run()
    assert checks == [True] * 12
    assert result["final"]["teacher_forward"] and result["final"]["teacher_top1"] >= 0
    if cuda:
        assert trainer.teacher_source.concurrent
