"""``DistillLoss``: ``ce_weight * CE + kd_weight * KD-term`` as one ``nn.Module``.

This is what the engine uses. On CUDA tensors (backend ``triton``) the row-local methods
(ce, kd, ats, isats, dkd) compute loss and gradient in one fused kernel launch (a ``valid``
mask adds one small elementwise op folding it into the labels; the label check, unless
``check_labels=False``, adds a reduction and one host sync); DIST is a batch-level term
computed with the PyTorch reference. Reading ``last_terms`` after a fused call costs a few
more small device reductions (it is reduced lazily, only when read).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from . import functional as F
from . import methods as M
from . import reference as ref

METHODS = M.METHODS

# Method -> its parameters and their defaults (the same names as the functional API), derived
# from the one table in :mod:`fastkd.losses.methods`.
METHOD_PARAMS = {name: M.defaults(name) for name in METHODS}


class DistillLoss(nn.Module):
    """Weighted hard-label CE plus a distillation term.

    ``loss = ce_weight * CE + kd_weight * w * KD`` where ``w`` is DKD's warm-up weight
    ``min(epoch / warmup_epochs, 1)`` (1 for every other method; set the epoch with
    :meth:`set_epoch`).

    Args:
        method: ``"ce"`` (no teacher), ``"kd"``, ``"ats"``, ``"isats"``, ``"dkd"`` or ``"dist"``
            (see :data:`fastkd.losses.methods.METHOD_TABLE` for each one's parameters).
        ce_weight, kd_weight: the weights (finite, >= 0). The defaults 0.5 / 0.5 are the
            ImageNet KD setting and the ATS authors' released one (CE 0.5, KD 0.5, student
            temperature 1, in every released script).
        label_smoothing: eps of the CE term, in ``[0, 1]``.
        ignore_index: the label that marks a row without a label (compared as int64: it
            applies only where the label dtype can hold it).
        backend: ``"auto"`` (fused Triton kernel on CUDA tensors, the PyTorch reference
            elsewhere, said once in the log), ``"torch"`` or ``"triton"``.
        check_labels: check that labels are in ``[0, C)`` (one device-to-host sync per call on
            CUDA). ``False`` skips it: use it only with labels validated elsewhere (the engine
            validates its data set once). An out-of-range label (not ``ignore_index``) is then
            never used as an index and never a crash: its row's loss and gradient are NaN, on
            both backends. The same check covers a ``TopKTeacher``'s class indices (outside
            ``[0, C)``: ``ValueError``).
        **method_params: the method's parameters (temperature, tau_target, tau_other,
            student_temperature, candidates, alpha, beta, gamma, warmup_epochs); unknown
            names for the method are an error.

    Row convention (differs from mdistiller and torchdistill): rows whose label is
    ``ignore_index`` are skipped by CE *and by every KD term* (also plain ``"kd"``), and both
    terms are averaged over the labelled rows. mdistiller and torchdistill skip ignored rows
    in CE only and average their KD term over all rows. To get theirs, compute the KD term
    with the functional API, which for ``kd_loss`` averages over all rows::

        ce = fastkd.cross_entropy(z, y)                 # mean over labelled rows
        kd = fastkd.kd_loss(z, v, temperature=T)        # mean over all rows
        loss = ce_weight * ce + kd_weight * kd

    DIST, a batch-level term, uses every row with ``valid`` True, labelled or not.

    ``forward(student_logits, teacher_logits, target, valid=None)``:
        ``teacher_logits`` may be ``None`` when the method is ``"ce"`` or ``kd_weight`` is 0,
        or a :class:`~fastkd.losses.compressed.TopKTeacher` (densified on the device).
        ``valid`` is an optional ``(N,)`` bool row mask (e.g. the padding rows of a sharded
        epoch's last batch are ``False``): such rows contribute nothing to any term and are
        not counted in any denominator, for every method; like rows labelled ``ignore_index``
        their gradient is exactly 0 whatever they hold (NaN included). A batch without a counted row gives
        0 and a zero gradient. Returns an fp32 scalar (fp64 for fp64 inputs on the torch
        backend).

    Raises:
        ValueError / TypeError: an unknown method, backend or parameter, a parameter of the
        wrong type or range (temperatures: numbers in [1e-3, 100]; strings and bools
        refused), and at call time mismatched shapes, devices or labels.

    ``last_terms`` holds the detached batch means ``{"ce": ..., "kd": ...}`` of the last call
    (device tensors, no host synchronisation). On the fused path they are reduced only when
    read: the loss itself is one kernel launch, and reading ``last_terms`` adds a few small
    reductions (two sums and the count of labelled rows) on the device.

    Example::

        >>> crit = fastkd.DistillLoss("dkd", ce_weight=1.0, kd_weight=1.0, beta=2.0, warmup_epochs=1)
        >>> crit.set_epoch(0.5)                       # DKD warm-up weight 0.5
        >>> z = torch.randn(8, 100, requires_grad=True)
        >>> v, y = torch.randn(8, 100), torch.randint(0, 100, (8,))
        >>> valid = torch.tensor([True] * 6 + [False] * 2)   # two padding rows
        >>> loss = crit(z, v, y, valid=valid)
        >>> loss.backward()
        >>> {k: float(t) for k, t in crit.last_terms.items()}   # batch means of CE and DKD
    """

    def __init__(self, method="kd", ce_weight=0.5, kd_weight=0.5, label_smoothing=0.0, ignore_index=-100,
                 backend="auto", check_labels: bool = True, **method_params):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
        table = M.params_for(method)
        allowed = [p.name for p in table]
        unknown = sorted(set(method_params) - set(allowed))
        if unknown:
            raise ValueError(
                f"unknown parameter(s) {', '.join(unknown)} for method {method!r}; "
                f"it takes {', '.join(allowed) or 'none'}"
            )
        if backend not in F.BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(F.BACKENDS)}")
        self.method = method
        self.ce_weight = F._check_nonneg("ce_weight", ce_weight)
        self.kd_weight = F._check_nonneg("kd_weight", kd_weight)
        self.label_smoothing = F._check_smoothing(label_smoothing)
        self.ignore_index = F._check_int("ignore_index", ignore_index)
        self.backend = backend
        F._resolve_checks(check_labels)
        self.check_labels = check_labels
        given = {**M.defaults(method), **method_params}
        params = {}
        for p in table:  # table order: tau_target is checked before ISATS' candidates need it
            params[p.name] = F.check_param(p.kind, p.name, given[p.name], params)
        self.params = params
        self.epoch = 0.0
        self._last_terms: dict[str, Tensor] = {}
        self._last_parts = None

    @property
    def last_terms(self) -> dict:
        """Detached batch means ``{"ce": ..., "kd": ...}`` of the last call (device tensors)."""
        if self._last_parts is not None:
            parts, y = self._last_parts
            count = F._valid_count(y, self.ignore_index).clamp_min(1)
            self._last_terms = {"ce": parts["ce"].sum() / count, "kd": parts["kd"].sum() / count}
            self._last_parts = None
        return self._last_terms

    @last_terms.setter
    def last_terms(self, value: dict) -> None:
        self._last_terms, self._last_parts = value, None

    def extra_repr(self) -> str:
        p = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return (f"method={self.method!r}, ce_weight={self.ce_weight}, kd_weight={self.kd_weight}, "
                f"label_smoothing={self.label_smoothing}, backend={self.backend!r}" + (f", {p}" if p else ""))

    def set_epoch(self, epoch: float) -> None:
        """Set the (possibly fractional) epoch, used by DKD's warm-up weight (a finite number)."""
        e = F._number("epoch", epoch)
        if not math.isfinite(e):
            raise ValueError(f"epoch must be a finite number, got {epoch!r}")
        self.epoch = e

    @property
    def needs_teacher(self) -> bool:
        return self.method != "ce" and self.kd_weight > 0

    def effective_kd_weight(self) -> float:
        if self.method == "ce":
            return 0.0
        w = self.kd_weight
        if self.method == "dkd":
            w *= ref.dkd_warmup_weight(self.epoch, self.params["warmup_epochs"])
        return w

    def forward(self, student_logits: Tensor, teacher_logits, target: Tensor, valid: Optional[Tensor] = None) -> Tensor:
        kd_w = self.effective_kd_weight()
        ii = self.ignore_index
        F._check_logits("student_logits", student_logits)
        if target is None:
            raise ValueError("DistillLoss needs target labels (got None)")
        y_raw, y, mask = F._prepare(student_logits, target, valid, ii, self.check_labels)
        if teacher_logits is None:
            if self.needs_teacher:
                raise ValueError(f"method {self.method!r} with kd_weight={self.kd_weight} needs teacher_logits")
        elif kd_w == 0 and isinstance(teacher_logits, F.TopKTeacher):
            teacher_logits = None  # unused (ce, zero weight, DKD warm-up at 0): not densified
        else:
            teacher_logits = F._dense_teacher(teacher_logits, student_logits, y_raw, ii, self.check_labels)
        z = F._flatten(student_logits)
        v = F._flatten(teacher_logits).detach() if teacher_logits is not None else None
        backend = F._resolve_backend(self.backend, z)

        if self.method == "dist":
            ce = self._ce(z, y, backend)
            if v is None or kd_w == 0:
                kd = torch.zeros((), device=z.device, dtype=ce.dtype)
            else:
                if backend == "triton":
                    F._say_dist_uses_reference()
                p = self.params
                kd = ref.dist(z, v, p["beta"], p["gamma"], p["temperature"], valid=mask)
            self.last_terms = {"ce": ce.detach(), "kd": kd.detach()}
            # A zero weight drops its term (0 * inf = NaN otherwise), as the fused kernel does.
            return kd_w * kd if self.ce_weight == 0 and kd_w != 0 else self.ce_weight * ce + kd_w * kd

        method = self.method if (v is not None and kd_w > 0) else "ce"
        kd_params = {k: v_ for k, v_ in self.params.items() if k != "warmup_epochs"} if method != "ce" else {}
        if backend == "triton":
            loss, parts = F._fused(z, v if method != "ce" else None, y, method=method, ce_weight=self.ce_weight,
                                   kd_weight=kd_w if method != "ce" else 0.0, label_smoothing=self.label_smoothing,
                                   ignore_index=ii, reduction="batchmean", **kd_params)
            # Kept as per-row buffers; the means are reduced only if someone reads last_terms,
            # so the loss stays a single launch per step.
            self._last_parts = (parts, y)
            return loss
        # Upcast once: CE and KD gradients then add in fp32 and are rounded to the input dtype
        # once (two separate upcasts would round each and add them in bf16/fp16).
        z = ref.upcast(z)
        count = F._valid_count(y, ii).clamp_min(1)
        ce = ref.cross_entropy(z, y, self.label_smoothing, ii).sum() / count
        if method == "ce":
            kd = torch.zeros((), device=z.device, dtype=ce.dtype)
        else:
            kd = ref.kd_term_rows(method, z, v, y, ii, **kd_params).sum() / count
        self.last_terms = {"ce": ce.detach(), "kd": kd.detach()}
        if method == "ce":
            return self.ce_weight * ce
        return kd_w * kd if self.ce_weight == 0 else self.ce_weight * ce + kd_w * kd

    def _ce(self, z, y, backend):
        if backend == "triton":
            loss, _ = F._fused(z, None, y, method="ce", ce_weight=1.0, kd_weight=0.0,
                               label_smoothing=self.label_smoothing, ignore_index=self.ignore_index,
                               reduction="batchmean")
            return loss
        count = F._valid_count(y, self.ignore_index).clamp_min(1)
        return ref.cross_entropy(z, y, self.label_smoothing, self.ignore_index).sum() / count
