"""The public loss API: validation, flattening, row masks, reductions and backend dispatch.

Every function takes logits of shape ``(N, C)`` or ``(..., C)`` (leading dimensions are
flattened) in fp16, bf16, fp32 or fp64, computes in fp32 (fp64 stays fp64 on the torch
backend) and returns an fp32 (or fp64) loss. Inputs are validated here, once; the kernels
and :mod:`fastkd.losses.reference` assume valid inputs.

Reductions (all KD terms): ``batchmean`` sums over classes and averages over the rows that
count: rows whose label is not ``ignore_index`` and whose ``valid`` flag (if given) is True
(for :func:`kd_loss`, which has no labels, all rows with ``valid`` True); ``sum``; ``none``
gives one value per row, shaped like the leading dimensions (0 for rows that do not count).
A batch where no row counts gives 0 and a zero gradient, never NaN.

Labels: ``ignore_index`` is compared with the labels as int64 values, so it applies only
where the label dtype can hold it (uint8 labels with ``ignore_index=-100``: no row is
ignored, label 156 is class 156), the same on both backends.

Row masks (``valid``): a bool tensor shaped like the leading dimensions; rows with ``False``
(e.g. the padding rows that make every process's batch the same size) contribute nothing to
any term and are not counted in any denominator, for every method (DIST computes its
inter- and intra-class statistics over the valid rows only).

Backends: ``torch`` is the reference (:mod:`fastkd.losses.reference`); ``triton`` is the
fused kernel family in :mod:`fastkd.kernels` (CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``); ``auto`` picks ``triton`` on CUDA tensors and ``torch`` elsewhere and
says once in the log when it falls back. The two backends compute the same numbers.

Compressed teachers: wherever teacher logits go, a :class:`~fastkd.losses.compressed.TopKTeacher`
is accepted too; it is densified on the device and the normal path runs (see
:mod:`fastkd.losses.compressed`). One from :func:`~fastkd.losses.compressed.compress_topk`
carries its labels (``label_index``); one built without them needs ``target`` to place the
label's logit (``kd_loss`` and ``dist_loss`` take ``target=`` for that only).

Temperatures: every temperature-like parameter (``temperature``, ``tau_target``, ``tau_other``,
``student_temperature``, ISATS ``candidates``) must lie in ``[1e-3, 100]``. Above 100 fp32 cannot
hold the KD losses: ``T^2`` multiplies a KL of order ``1/T^2`` that fp32 computes with an absolute
error of about 1e-7, so the loss's absolute error grows like ``1e-7 T^2`` (against fp64 on logits
of standard deviation 3: about 1e-4 relative at T = 100, 1e-2 at 1000, 70 % at 1e4 and a
negative value at 1e5, on both backends; the gradient's error grows only like ``1e-7 T``).
Below 1e-3 logits / T overflow sooner; within the range every logit of magnitude up to 1e33
keeps ``x / T`` and the KL finite, so the losses are finite (never NaN) for such logits and
weights up to 100. Both backends accept and refuse the same values.

NaN and Inf: a NaN anywhere in a row that counts makes that row's loss NaN (a row left out by
``valid`` or ``ignore_index`` contributes exactly 0 to the loss and the gradient, whatever it
holds: it is replaced with ``torch.where``, never multiplied by 0); ``-inf`` marks a masked class
(probability 0, contributing 0 where the teacher also gives it 0); nothing is clamped or
dropped silently.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import _compat
from . import reference as ref
from .compressed import TopKTeacher, check_topk, check_topk_indices, densify

REDUCTIONS = ("batchmean", "sum", "none")
BACKENDS = ("auto", "torch", "triton")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_CLASSES = 262_144
FP32_TINY = float(torch.finfo(torch.float32).tiny)  # smallest normal fp32, 1.18e-38
FP32_MAX = float(torch.finfo(torch.float32).max)    # 3.40e+38
# The accepted temperatures (every temperature-like parameter: temperature, tau_target, tau_other,
# student_temperature, ISATS candidates). Above TEMPERATURE_MAX fp32 cannot hold the KD losses:
# T^2 multiplies a KL of order 1/T^2 that fp32 computes with an absolute error of ~1e-7 (the
# rounding of two log-normalisers), so the loss's absolute error grows like 1e-7 T^2 (relative to
# fp64, logits of standard deviation 3, C = 10..1000, both backends: about 1e-4 at T = 100, 1e-2 at
# 1e3, 70 % at 1e4, a negative "KL" at 1e5). TEMPERATURE_MIN is derived from the logit range the
# losses promise finite results for, |x| <= LOGIT_MAX = 1e33: at T >= 1e-3, x / T <= 1e36, the
# difference of two such and the KL <= 2e36, and weights up to 100 keep the loss below fp32's max
# (3.4e38). At fp32's smallest normal (1.2e-38) even a logit of 5 overflows to inf and the loss is NaN.
TEMPERATURE_MIN = 1e-3
TEMPERATURE_MAX = 100.0
LOGIT_MAX = 1e33                                     # |logits| with finite losses at every accepted T



def _resolve_checks(check_labels) -> bool:
    if not isinstance(check_labels, bool):
        raise TypeError(f"check_labels must be True or False, got {check_labels!r}")
    return check_labels


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


def _labels(target, logits: Tensor) -> Tensor:
    """Validated labels as a flat int64 tensor (int64 comparisons: a narrow dtype such as uint8
    cannot wrap ``ignore_index`` onto a class)."""
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
    return target.reshape(-1).long()


def _row_mask(valid, logits: Tensor) -> Optional[Tensor]:
    """The validated row mask as a flat bool tensor, or None (every row valid)."""
    if valid is None:
        return None
    if not isinstance(valid, Tensor) or valid.dtype != torch.bool:
        got = f"dtype {valid.dtype}" if isinstance(valid, Tensor) else type(valid).__name__
        raise TypeError(f"valid must be a bool torch.Tensor (True = the row counts), got {got}")
    lead = tuple(logits.shape[:-1])
    if tuple(valid.shape) != lead:
        raise ValueError(f"valid shape {tuple(valid.shape)} does not match the logits' leading dimensions {lead}")
    if valid.device != logits.device:
        raise ValueError(f"device mismatch: valid on {valid.device}, logits on {logits.device}")
    return valid.reshape(-1)


def _fold(y: Tensor, mask: Optional[Tensor], ignore_index: int) -> Tensor:
    """Labels with the rows outside ``mask`` set to ``ignore_index``."""
    if mask is None:
        return y
    return torch.where(mask, y, torch.full_like(y, ignore_index))


def _check_label_range(y: Tensor, C: int, ignore_index: int) -> None:
    """One device-to-host synchronisation on CUDA tensors."""
    if not y.numel():
        return
    bad = ((y < 0) | (y >= C)) & (y != ignore_index)
    if bool(bad.any()):
        first = y[bad][0].item()
        raise ValueError(
            f"target holds label {first} outside [0, {C}) (and not ignore_index={ignore_index}); "
            f"{int(bad.sum())} such label(s) in total"
        )


def _prepare(student, target, valid, ignore_index, check_labels):
    """(labels as given (int64, flat) or None, labels with the masked rows ignored, row mask)."""
    ii = _check_int("ignore_index", ignore_index)
    mask = _row_mask(valid, student)
    if target is None:
        return None, None, mask
    y_raw = _labels(target, student)
    y = _fold(y_raw, mask, ii)
    if _resolve_checks(check_labels):
        _check_label_range(y, student.shape[-1], ii)
    return y_raw, y, mask


def _dense_teacher(teacher, student: Tensor, y_raw: Optional[Tensor], ignore_index: int,
                   check_indices: bool = True) -> Tensor:
    """Teacher logits as a tensor (a TopKTeacher is densified on its device), checked against
    the student."""
    if isinstance(teacher, TopKTeacher):
        check_topk(teacher)
        _check_logits("student_logits", student)
        N, C = student.reshape(-1, student.shape[-1]).shape
        if teacher.shape != (N, C):
            raise ValueError(f"TopKTeacher stands for teacher logits {teacher.shape}; student_logits are "
                             f"{(N, C)} after flattening the leading dimensions")
        if teacher.device != student.device:
            raise ValueError(f"device mismatch: student_logits on {student.device}, TopKTeacher on {teacher.device}")
        if y_raw is None and teacher.label_index is None:
            raise ValueError("this TopKTeacher was built without label_index, so it needs target= (the labels "
                             "its label logit belongs to; compress_topk stores them, a cache does not)")
        if check_indices:  # with the label check (check_labels): one host sync on CUDA
            check_topk_indices(teacher)
        teacher = densify(teacher, y_raw, ignore_index, check_indices=False).reshape(student.shape)
    _check_pair(student, teacher)
    return teacher


def _number(name: str, value) -> float:
    """A real number as float; bools, strings, None and multi-element tensors are refused."""
    ok = (isinstance(value, numbers.Real) and not isinstance(value, bool)) or (
        isinstance(value, Tensor) and value.numel() == 1 and value.dtype != torch.bool and not value.is_complex())
    if not ok:
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    return float(value)


def _check_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    return int(value)


def _check_temperature(name: str, value) -> float:
    """A temperature: a finite number in ``[TEMPERATURE_MIN, TEMPERATURE_MAX]`` = [1e-3, 100], the
    range where the fp32 losses stay within 1e-3 (typically 1e-4, relative) of fp64 on logits of
    moderate range and finite for every logit ``|x| <= 1e33`` (see the constants above)."""
    f = _number(name, value)
    if not (math.isfinite(f) and TEMPERATURE_MIN <= f <= TEMPERATURE_MAX):
        why = ""
        if math.isfinite(f) and f > TEMPERATURE_MAX:
            why = " (above it fp32 cannot hold the loss: T^2 times a KL of order 1/T^2 loses its digits to rounding)"
        elif math.isfinite(f) and f > 0:
            why = " (below it logits / T overflow fp32 into NaN)"
        raise ValueError(f"{name} must be a number in [{TEMPERATURE_MIN:g}, {TEMPERATURE_MAX:g}], got {value!r}{why}")
    return f


_check_positive = _check_temperature


def _check_nonneg(name: str, value) -> float:
    """A weight: finite, >= 0 and at most fp32's maximum."""
    f = _number(name, value)
    if not (math.isfinite(f) and 0 <= f <= FP32_MAX):
        raise ValueError(f"{name} must be a finite number >= 0 (at most {FP32_MAX:.4g}), got {value!r}")
    return f


def _check_fraction(name: str, value) -> float:
    """A number in [0, 1] (JSD's beta)."""
    f = _number(name, value)
    if not (math.isfinite(f) and 0.0 <= f <= 1.0):
        raise ValueError(f"{name} must be a finite number in [0, 1], got {value!r}")
    return f


def _check_smoothing(value) -> float:
    f = _check_nonneg("label_smoothing", value)
    if f > 1:
        raise ValueError(f"label_smoothing must be in [0, 1], got {value!r}")
    return f


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {', '.join(REDUCTIONS)}")


def _check_candidates(candidates, tau_target: float) -> tuple:
    if candidates is None:
        return tuple(ref.isats_default_candidates(tau_target))
    if isinstance(candidates, (str, bytes)) or not isinstance(candidates, (Sequence, Tensor)):
        raise TypeError(f"candidates must be a sequence of numbers, got {candidates!r}")
    cands = tuple(_check_temperature("each ISATS candidate temperature", c) for c in candidates)
    if not cands:
        raise ValueError("candidates must hold at least one temperature")
    return cands


def check_param(kind: str, name: str, value, params: Optional[dict] = None):
    """Validate one method parameter by its kind in :mod:`fastkd.losses.methods` (``params``:
    the method's other parameters, for ISATS' candidate default)."""
    if kind == "temperature":
        return _check_temperature(name, value)
    if kind in ("weight", "epochs"):
        return _check_nonneg(name, value)
    if kind == "candidates":
        tau = (params or {}).get("tau_target", 4.0)
        return _check_candidates(value, tau)
    if kind == "fraction":
        return _check_fraction(name, value)
    if kind == "flag":
        return _check_flag(name, value)
    raise ValueError(f"unknown parameter kind {kind!r}")


def _resolve_backend(backend: str, x: Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return "torch"
    if x.dtype == torch.float64 and (backend == "triton" or x.device.type == "cuda") \
            and _compat.triton_usable_on(x.device)[0]:
        # The fused kernels compute in fp32: fp64 keeps the fp64 reference.
        _compat.log_once(
            "fastkd: backend 'triton' computes in fp32; float64 inputs use the float64 PyTorch reference "
            "instead (same numbers as backend 'torch', only speed differs)"
        )
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


def _zero_masked(rows: Tensor, mask: Optional[Tensor]) -> Tensor:
    return rows if mask is None else torch.where(mask, rows, torch.zeros_like(rows))


# --------------------------------------------------------------------------------------------
# Fused path
# --------------------------------------------------------------------------------------------
def _fused(student, teacher, target, *, method, ce_weight, kd_weight, label_smoothing, ignore_index, reduction, **params):
    from .. import kernels  # deferred: defines Triton kernels on first use

    return kernels.fused_distill(
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


def _say_dist_uses_reference() -> None:
    _compat.log_once(
        "fastkd: DIST has no fused Triton kernel (its intra-class term needs whole-batch column "
        "statistics); backend 'triton' computes it with the PyTorch reference in fp32"
    )


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------
def _kd_term(method, student_logits, teacher_logits, target, valid, reduction, ignore_index, backend,
             check_labels, ref_rows, standardize=False, **params):
    """Shared body of the per-row KD losses: validate, flatten, dispatch to the fused kernel or
    the reference, reduce. Parameters are validated by the callers; ``standardize`` z-scores
    both rows before the method (docs/methods.md §11)."""
    standardize = _check_flag("standardize", standardize)
    _check_reduction(reduction)
    _check_logits("student_logits", student_logits)
    y_raw, y, mask = _prepare(student_logits, target, valid, ignore_index, check_labels)
    teacher_logits = _dense_teacher(teacher_logits, student_logits, y_raw, ignore_index, check_labels)
    lead = tuple(student_logits.shape[:-1])
    z, v = _flatten(student_logits), _flatten(teacher_logits).detach()
    if method == "kd" or y is None:
        # KD reads no label (nor do JSD / RKL called without one): only the row mask decides which rows count.
        y = None if mask is None else torch.where(mask, torch.zeros_like(mask, dtype=torch.long),
                                                  torch.full_like(mask, ignore_index, dtype=torch.long))
    if _resolve_backend(backend, z) == "triton":
        if standardize:
            params["standardize"] = True
        loss, _ = _fused(z, v, y, method=method, ce_weight=0.0, kd_weight=1.0, label_smoothing=0.0,
                         ignore_index=ignore_index, reduction=reduction, **params)
        return loss.reshape(lead) if reduction == "none" else loss
    # The rows that count (the mask folded into y; KD's y comes from the mask alone). Left-out rows
    # contribute exactly 0 and a zero gradient even if NaN: zeroed (or, before a z-score, replaced
    # by a fixed finite row) before any arithmetic touches them.
    keep = None if y is None else y != ignore_index
    if standardize:
        z, v = ref.standardize(ref.fill_rows(z, keep)), ref.standardize(ref.fill_rows(v, keep))
    if method in ("kd", "jsd", "rkl"):  # label-free: the reference functions do not mask rows themselves
        rows = _zero_masked(ref_rows(ref.zero_rows(z, keep), ref.zero_rows(v, keep), y), keep)
    else:
        rows = ref_rows(z, v, y)
    count = None if y is None else _valid_count(y, ignore_index)
    return _reduce(rows, reduction, count, lead)


def kd_loss(student_logits, teacher_logits, temperature=1.0, reduction="batchmean", backend="auto", *,
            valid=None, target=None, check_labels=True, standardize=False):
    """Hinton KD: ``T^2 * KL(softmax(teacher/T) || softmax(student/T))`` per row, reduced.

    Args:
        student_logits: ``(..., C)`` fp16/bf16/fp32/fp64 tensor; the gradient flows into it only.
        teacher_logits: a tensor shaped like ``student_logits`` (detached here), or a
            :class:`~fastkd.losses.compressed.TopKTeacher` (one built without ``label_index``
            also needs ``target``).
        temperature: ``T``, a number in ``[1e-3, 100]`` (see "Temperatures" in the module docstring).
        reduction: ``"batchmean"`` (sum over classes, mean over the rows that count), ``"sum"``
            or ``"none"`` (one value per row, shaped like the leading dimensions).
        backend: ``"auto"`` (fused Triton kernel on CUDA tensors, the PyTorch reference
            elsewhere), ``"torch"`` or ``"triton"``.
        valid: optional bool tensor shaped like the leading dimensions; rows with ``False``
            contribute 0 and are not counted, and their gradient is exactly 0, whatever they
            hold (NaN included; likewise rows labelled ``ignore_index``).
        target: only to densify a ``TopKTeacher`` built without ``label_index`` (KD itself
            reads no label: every row with ``valid`` True counts, whatever its label).
        check_labels: check that ``target`` holds classes in ``[0, C)`` (one host sync on CUDA);
            ``False`` skips it: use it only with labels validated elsewhere. An out-of-range
            label (not ``ignore_index``) is then never used as an index and never a crash: it
            makes its row's loss and gradient NaN (the row is counted), on both backends.
        standardize: logit standardisation (Sun et al. 2024, docs/methods.md): each row of
            student and teacher logits is z-scored, ``(x - mean) / (std + 1e-7)`` with the
            unbiased std over the classes, before the temperature (also on ``ats_loss`` and
            ``dkd_loss``; fused in the kernel on the Triton backend).

    Returns:
        An fp32 (fp64 for fp64 inputs on the torch backend) scalar, or per-row values.

    Raises:
        TypeError / ValueError: non-tensors, non-floating logits, mismatched shapes or devices,
        a temperature that is not a number in ``[1e-3, 100]`` (strings and bools are
        refused), an unknown reduction or backend.
        RuntimeError: ``backend="triton"`` where the kernels cannot run.

    Example::

        >>> z, v = torch.randn(8, 100, requires_grad=True), torch.randn(8, 100)
        >>> loss = fastkd.kd_loss(z, v, temperature=4.0)
        >>> loss.backward()
    """
    T = _check_temperature("temperature", temperature)
    return _kd_term("kd", student_logits, teacher_logits, target, valid, reduction, -100, backend, check_labels,
                    lambda z, v, y: ref.kd(z, v, T), standardize=standardize, temperature=T)


def ats_loss(student_logits, teacher_logits, target, tau_target=4.0, tau_other=2.0, student_temperature=1.0,
             reduction="batchmean", ignore_index=-100, backend="auto", *, valid=None, check_labels=True,
             standardize=False):
    """Asymmetric temperature scaling (Li et al. 2022), docs/methods.md §3.

    The teacher's label logit is divided by ``tau_target``, every other logit by
    ``tau_other``: ``q = softmax(v_c / tau_c)``; the student uses ``student_temperature`` s.
    Per row ``s^2 * KL(q || softmax(student/s))``. The authors' released setting: s = 1,
    tau_target / tau_other from a grid (demo 4 / 2), CE weight 0.5 and KD weight 0.5.

    Args:
        student_logits, teacher_logits: as in :func:`kd_loss` (a ``TopKTeacher`` is accepted).
        target: integer labels shaped like the leading dimensions; rows labelled
            ``ignore_index`` contribute 0 and are not counted (ATS needs the label).
        tau_target, tau_other, student_temperature: temperatures (numbers in ``[1e-3, 100]``).
        reduction, backend, valid, check_labels: as in :func:`kd_loss`.
        ignore_index: the label that skips a row (compared as int64: it applies only where the
            label dtype can hold it).

    Returns / Raises: as in :func:`kd_loss`; also a ValueError naming a label outside ``[0, C)``.

    Example::

        >>> z, v = torch.randn(8, 100, requires_grad=True), torch.randn(8, 100)
        >>> y = torch.randint(0, 100, (8,))
        >>> loss = 0.5 * fastkd.cross_entropy(z, y) + 0.5 * fastkd.ats_loss(z, v, y, tau_target=4.0, tau_other=2.0)
    """
    tt = _check_temperature("tau_target", tau_target)
    to = _check_temperature("tau_other", tau_other)
    s = _check_temperature("student_temperature", student_temperature)
    ii = _check_int("ignore_index", ignore_index)
    return _kd_term("ats", student_logits, teacher_logits, _need_target(target, "ats_loss"), valid, reduction, ii,
                    backend, check_labels, lambda z, v, y: ref.ats(z, v, y, tt, to, s, ii), standardize=standardize,
                    tau_target=tt, tau_other=to, student_temperature=s)


def isats_loss(student_logits, teacher_logits, target, tau_target=4.0, candidates=None, student_temperature=1.0,
               reduction="batchmean", ignore_index=-100, backend="auto", *, valid=None, check_labels=True):
    """Instance-specific ATS (docs/methods.md §3): ATS with a per-row ``tau_other``.

    Per row, ``tau_other`` is the candidate that maximises the variance of the teacher's
    wrong-class probabilities while keeping the label the teacher's arg-max (no candidate does:
    the largest one). No gradient flows through the choice.

    Args:
        candidates: a sequence of temperatures; ``None`` gives 16 values evenly spaced in
            ``[0.5, tau_target]``.
        Everything else: as in :func:`ats_loss`.

    Returns / Raises: as in :func:`ats_loss`.

    Example::

        >>> z, v, y = torch.randn(8, 100), torch.randn(8, 100), torch.randint(0, 100, (8,))
        >>> loss = fastkd.isats_loss(z, v, y, tau_target=4.0)
    """
    tt = _check_temperature("tau_target", tau_target)
    cands = _check_candidates(candidates, tt)
    s = _check_temperature("student_temperature", student_temperature)
    ii = _check_int("ignore_index", ignore_index)
    return _kd_term("isats", student_logits, teacher_logits, _need_target(target, "isats_loss"), valid, reduction,
                    ii, backend, check_labels, lambda z, v, y: ref.isats(z, v, y, tt, cands, s, ii),
                    tau_target=tt, candidates=cands, student_temperature=s)


def dkd_loss(student_logits, teacher_logits, target, alpha=1.0, beta=8.0, temperature=4.0,
             reduction="batchmean", ignore_index=-100, backend="auto", *, valid=None, check_labels=True,
             standardize=False):
    """Decoupled KD (Zhao et al. 2022), docs/methods.md §4: ``T^2 (alpha TCKD + beta NCKD)``.

    Computed through log-sum-exp forms on max-shifted logits (shift invariant, no log of a
    rounded probability). The warm-up weight ``min(epoch / warmup, 1)`` is applied by
    :class:`DistillLoss` (``warmup_epochs``), not here.

    Args:
        alpha, beta: weights of TCKD and NCKD (finite numbers >= 0; ``None`` is an error).
        temperature: T (a number in ``[1e-3, 100]``).
        Everything else: as in :func:`ats_loss`.

    Returns / Raises: as in :func:`ats_loss`.

    Example::

        >>> z, v, y = torch.randn(8, 100), torch.randn(8, 100), torch.randint(0, 100, (8,))
        >>> loss = fastkd.dkd_loss(z, v, y, alpha=1.0, beta=8.0, temperature=4.0)
    """
    a = _check_nonneg("alpha", alpha)
    b = _check_nonneg("beta", beta)
    T = _check_temperature("temperature", temperature)
    ii = _check_int("ignore_index", ignore_index)
    return _kd_term("dkd", student_logits, teacher_logits, _need_target(target, "dkd_loss"), valid, reduction, ii,
                    backend, check_labels, lambda z, v, y: ref.dkd(z, v, y, a, b, T, ii), standardize=standardize,
                    alpha=a, beta=b, temperature=T)


def _llm_rows(rows: Tensor, y: Optional[Tensor], ignore_index: int) -> Tensor:
    return rows if y is None else torch.where(y != ignore_index, rows, torch.zeros_like(rows))


def jsd_loss(student_logits, teacher_logits, beta=0.5, temperature=1.0, reduction="batchmean", backend="auto", *,
             target=None, ignore_index=-100, valid=None, check_labels=True):
    """Generalised Jensen-Shannon divergence (Liger-Kernel's ``beta`` convention), times ``T^2``.

    With the teacher's ``P = softmax(teacher/T)``, the student's ``Q = softmax(student/T)`` and
    ``M = beta P + (1 - beta) Q``: ``T^2 (beta KL(P || M) + (1 - beta) KL(Q || M))`` per row.
    ``beta = 0.5`` is the symmetric JSD; the end points are defined apart, as Liger does:
    ``beta = 0`` is the forward KL ``KL(P || Q)`` (:func:`kd_loss`), ``beta = 1`` the reverse KL
    ``KL(Q || P)`` (:func:`rkl_loss`). At ``T = 1`` the value is Liger's ``LigerJSD``; at other
    temperatures Liger's value is this one divided by ``T^2`` (fastkd keeps KD's ``T^2`` factor so
    that gradient magnitudes do not shrink with ``T``).

    Args:
        beta: a number in ``[0, 1]``.
        temperature: ``T`` (a number in fp32's normal range).
        target: optional token labels shaped like the leading dimensions: rows labelled
            ``ignore_index`` (-100, as Hugging Face and Liger use it) contribute 0 and are not
            counted; without ``target`` every row counts. Also needed to densify a ``TopKTeacher``.
        Everything else: as in :func:`kd_loss`.

    Returns / Raises: as in :func:`kd_loss`.

    Example::

        >>> z, v = torch.randn(8, 100, requires_grad=True), torch.randn(8, 100)
        >>> y = torch.tensor([5, 7, -100, 1, 2, 3, -100, 9])      # -100: padding / prompt tokens
        >>> loss = fastkd.jsd_loss(z, v, beta=0.5, target=y)
    """
    b = _check_fraction("beta", beta)
    T = _check_temperature("temperature", temperature)
    ii = _check_int("ignore_index", ignore_index)
    return _kd_term("jsd", student_logits, teacher_logits, target, valid, reduction, ii, backend, check_labels,
                    lambda z, v, y: _llm_rows(ref.jsd(z, v, b, T), y, ii), beta=b, temperature=T)


def rkl_loss(student_logits, teacher_logits, temperature=1.0, reduction="batchmean", backend="auto", *,
             target=None, ignore_index=-100, valid=None, check_labels=True):
    """Reverse KL: ``T^2 * KL(softmax(student/T) || softmax(teacher/T))`` per row (mode seeking).

    Args: as in :func:`jsd_loss` (without ``beta``).

    Returns / Raises: as in :func:`kd_loss`.

    Example::

        >>> z, v = torch.randn(8, 100, requires_grad=True), torch.randn(8, 100)
        >>> loss = fastkd.rkl_loss(z, v, temperature=1.0)
    """
    T = _check_temperature("temperature", temperature)
    ii = _check_int("ignore_index", ignore_index)
    return _kd_term("rkl", student_logits, teacher_logits, target, valid, reduction, ii, backend, check_labels,
                    lambda z, v, y: _llm_rows(ref.rkl(z, v, T), y, ii), temperature=T)


def dist_loss(student_logits, teacher_logits, beta=1.0, gamma=1.0, temperature=1.0, backend="auto", *,
              valid=None, target=None, check_labels=True):
    """DIST (Huang et al. 2022), docs/methods.md §5: ``tau^2 (beta * inter + gamma * intra)``.

    A scalar over the batch: the inter-class term averages row-wise Pearson correlations of the
    two softmaxes, the intra-class term column-wise ones (statistics across the whole batch).

    Args:
        beta, gamma: weights of the inter- and intra-class terms (finite numbers >= 0).
        temperature: tau (a number in ``[1e-3, 100]``).
        valid: optional row mask: only rows with ``True`` enter either term (no host sync);
            no valid row gives 0.
        backend: both backends compute the PyTorch reference formula (DIST has no fused kernel;
            ``"triton"`` says so once in the log).
        target, check_labels: only to densify a ``TopKTeacher`` built without ``label_index``.
        Everything else: as in :func:`kd_loss`.

    Returns:
        An fp32 (fp64 for fp64 inputs) scalar.

    Raises: as in :func:`kd_loss`.

    Example::

        >>> z, v = torch.randn(8, 100), torch.randn(8, 100)
        >>> valid = torch.tensor([True] * 6 + [False] * 2)   # the last two rows are padding
        >>> loss = fastkd.dist_loss(z, v, beta=1.0, gamma=1.0, valid=valid)
    """
    b = _check_nonneg("beta", beta)
    g = _check_nonneg("gamma", gamma)
    tau = _check_temperature("temperature", temperature)
    _check_logits("student_logits", student_logits)
    y_raw, _, mask = _prepare(student_logits, target, valid, -100, check_labels)
    teacher_logits = _dense_teacher(teacher_logits, student_logits, y_raw, -100, check_labels)
    z, v = _flatten(student_logits), _flatten(teacher_logits).detach()
    if _resolve_backend(backend, z) == "triton":
        _say_dist_uses_reference()
    return ref.dist(z, v, b, g, tau, valid=mask)


def cross_entropy(logits, target, label_smoothing=0.0, reduction="batchmean", ignore_index=-100, *,
                  valid=None, check_labels=True):
    """Hard-label cross-entropy with the fastkd conventions (PyTorch reference).

    ``CE = LSE(z) - sum_i t_i z_i`` with the smoothed target ``(1 - eps) e_y + eps / C``.

    Args:
        logits: ``(..., C)`` floating tensor.
        target: integer labels shaped like the leading dimensions.
        label_smoothing: eps in ``[0, 1]``.
        reduction: ``"batchmean"`` (mean over the rows that count: label not ``ignore_index``
            and ``valid`` True), ``"sum"`` or ``"none"``.
        ignore_index, valid, check_labels: as in :func:`ats_loss`.

    Returns / Raises: as in :func:`ats_loss`.

    Example::

        >>> z, y = torch.randn(8, 100), torch.randint(0, 100, (8,))
        >>> loss = fastkd.cross_entropy(z, y, label_smoothing=0.1)
    """
    _check_logits("logits", logits)
    eps = _check_smoothing(label_smoothing)
    _check_reduction(reduction)
    ii = _check_int("ignore_index", ignore_index)
    _, y, _ = _prepare(logits, _need_target(target, "cross_entropy"), valid, ii, check_labels)
    lead = tuple(logits.shape[:-1])
    z = _flatten(logits)
    return _reduce(ref.cross_entropy(z, y, eps, ii), reduction, _valid_count(y, ii), lead)


def _need_target(target, fn: str):
    if target is None:
        raise ValueError(f"{fn} needs target labels (got None)")
    return target
