"""The public loss API: validation, flattening, reductions and backend dispatch.

Every function takes logits of shape ``(N, C)`` or ``(..., C)`` (leading dimensions are
flattened) in fp16, bf16, fp32 or fp64, computes in fp32 (fp64 stays fp64 on the torch
backend) and returns an fp32 (or fp64) loss.

Reductions (all KD terms): ``batchmean`` sums over classes and averages over the rows whose
label is not ``ignore_index`` (for :func:`kd_loss`, which has no labels, over all rows);
``sum``; ``none`` gives one value per row, shaped like the leading dimensions. A batch whose
rows are all ignored gives 0 and a zero gradient, never NaN.

Backends: ``torch`` is the reference (:mod:`fastkd.losses.reference`); ``triton`` is the
fused kernel family in :mod:`fastkd.kernels` (CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``); ``auto`` picks ``triton`` on CUDA tensors and ``torch`` elsewhere and
says once in the log when it falls back. The two backends compute the same numbers.

NaN and Inf: a NaN anywhere in a row makes that row's loss NaN; ``-inf`` marks a masked class
(probability 0, contributing 0 where the teacher also gives it 0); nothing is clamped or
dropped silently.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import _compat
from . import reference as ref

REDUCTIONS = ("batchmean", "sum", "none")
BACKENDS = ("auto", "torch", "triton")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_CLASSES = 262_144

_label_checks = True


def set_label_checks(enabled: bool) -> None:
    """Turn the label-range check on or off (on by default).

    The check costs one device-to-host synchronisation per call on CUDA tensors. The engine
    turns it off because its loaders produce labels in range by construction; with the check
    off an out-of-range label gives that row a NaN loss in the Triton kernels (never an
    out-of-bounds read) and an index error on the torch backend.
    """
    global _label_checks
    _label_checks = bool(enabled)


def label_checks_enabled() -> bool:
    return _label_checks


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
def _check_logits(name: str, x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got dtype {x.dtype}"
        )
    if x.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension (..., C), got a 0-d tensor")
    C = x.shape[-1]
    if C < 2:
        raise ValueError(f"{name} has {C} class(es) in its last dimension; at least 2 are needed")


def _check_pair(student: Tensor, teacher: Tensor) -> None:
    _check_logits("student_logits", student)
    _check_logits("teacher_logits", teacher)
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(
            f"class count mismatch: student_logits has {student.shape[-1]} classes, "
            f"teacher_logits has {teacher.shape[-1]}"
        )
    if student.shape != teacher.shape:
        raise ValueError(
            f"shape mismatch: student_logits {tuple(student.shape)} vs teacher_logits {tuple(teacher.shape)}"
        )
    if student.device != teacher.device:
        raise ValueError(f"device mismatch: student_logits on {student.device}, teacher_logits on {teacher.device}")


def _check_target(target, logits: Tensor, ignore_index: int) -> None:
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor of class indices, got {type(target).__name__}")
    if target.dtype == torch.bool or target.is_floating_point() or target.is_complex():
        raise TypeError(f"target must hold integer class indices (e.g. torch.int64), got dtype {target.dtype}")
    lead = tuple(logits.shape[:-1])
    if tuple(target.shape) != lead:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match the logits' leading dimensions {lead} "
            f"(logits {tuple(logits.shape)})"
        )
    if target.device != logits.device:
        raise ValueError(f"device mismatch: target on {target.device}, logits on {logits.device}")
    if _label_checks and target.numel():
        C = logits.shape[-1]
        bad = ((target < 0) | (target >= C)) & (target != ignore_index)
        if bool(bad.any()):
            first = target[bad].flatten()[0].item()
            raise ValueError(
                f"target holds label {first} outside [0, {C}) (and not ignore_index={ignore_index}); "
                f"{int(bad.sum())} such label(s) in total"
            )


def _check_positive(name: str, value) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(f) or f <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return f


def _check_nonneg(name: str, value) -> float:
    f = float(value)
    if not math.isfinite(f) or f < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return f


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {', '.join(REDUCTIONS)}")


def _check_candidates(candidates, tau_target: float) -> tuple:
    if candidates is None:
        return tuple(ref.isats_default_candidates(tau_target))
    try:
        cands = tuple(float(c) for c in candidates)
    except TypeError:
        raise TypeError(f"candidates must be a sequence of numbers, got {candidates!r}") from None
    if not cands:
        raise ValueError("candidates must hold at least one temperature")
    for c in cands:
        _check_positive("each ISATS candidate temperature", c)
    return cands


def _resolve_backend(backend: str, x: Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return "torch"
    ok, why = _compat.triton_usable_on(x.device)
    if backend == "triton":
        if not ok:
            raise RuntimeError(f"backend='triton' cannot run here: {why}")
        return "triton"
    # auto: the fused kernels on CUDA; on CPU the reference (the interpreter is for tests only).
    if ok and x.device.type == "cuda":
        return "triton"
    reason = "the fused Triton kernels run on CUDA tensors" if x.device.type != "cuda" else why
    _compat.log_once(
        f"fastkd: loss backend 'auto' uses the PyTorch reference on {x.device.type} tensors "
        f"({reason}); numbers are identical, only speed differs"
    )
    return "torch"


def _flatten(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


def _reduce(rows: Tensor, reduction: str, count: Optional[Tensor], lead: tuple) -> Tensor:
    if reduction == "none":
        return rows.reshape(lead)
    total = rows.sum()
    if reduction == "sum":
        return total
    denom = count if count is not None else torch.tensor(float(max(rows.numel(), 1)), device=rows.device)
    return total / denom.clamp_min(1).to(total.dtype)


def _valid_count(target: Tensor, ignore_index: int) -> Tensor:
    return (target != ignore_index).sum()


# --------------------------------------------------------------------------------------------
# Fused path
# --------------------------------------------------------------------------------------------
def _fused(student, teacher, target, *, method, ce_weight, kd_weight, label_smoothing, ignore_index, reduction, **params):
    from .. import kernels  # deferred: defines Triton kernels on first use

    loss, _parts = kernels.fused_distill(
        student,
        teacher,
        target,
        method=method,
        ce_weight=ce_weight,
        kd_weight=kd_weight,
        label_smoothing=label_smoothing,
        ignore_index=ignore_index,
        reduction=reduction,
        **params,
    )
    return loss, _parts


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------
def _kd_term(method, student_logits, teacher_logits, target, reduction, ignore_index, backend, ref_rows, **params):
    """Shared body of the per-row KD losses: flatten, dispatch to the fused kernel or the
    reference, reduce. Inputs and parameters are validated by the callers."""
    _check_reduction(reduction)
    lead = tuple(student_logits.shape[:-1])
    z, v = _flatten(student_logits), _flatten(teacher_logits).detach()
    y = None if target is None else target.reshape(-1)
    if _resolve_backend(backend, z) == "triton":
        loss, _ = _fused(z, v, y, method=method, ce_weight=0.0, kd_weight=1.0, label_smoothing=0.0,
                         ignore_index=ignore_index, reduction=reduction, **params)
        return loss.reshape(lead) if reduction == "none" else loss
    rows = ref_rows(z, v, y)
    count = None if y is None else _valid_count(y, ignore_index)
    return _reduce(rows, reduction, count, lead)


def kd_loss(student_logits, teacher_logits, temperature=1.0, reduction="batchmean", backend="auto"):
    """Hinton KD: ``T^2 * KL(softmax(teacher/T) || softmax(student/T))``.

    ``batchmean`` averages over all rows (there are no labels). Gradient flows into
    ``student_logits`` only.
    """
    _check_pair(student_logits, teacher_logits)
    T = _check_positive("temperature", temperature)
    return _kd_term("kd", student_logits, teacher_logits, None, reduction, -100, backend,
                    lambda z, v, y: ref.kd(z, v, T), temperature=T)


def ats_loss(student_logits, teacher_logits, target, tau_target=4.0, tau_other=2.0, student_temperature=1.0,
             reduction="batchmean", ignore_index=-100, backend="auto"):
    """Asymmetric temperature scaling (Li et al. 2022): the teacher's label logit is divided by
    ``tau_target``, every other logit by ``tau_other``; the student uses ``student_temperature``.
    Loss ``s^2 * KL(q || softmax(student/s))``; rows labelled ``ignore_index`` are skipped."""
    _check_pair(student_logits, teacher_logits)
    _check_target(target, student_logits, ignore_index)
    tt = _check_positive("tau_target", tau_target)
    to = _check_positive("tau_other", tau_other)
    s = _check_positive("student_temperature", student_temperature)
    return _kd_term("ats", student_logits, teacher_logits, target, reduction, ignore_index, backend,
                    lambda z, v, y: ref.ats(z, v, y, tt, to, s, ignore_index),
                    tau_target=tt, tau_other=to, student_temperature=s)


def isats_loss(student_logits, teacher_logits, target, tau_target=4.0, candidates=None, student_temperature=1.0,
               reduction="batchmean", ignore_index=-100, backend="auto"):
    """Instance-specific ATS: per row, ``tau_other`` is the candidate that maximises the variance
    of the teacher's wrong-class probabilities while keeping the label the teacher's arg-max
    (default grid: 16 values evenly spaced in [0.5, tau_target])."""
    _check_pair(student_logits, teacher_logits)
    _check_target(target, student_logits, ignore_index)
    tt = _check_positive("tau_target", tau_target)
    cands = _check_candidates(candidates, tt)
    s = _check_positive("student_temperature", student_temperature)
    return _kd_term("isats", student_logits, teacher_logits, target, reduction, ignore_index, backend,
                    lambda z, v, y: ref.isats(z, v, y, tt, cands, s, ignore_index),
                    tau_target=tt, candidates=cands, student_temperature=s)


def dkd_loss(student_logits, teacher_logits, target, alpha=1.0, beta=8.0, temperature=4.0,
             reduction="batchmean", ignore_index=-100, backend="auto"):
    """Decoupled KD (Zhao et al. 2022): ``T^2 (alpha * TCKD + beta * NCKD)``. The warm-up weight
    ``min(epoch / warmup, 1)`` is applied by :class:`DistillLoss` (``warmup_epochs``)."""
    _check_pair(student_logits, teacher_logits)
    _check_target(target, student_logits, ignore_index)
    a = _check_nonneg("alpha", alpha)
    b = _check_nonneg("beta", beta)
    T = _check_positive("temperature", temperature)
    return _kd_term("dkd", student_logits, teacher_logits, target, reduction, ignore_index, backend,
                    lambda z, v, y: ref.dkd(z, v, y, a, b, T, ignore_index), alpha=a, beta=b, temperature=T)


def dist_loss(student_logits, teacher_logits, beta=1.0, gamma=1.0, temperature=1.0, backend="auto"):
    """DIST (Huang et al. 2022): ``tau^2 (beta * inter + gamma * intra)``, a scalar over the batch
    (the intra-class term correlates columns across the whole batch)."""
    _check_pair(student_logits, teacher_logits)
    b = _check_nonneg("beta", beta)
    g = _check_nonneg("gamma", gamma)
    tau = _check_positive("temperature", temperature)
    z, v = _flatten(student_logits), _flatten(teacher_logits).detach()
    if _resolve_backend(backend, z) == "triton":
        from .. import kernels

        return kernels.fused_dist(z, v, beta=b, gamma=g, temperature=tau)
    return ref.dist(z, v, b, g, tau)


def cross_entropy(logits, target, label_smoothing=0.0, reduction="batchmean", ignore_index=-100):
    """Reference CE with the fastkd conventions (``batchmean`` = mean over non-ignored rows)."""
    _check_logits("logits", logits)
    _check_target(target, logits, ignore_index)
    eps = _check_nonneg("label_smoothing", label_smoothing)
    if eps > 1:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    _check_reduction(reduction)
    lead = tuple(logits.shape[:-1])
    z, y = _flatten(logits), target.reshape(-1)
    return _reduce(ref.cross_entropy(z, y, eps, ignore_index), reduction, _valid_count(y, ignore_index), lead)
