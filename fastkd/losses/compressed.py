"""Compressed teacher rows: the top-K format of docs/methods.md §10.

A teacher row ``v`` (C logits) with label ``y`` is stored as the set ``S`` = the K largest
logits' class indices together with ``y``, their logits, and one fill value
``f = LSE_{c not in S}(v_c) - log(C - |S|)`` (the log-mean-exp of the absent logits). It stands
for the dense row ``v'``: ``v'_c = v_c`` for ``c in S`` and ``f`` elsewhere. At T = 1 the
softmax mass outside ``S`` is preserved exactly; at other temperatures the absent classes are
treated as equal (the compression's only error).

The label's logit is kept apart from the top-K (``label_logit``), so the label is needed to
rebuild the row: :func:`compress_topk` stores it (``label_index``), so :func:`densify` and every
loss that accepts a :class:`TopKTeacher` in place of teacher logits (``kd_loss`` and
``dist_loss`` too, which read no labels) need nothing else. A ``TopKTeacher`` built without
``label_index`` (e.g. from a teacher cache) needs the labels passed as ``target``. Rows whose
label is ``ignore_index`` (or cannot be a class: out of ``[0, C)``) store ``S`` = the top-K only.

Every loss in :mod:`fastkd.losses` accepts a :class:`TopKTeacher` wherever teacher logits go:
it is densified on the tensors' device (no host round trip, no host synchronisation) into an
``(N, C)`` fp32 row block, and the normal path runs on it. That is cheap next to the loss at
C <= 8192; above that the densified block costs ``4 N C`` bytes of device memory and one
extra write and read of it per call (at C = 128256 and N = 8192 about 4 GiB), so large-vocabulary
users should densify in chunks of rows themselves. Measured on CPU (one thread, N = 256, K = 10):
densifying takes 0.1 ms at C = 1000, 2 ms at C = 8192 and 4 ms at C = 32000, against 17, 61 and
263 ms for the torch-backend KD loss on the dense rows; not yet measured on a GPU.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

__all__ = ["TopKTeacher", "check_topk_indices", "compress_topk", "densify"]


class TopKTeacher(NamedTuple):
    """A batch of compressed teacher rows (see the module docstring).

    values: ``(N, K)`` float, the K largest logits of each row (any float dtype).
    indices: ``(N, K)`` int64, their class indices.
    label_logit: ``(N,)`` float, the logit of each row's label (unused where the label is ignored).
    fill: ``(N,)`` fp32, ``LSE`` of the absent logits minus ``log(#absent)`` (0 where none is absent).
    num_classes: C.
    label_index: ``(N,)`` int64, the class ``label_logit`` belongs to, -1 for a row without a label
        (:func:`compress_topk` fills it in); ``None``: not stored, the labels are then passed as
        ``target`` to :func:`densify` and the losses.
    """

    values: Tensor
    indices: Tensor
    label_logit: Tensor
    fill: Tensor
    num_classes: int
    label_index: Optional[Tensor] = None

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def shape(self) -> tuple:
        """The shape of the dense teacher logits this stands for: ``(N, C)``."""
        return (self.values.shape[0], int(self.num_classes))


def _label_rows(target: Tensor, C: int, ignore_index: int) -> tuple[Tensor, Tensor]:
    """(has_label (N,) bool, safe label (N,) int64): labels compared as int64 (a narrow label
    dtype that cannot hold ``ignore_index`` has no ignored rows)."""
    y = target.reshape(-1).long()
    has = (y != ignore_index) & (y >= 0) & (y < C)
    return has, torch.where(has, y, torch.zeros_like(y))


def compress_topk(teacher_logits: Tensor, target: Tensor, k: int, ignore_index: int = -100) -> TopKTeacher:
    """Compress ``(N, C)`` teacher logits to their top-``k`` (plus the label) and a fill value.

    Args:
        teacher_logits: ``(N, C)`` floating tensor (fp16, bf16, fp32 or fp64).
        target: ``(N,)`` integer labels; a row labelled ``ignore_index`` keeps its top-``k`` only.
        k: how many of the largest logits to keep, ``1 <= k <= C``.
        ignore_index: the label value that marks a row without a label.

    Returns:
        A :class:`TopKTeacher` on the logits' device; ``fill`` is computed in fp32 (fp64 for fp64
        input) as ``LSE_{c not in S}(v_c) - log(C - |S|)``; ``label_index`` holds each row's
        label (-1 where ignored), so using it needs no ``target``.

    Raises:
        TypeError / ValueError: for a non-tensor, a non-2-D or non-floating tensor, labels of the
        wrong shape or dtype, or ``k`` outside ``[1, C]``.
    """
    if not isinstance(teacher_logits, Tensor) or not teacher_logits.is_floating_point():
        raise TypeError("teacher_logits must be a floating torch.Tensor of shape (N, C)")
    if teacher_logits.dim() != 2:
        raise ValueError(f"teacher_logits must be 2-D (N, C), got shape {tuple(teacher_logits.shape)}")
    N, C = teacher_logits.shape
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= C:
        raise ValueError(f"k must be an integer in [1, {C}] (the class count), got {k!r}")
    if not isinstance(target, Tensor) or target.is_floating_point() or target.dtype == torch.bool:
        raise TypeError("target must be an integer torch.Tensor of class indices")
    if tuple(target.shape) != (N,):
        raise ValueError(f"target shape {tuple(target.shape)} does not match the teacher's {N} rows")
    v = teacher_logits.detach()
    values, indices = v.topk(k, dim=-1)
    has, y = _label_rows(target.to(v.device), C, ignore_index)
    label_logit = v.gather(-1, y[:, None]).squeeze(-1)
    acc = torch.float64 if v.dtype == torch.float64 else torch.float32
    in_s = torch.zeros((N, C), dtype=torch.bool, device=v.device)
    in_s.scatter_(-1, indices, True)
    in_s.scatter_(-1, y[:, None], has[:, None] | in_s.gather(-1, y[:, None]))
    absent = C - in_s.sum(-1)
    lse = torch.logsumexp(torch.where(in_s, torch.full((), -math.inf, dtype=acc, device=v.device), v.to(acc)), -1)
    fill = torch.where(absent > 0, lse - absent.clamp_min(1).to(acc).log(), torch.zeros_like(lse))
    label_index = torch.where(has, y, torch.full_like(y, -1))
    return TopKTeacher(values, indices.long(), label_logit, fill, int(C), label_index)


def densify(t: TopKTeacher, target: Optional[Tensor] = None, ignore_index: int = -100, *,
            check_indices: bool = True) -> Tensor:
    """The dense ``(N, C)`` teacher row block ``v'`` that ``t`` stands for, on ``t``'s device.

    ``v'_c`` is the stored logit for ``c`` in the top-K or the (non-ignored) label, and the
    row's fill value elsewhere. fp32 (fp64 if ``t`` holds fp64 values). No host round trip.
    The label comes from ``t.label_index`` when ``t`` carries it (``target`` and
    ``ignore_index`` are then not read: the stored index is the one ``label_logit`` belongs
    to), else from ``target`` (integer labels, rows labelled ``ignore_index`` have none).
    ``check_indices``: refuse class indices outside ``[0, C)`` (:func:`check_topk_indices`, one
    host sync on CUDA); without the check such an index reaches ``scatter_`` (a device assert on CUDA).
    """
    check_topk(t)
    if check_indices:
        check_topk_indices(t)
    N, C = t.shape
    if t.label_index is None:
        if not isinstance(target, Tensor) or target.is_floating_point() or target.dtype == torch.bool:
            raise TypeError("densifying a TopKTeacher built without label_index needs integer labels (target): "
                            "the label's logit is stored apart from the top-K")
        if target.numel() != N:
            raise ValueError(f"target holds {target.numel()} labels; the TopKTeacher has {N} rows")
    dtype = torch.float64 if torch.float64 in (t.values.dtype, t.fill.dtype) else torch.float32
    out = t.fill.to(dtype)[:, None].expand(N, C).clone()
    out.scatter_(-1, t.indices, t.values.to(dtype))
    if t.label_index is not None:
        has = t.label_index >= 0
        y = torch.where(has, t.label_index, torch.zeros_like(t.label_index))
    else:
        has, y = _label_rows(target.to(out.device), C, ignore_index)
    # Rows without a label rewrite their first top-K entry with its own value: no host sync.
    idx = torch.where(has, y, t.indices[:, 0])
    src = torch.where(has, t.label_logit.to(dtype), t.values[:, 0].to(dtype))
    out.scatter_(-1, idx[:, None], src[:, None])
    return out


def check_topk(t: TopKTeacher) -> None:
    """Clear errors for a malformed :class:`TopKTeacher`."""
    if not isinstance(t, TopKTeacher):
        raise TypeError(f"expected a TopKTeacher, got {type(t).__name__}")
    v, i = t.values, t.indices
    if not (isinstance(v, Tensor) and v.is_floating_point() and v.dim() == 2):
        raise ValueError("TopKTeacher.values must be a floating (N, K) tensor")
    if not (isinstance(i, Tensor) and i.dtype == torch.int64 and tuple(i.shape) == tuple(v.shape)):
        raise ValueError(f"TopKTeacher.indices must be an int64 tensor shaped like values {tuple(v.shape)}")
    N = v.shape[0]
    for name in ("label_logit", "fill"):
        x = getattr(t, name)
        if not (isinstance(x, Tensor) and x.is_floating_point() and tuple(x.shape) == (N,)):
            raise ValueError(f"TopKTeacher.{name} must be a floating ({N},) tensor")
    if not all(x.device == v.device for x in (i, t.label_logit, t.fill)):
        raise ValueError("TopKTeacher's tensors must live on one device")
    C = t.num_classes
    if isinstance(C, bool) or not isinstance(C, int) or C < 2 or v.shape[1] > C:
        raise ValueError(f"TopKTeacher.num_classes must be an int >= max(2, K), got {C!r}")
    _check_label_index(t)


def _check_label_index(t: TopKTeacher) -> None:
    li = t.label_index
    if li is None:
        return
    N = t.values.shape[0]
    if not (isinstance(li, Tensor) and li.dtype == torch.int64 and tuple(li.shape) == (N,)):
        raise ValueError(f"TopKTeacher.label_index must be None or an int64 ({N},) tensor (-1: no label)")
    if li.device != t.values.device:
        raise ValueError("TopKTeacher's tensors must live on one device")


def check_topk_indices(t: TopKTeacher) -> None:
    """Refuse a :class:`TopKTeacher` whose class indices fall outside ``[0, num_classes)``.

    One reduction and one host read (a synchronisation on CUDA): the losses run it when
    ``check_labels=True`` (the default), as they check the labels' range. ``ValueError`` names
    the first offending row and index.
    """
    i = t.indices
    if i.numel() == 0:
        return
    C = int(t.num_classes)
    lo, hi = (int(x) for x in torch.stack([i.min(), i.max()]).tolist())
    if lo < 0 or hi >= C:
        bad = (i < 0) | (i >= C)
        row = int(bad.any(-1).nonzero()[0])
        value = int(i[row][bad[row]][0])
        raise ValueError(f"TopKTeacher.indices row {row} holds class index {value}, outside [0, {C}) "
                         f"(num_classes={C}): damaged or mismatched top-K rows")
