"""Fused linear distillation: the loss of a language model's head from its hidden states, the
``N x V`` student logits never materialised.

``fused_linear_distill(hidden, weight, teacher, labels, method=...)`` equals
``DistillLoss(method, **params)(hidden @ weight.T + bias, teacher_logits, labels)`` in value and in
its gradients with respect to ``hidden``, ``weight`` and ``bias``, but the rows go through in
chunks of ``chunk_size``: per chunk, the student logits ``h_c W^T + b`` are formed, the loss and
its gradient with respect to those logits are computed at once (the fused KD + CE kernel on the
Triton backend; on the torch backend, the PyTorch reference's autograd on an eighth of the chunk's
rows at a time, its gradient written over the chunk's logits) and turned into the chunk's share of the parameter gradients::

    grad_hidden[c] = grad_logits_c @ W          grad_W += grad_logits_c^T @ h_c          grad_b += sum(grad_logits_c)

then the chunk's logits are dropped. At most ``chunk_size x V`` student logits (and as many
teacher logits, for a teacher given as hidden states and a head) exist at once, on both backends.
All gradients are computed in the forward pass (as Liger-Kernel's fused-linear losses do) and
scaled by ``grad_output`` in the backward pass; ``weight``'s gradient is an ordinary autograd
gradient, so DDP's and FSDP's hooks see it like any other.

The batchmean denominator is the count of labelled rows (label != ``ignore_index``) of the whole
batch, not of a chunk: it is counted once (one host synchronisation per call, as Liger's
fused-linear cross-entropy does) and folded into the loss weights, so each chunk's gradient is
written already scaled. Rows labelled ``ignore_index`` (-100: padding and prompt tokens, as
Hugging Face and Liger use it) count for nothing, in every method.

Precision: the logits are formed in the input dtype (bf16 hidden states and weights give bf16
logits, as ``nn.Linear`` would), the loss and its gradient with respect to the logits in fp32
(rounded once to the logits' dtype, as autograd does), the GEMMs accumulate in fp32 inside, and
the weight and bias gradients are accumulated across chunks in fp32 buffers and returned in the
parameters' dtype.

Default chunk size (Liger-Kernel's rule for its fused-linear cross-entropy): ``next_pow2(ceil(N /
ceil(V / H)))`` rows, so that a chunk's ``chunk x V`` logits are about as large as the ``N x H``
hidden states themselves (at N = 8192, H = 4096, V = 128256: 256 rows, 33 M logits), but never
fewer than 4 M logits per chunk (``CHUNK_MIN_LOGITS``; 131 rows at V = 32000) nor more than N
rows: see :func:`default_chunk_size`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from . import functional as F
from . import methods as M
from . import reference as ref
from .compressed import TopKTeacher, check_topk, densify
from .module import DistillLoss

__all__ = ["fused_linear_distill", "FusedLinearDistillLoss", "default_chunk_size"]


CHUNK_MIN_LOGITS = 1 << 22  # the smallest chunk the default gives: 4 M logits (16 MB in fp32)


def default_chunk_size(N: int, H: int, V: int) -> int:
    """Rows per chunk: Liger-Kernel's rule ``next_pow2(ceil(N / ceil(V / H)))`` (chunk x V ~ N x H),
    but at least ``CHUNK_MIN_LOGITS / V`` rows and at most N. The floor matters for small H: at
    H = 256, V = 32000 Liger's rule gives 128-row chunks at N = 8192 but 16-row ones at N = 1024,
    and such thin chunks ran 5x slower than 128-row ones on a CPU (per-chunk overheads)."""
    inc = max(1, -(-V // max(H, 1)))
    rows = max(1, -(-N // inc))
    liger = 1 << (rows - 1).bit_length()
    return max(1, min(N, max(liger, CHUNK_MIN_LOGITS // V)))


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
def _check_matrix(name: str, x, dims: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in F.FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {x.dtype}")
    if x.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(x.shape)}")


def _check_head(prefix: str, hidden, weight, bias) -> tuple:
    _check_matrix(f"{prefix}hidden", hidden, 2)
    _check_matrix(f"{prefix}weight", weight, 2)
    N, H = hidden.shape
    V, H2 = weight.shape
    if H != H2:
        raise ValueError(f"{prefix}hidden has {H} features but {prefix}weight is {tuple(weight.shape)} "
                         f"(V, H) as in nn.Linear: expected H = {H}")
    if V < 2:
        raise ValueError(f"{prefix}weight has {V} output class(es); at least 2 are needed")
    if bias is not None:
        _check_matrix(f"{prefix}bias", bias, 1)
        if bias.shape[0] != V:
            raise ValueError(f"{prefix}bias has {bias.shape[0]} entries; {prefix}weight has V = {V} rows")
    devices = {t.device for t in (hidden, weight, bias) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"device mismatch: {prefix}hidden, {prefix}weight and {prefix}bias must share one device, "
                         f"got {', '.join(str(d) for d in devices)}")
    return N, H, V


class _Teacher:
    """The teacher in one of its three forms, cut into row chunks on demand."""

    def __init__(self, teacher, N: int, V: int, device, labels: Optional[Tensor], ignore_index: int):
        self.kind = None
        if isinstance(teacher, TopKTeacher):
            check_topk(teacher)
            if teacher.shape != (N, V):
                raise ValueError(f"TopKTeacher stands for teacher logits {teacher.shape}; the student's are ({N}, {V})")
            if labels is None:
                raise ValueError("a TopKTeacher needs labels (its label logit is stored apart from the top-K)")
            self.kind = "topk"
        elif isinstance(teacher, Tensor):
            F._check_logits("teacher_logits", teacher)
            if tuple(teacher.shape) != (N, V):
                raise ValueError(f"teacher logits must be (N, V) = ({N}, {V}), got {tuple(teacher.shape)}")
            self.kind = "dense"
            teacher = teacher.detach()
        elif isinstance(teacher, (tuple, list)) and len(teacher) in (2, 3):
            th, tw = teacher[0], teacher[1]
            tb = teacher[2] if len(teacher) == 3 else None
            tn, _, tv = _check_head("teacher_", th, tw, tb)
            if (tn, tv) != (N, V):
                raise ValueError(f"the teacher's head gives ({tn}, {tv}) logits; the student's are ({N}, {V})")
            self.kind = "head"
            teacher = (th.detach(), tw.detach(), tb.detach() if tb is not None else None)
        else:
            raise TypeError("teacher must be (N, V) logits, a TopKTeacher, or a tuple (teacher_hidden, "
                            f"teacher_weight[, teacher_bias]), got {type(teacher).__name__}")
        dev = teacher.device if self.kind == "topk" else (teacher[0].device if self.kind == "head" else teacher.device)
        if dev != device:
            raise ValueError(f"device mismatch: the student on {device}, the teacher on {dev}")
        self.t, self.ii = teacher, ignore_index

    def rows(self, lo: int, hi: int, labels: Optional[Tensor]) -> Tensor:
        if self.kind == "dense":
            return self.t[lo:hi]
        if self.kind == "head":
            th, tw, tb = self.t
            with torch.no_grad():
                return nn.functional.linear(th[lo:hi], tw, tb)
        t = self.t
        part = TopKTeacher(t.values[lo:hi], t.indices[lo:hi], t.label_logit[lo:hi], t.fill[lo:hi], t.num_classes)
        return densify(part, labels[lo:hi], self.ii)


# --------------------------------------------------------------------------------------------
# The chunked forward (loss and every gradient)
# --------------------------------------------------------------------------------------------
REF_SPLIT = 8  # the torch backend runs its reference on an eighth of a chunk's rows at a time


def _chunk_loss_and_grad(z: Tensor, v: Optional[Tensor], y: Optional[Tensor], crit: DistillLoss, method: str,
                         ce_w: float, kd_w: float, kd_params: dict, backend: str, want_grad: bool):
    """(sum of the chunk's weighted row losses, fp32 (fp64) scalar; d sum / d z or None). The weights
    already hold the batchmean 1/count.

    The torch backend overwrites ``z`` with its gradient, and runs the reference's autograd on
    ``REF_SPLIT`` row blocks of the chunk in turn: the reference keeps about fifteen logits-sized
    temporaries for its backward, so a whole chunk at once would hold fifteen chunks of memory
    (every row's loss and gradient is the same either way; only the sum's order changes)."""
    ii = crit.ignore_index
    if backend == "triton":
        zl = z.detach().requires_grad_(want_grad)
        with torch.enable_grad():  # autograd.Function.forward runs with grad mode off
            loss, _ = F._fused(zl, v, y, method=method, ce_weight=ce_w, kd_weight=kd_w,
                               label_smoothing=crit.label_smoothing, ignore_index=ii, reduction="sum", **kd_params)
        if not want_grad:
            return loss.detach(), None
        (g,) = torch.autograd.grad(loss, zl)  # the gradient the kernel wrote in forward (grad_output 1: no pass)
        return loss.detach(), g
    total = torch.zeros((), dtype=ref.upcast(z[:0]).dtype, device=z.device)
    step = max(1, -(-z.shape[0] // REF_SPLIT))
    for a in range(0, z.shape[0], step):
        b = a + step
        part, g = _reference_loss_and_grad(z[a:b], v[a:b] if v is not None else None,
                                           y[a:b] if y is not None else None, crit, method, ce_w, kd_w, kd_params,
                                           want_grad)
        total += part
        if want_grad:
            z[a:b] = g  # these rows' logits are no longer needed
    return total, (z if want_grad else None)


def _reference_loss_and_grad(z: Tensor, v: Optional[Tensor], y: Optional[Tensor], crit: DistillLoss, method: str,
                             ce_w: float, kd_w: float, kd_params: dict, want_grad: bool):
    ii = crit.ignore_index
    zl = z.detach().requires_grad_(want_grad)
    with torch.enable_grad() if want_grad else torch.no_grad():
        zf = ref.upcast(zl)
        if y is None:
            total = torch.zeros((), dtype=zf.dtype, device=z.device)
        else:
            total = ce_w * ref.cross_entropy(zf, y, crit.label_smoothing, ii).sum() if ce_w != 0 else 0.0
        if method != "ce" and kd_w != 0:
            if y is None:
                rows = (ref.kd(zf, v, kd_params["temperature"]) if method == "kd"
                        else ref.jsd(zf, v, kd_params["beta"], kd_params["temperature"]) if method == "jsd"
                        else ref.rkl(zf, v, kd_params["temperature"]))
            else:
                rows = ref.kd_term_rows(method, zf, v, y, ii, **kd_params)
            total = total + kd_w * rows.sum()
        if not isinstance(total, Tensor):
            total = torch.zeros((), dtype=zf.dtype, device=z.device)
    if not want_grad or not total.requires_grad:
        return total.detach(), (torch.zeros_like(z) if want_grad else None)
    (g,) = torch.autograd.grad(total, zl)
    return total.detach(), g


def _forward(hidden, weight, bias, teacher: _Teacher, labels, crit: DistillLoss, chunk: int, backend: str,
             needs: tuple):
    N, _ = hidden.shape
    V = weight.shape[0]
    ii = crit.ignore_index
    method = crit.method
    kd_w_eff = crit.effective_kd_weight()
    if labels is None:
        count = N
    else:
        count = int((labels != ii).sum())  # one host synchronisation per call
    inv = 1.0 / max(count, 1)
    ce_w = crit.ce_weight * inv if labels is not None else 0.0
    kd_w = kd_w_eff * inv
    use_method = method if kd_w_eff > 0 else "ce"
    kd_params = {k: val for k, val in crit.params.items() if k != "warmup_epochs"} if use_method != "ce" else {}
    if use_method == "ce" and labels is None:
        raise ValueError("nothing to compute: no labels (no CE) and a zero distillation weight")
    need_h, need_w, need_b = needs
    want = need_h or need_w or need_b
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
    grad_b = torch.zeros(V, dtype=acc, device=weight.device) if need_b else None
    total = torch.zeros((), dtype=torch.float64 if hidden.dtype == torch.float64 else torch.float32,
                        device=hidden.device)
    h_all, w_all = hidden.detach(), weight.detach()
    b_all = bias.detach() if bias is not None else None
    for lo in range(0, N, chunk):
        hi = min(lo + chunk, N)
        h = h_all[lo:hi]
        z = nn.functional.linear(h, w_all, b_all)  # (chunk, V) in the input dtype
        v = teacher.rows(lo, hi, labels) if use_method != "ce" else None
        y = labels[lo:hi] if labels is not None else None
        part, g = _chunk_loss_and_grad(z, v, y, crit, use_method, ce_w, kd_w, kd_params, backend, want)
        total += part.to(total.dtype)
        del z, v
        if g is None:
            continue
        g = g.to(hidden.dtype)
        if need_h:
            grad_h[lo:hi] = g @ w_all
        if need_w:
            grad_w.add_(g.t() @ h)  # the chunk's product in the input dtype, added into fp32 (no fp32 copy)
        if need_b:
            grad_b += g.sum(0, dtype=acc)
        del g
    return (total.float() if hidden.dtype != torch.float64 else total, grad_h,
            grad_w.to(weight.dtype) if grad_w is not None else None,
            grad_b.to(bias.dtype) if grad_b is not None else None)


class _FusedLinearDistillFunction(torch.autograd.Function):
    """loss = f(hidden, weight, bias); every gradient computed in forward, scaled in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, run):
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        loss, gh, gw, gb = run(hidden, weight, bias, needs)
        ctx.save_for_backward(gh, gw, gb)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():
            # create_graph=True: the gradients were computed in forward and have no graph of their
            # own, so a second derivative would silently be 0. Refuse instead.
            raise RuntimeError("fastkd fused_linear_distill: higher-order gradients (create_graph=True) are not "
                               "supported; compute the logits and use DistillLoss(backend='torch') for them")
        gh, gw, gb = ctx.saved_tensors

        one = torch.equal(grad_out, torch.ones_like(grad_out))  # Liger's shortcut (one host sync)

        def scaled(g):
            return g if g is None or one else g * grad_out.to(g.dtype)

        return scaled(gh), scaled(gw), scaled(gb), None


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
_DISTILL_KEYS = ("ce_weight", "kd_weight", "label_smoothing", "check_labels")


def _make_criterion(method, ignore_index, backend, params) -> DistillLoss:
    if method not in M.METHOD_TABLE:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(M.METHODS)}")
    if not M.METHOD_TABLE[method].row_local:
        raise ValueError(f"method {method!r} is a batch-level term (its statistics span every row): it has no "
                         "chunked, fused-linear form; compute the logits and use DistillLoss")
    return DistillLoss(method, ignore_index=ignore_index, backend=backend, **params)


def _run(crit: DistillLoss, hidden, weight, teacher, labels, bias, chunk_size):
    N, H, V = _check_head("", hidden, weight, bias)
    ii = crit.ignore_index
    if labels is not None:
        if not isinstance(labels, Tensor):
            raise TypeError(f"labels must be a torch.Tensor of class indices, got {type(labels).__name__}")
        if labels.dim() != 1 or labels.shape[0] != N:
            raise ValueError(f"labels must be (N,) = ({N},) to match hidden (N, H) = {tuple(hidden.shape)}, "
                             f"got {tuple(labels.shape)} (flatten (B, T) first, shifted as the model predicts)")
        labels = F._labels(labels, hidden.new_empty((N, 0)))  # dtype and device checks; int64
        if crit.check_labels:
            F._check_label_range(labels, V, ii)
    else:
        if M.METHOD_TABLE[crit.method].needs_labels or crit.method == "ce":
            raise ValueError(f"method {crit.method!r} needs labels")
        if crit.ce_weight != 0:
            raise ValueError("labels=None computes no cross-entropy: pass ce_weight=0 (every row then counts)")
    t = _Teacher(teacher, N, V, hidden.device, labels, ii) if crit.method != "ce" else None
    if chunk_size is None:
        chunk = default_chunk_size(N, H, V)
    else:
        chunk = F._check_int("chunk_size", chunk_size)
        if chunk < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
    backend = F._resolve_backend(crit.backend, hidden)

    def run(h, w, b, needs):
        return _forward(h, w, b, t, labels, crit, chunk, backend, needs)

    if not torch.is_grad_enabled():
        return run(hidden, weight, bias, (False, False, False))[0]
    return _FusedLinearDistillFunction.apply(hidden, weight, bias, run)


def fused_linear_distill(hidden, weight, teacher, labels=None, *, method="kd", bias=None, chunk_size=None,
                         ignore_index=-100, backend="auto", **method_params):
    """A distillation loss from a language model's hidden states, its head never forming ``N x V`` logits.

    Equals ``fastkd.DistillLoss(method, **method_params)(hidden @ weight.T + bias, teacher_logits,
    labels)`` in value and in the gradients with respect to ``hidden``, ``weight`` and ``bias``
    (the same batchmean over the labelled rows of the whole batch, the same ignored rows), computed
    in chunks of ``chunk_size`` rows (see :mod:`fastkd.losses.linear`).

    Args:
        hidden: ``(N, H)`` student hidden states (flatten ``(B, T, H)`` and shift as the model
            predicts, Hugging Face style); fp32, bf16 or fp16 (fp64 on the torch backend).
        weight: ``(V, H)`` the head's weight, as ``nn.Linear.weight``.
        teacher: ``(N, V)`` teacher logits, a :class:`~fastkd.losses.compressed.TopKTeacher`
            (needs ``labels``), or a tuple ``(teacher_hidden, teacher_weight[, teacher_bias])``
            whose logits are formed chunk by chunk too (no gradient flows into the teacher).
        labels: ``(N,)`` token labels; ``ignore_index`` (-100) marks rows that count for nothing
            (padding, prompt tokens). ``None``: every row counts and there is no CE (then
            ``ce_weight=0`` is required, and the method must not need labels).
        method: a row-local method of :data:`fastkd.losses.methods.METHOD_TABLE`: ``"kd"``,
            ``"jsd"``, ``"rkl"``, ``"ats"``, ``"isats"``, ``"dkd"`` or ``"ce"``.
        bias: ``(V,)`` or None.
        chunk_size: rows per chunk (default: :func:`default_chunk_size`: Liger's rule, at least
            4 M logits per chunk).
        ignore_index, backend: as in :class:`~fastkd.losses.DistillLoss` (``"auto"``: the fused
            Triton kernel on CUDA tensors, the PyTorch reference elsewhere; both chunk).
        **method_params: :class:`~fastkd.losses.DistillLoss`'s keywords (``ce_weight``,
            ``kd_weight``, ``label_smoothing``, ``check_labels``) and the method's parameters
            (``temperature``, ``beta``, ...).

    Returns:
        An fp32 scalar (fp64 for fp64 inputs on the torch backend), differentiable with respect
        to ``hidden``, ``weight`` and ``bias`` (ordinary autograd gradients: DDP / FSDP hooks see
        ``weight.grad`` as usual). All gradients are computed in this call, so it costs about
        two more GEMMs than the forward alone; under ``torch.no_grad()`` only the loss is computed.

    Example::

        >>> head = torch.nn.Linear(64, 1000, bias=False)
        >>> h = torch.randn(32, 64, requires_grad=True)
        >>> v = torch.randn(32, 1000)                     # teacher logits
        >>> y = torch.randint(0, 1000, (32,)); y[:4] = -100
        >>> loss = fastkd.fused_linear_distill(h, head.weight, v, y, method="jsd", beta=0.5,
        ...                                    ce_weight=0.5, kd_weight=0.5)
        >>> loss.backward()                               # head.weight.grad, h.grad
    """
    crit = _make_criterion(method, ignore_index, backend, method_params)
    return _run(crit, hidden, weight, teacher, labels, bias, chunk_size)


class FusedLinearDistillLoss(nn.Module):
    """:func:`fused_linear_distill` as a module: ``FusedLinearDistillLoss(method, **params)``.

    ``params`` are :class:`~fastkd.losses.DistillLoss`'s (``ce_weight``, ``kd_weight``,
    ``label_smoothing``, ``ignore_index``, ``backend``, ``check_labels`` and the method's
    parameters) plus ``chunk_size``. ``forward(hidden, weight, teacher, labels=None, bias=None)``.
    ``set_epoch`` feeds DKD's warm-up weight, as in ``DistillLoss``.

    Example::

        >>> crit = fastkd.FusedLinearDistillLoss("rkl", ce_weight=0.0, kd_weight=1.0)
        >>> loss = crit(h, lm_head.weight, teacher_logits, labels)
    """

    def __init__(self, method="kd", *, chunk_size=None, ignore_index=-100, backend="auto", **params):
        super().__init__()
        if chunk_size is not None:
            c = F._check_int("chunk_size", chunk_size)
            if c < 1:
                raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
        self.chunk_size = chunk_size
        self.criterion = _make_criterion(method, ignore_index, backend, params)

    @property
    def method(self) -> str:
        return self.criterion.method

    @property
    def params(self) -> dict:
        return self.criterion.params

    def set_epoch(self, epoch: float) -> None:
        self.criterion.set_epoch(epoch)

    def extra_repr(self) -> str:
        return self.criterion.extra_repr() + f", chunk_size={self.chunk_size}"

    def forward(self, hidden: Tensor, weight: Tensor, teacher, labels: Optional[Tensor] = None,
                bias: Optional[Tensor] = None) -> Tensor:
        return _run(self.criterion, hidden, weight, teacher, labels, bias, self.chunk_size)
