"""``DistillLoss``: ``ce_weight * CE + kd_weight * KD-term`` as one ``nn.Module``.

This is what the engine uses and what the fused kernel computes in one launch (loss and
gradient together) on CUDA tensors.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import functional as F
from . import reference as ref

METHODS = ("ce", "kd", "ats", "isats", "dkd", "dist")

# Method -> its parameters and their defaults (the same names as the functional API).
METHOD_PARAMS = {
    "ce": {},
    "kd": {"temperature": 1.0},
    "ats": {"tau_target": 4.0, "tau_other": 2.0, "student_temperature": 1.0},
    "isats": {"tau_target": 4.0, "candidates": None, "student_temperature": 1.0},
    "dkd": {"alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup_epochs": 0.0},
    "dist": {"beta": 1.0, "gamma": 1.0, "temperature": 1.0},
}


class DistillLoss(nn.Module):
    """Weighted hard-label CE plus a distillation term.

    ``forward(student_logits, teacher_logits, target)`` returns the scalar
    ``ce_weight * CE + kd_weight * w * KD`` where CE and KD are both averaged over the rows
    whose label is not ``ignore_index`` (DIST, a batch-level term, uses every row), and ``w``
    is DKD's warm-up weight ``min(epoch / warmup_epochs, 1)`` (1 for every other method; set
    the epoch with :meth:`set_epoch`). ``method="ce"`` needs no teacher (``teacher_logits``
    may be ``None``).

    After each call, ``last_terms`` holds the detached batch means ``{"ce": ..., "kd": ...}``
    (device tensors, no host synchronisation) for logging.
    """

    def __init__(self, method="kd", ce_weight=0.5, kd_weight=0.5, label_smoothing=0.0, ignore_index=-100,
                 backend="auto", **method_params):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
        allowed = METHOD_PARAMS[method]
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
        self.label_smoothing = F._check_nonneg("label_smoothing", label_smoothing)
        if self.label_smoothing > 1:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
        self.ignore_index = int(ignore_index)
        self.backend = backend
        params = {**allowed, **method_params}
        for name in ("temperature", "tau_target", "tau_other", "student_temperature"):
            if name in params:
                params[name] = F._check_positive(name, params[name])
        for name in ("alpha", "beta", "gamma", "warmup_epochs"):
            if name in params:
                params[name] = F._check_nonneg(name, params[name])
        if method == "isats":
            params["candidates"] = F._check_candidates(params["candidates"], params["tau_target"])
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
        """Set the (possibly fractional) epoch, used by DKD's warm-up weight."""
        self.epoch = float(epoch)

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

    def forward(self, student_logits: Tensor, teacher_logits, target: Tensor) -> Tensor:
        kd_w = self.effective_kd_weight()
        if teacher_logits is None:
            if self.needs_teacher:
                raise ValueError(f"method {self.method!r} with kd_weight={self.kd_weight} needs teacher_logits")
            F._check_logits("student_logits", student_logits)
            teacher_logits = None
        else:
            F._check_pair(student_logits, teacher_logits)
        F._check_target(target, student_logits, self.ignore_index)
        z = F._flatten(student_logits)
        y = target.reshape(-1)
        v = F._flatten(teacher_logits).detach() if teacher_logits is not None else None
        backend = F._resolve_backend(self.backend, z)

        if self.method == "dist":
            ce = self._ce(z, y, backend)
            kd = torch.zeros((), device=z.device) if v is None or kd_w == 0 else \
                F.dist_loss(z, v, self.params["beta"], self.params["gamma"], self.params["temperature"], backend=backend)
            self.last_terms = {"ce": ce.detach(), "kd": kd.detach()}
            # A zero weight drops its term (0 * inf = NaN otherwise), as the fused kernel does.
            return kd_w * kd if self.ce_weight == 0 and kd_w != 0 else self.ce_weight * ce + kd_w * kd

        method = self.method if (v is not None and kd_w > 0) else "ce"
        kd_params = {k: v_ for k, v_ in self.params.items() if k != "warmup_epochs"} if method != "ce" else {}
        if backend == "triton":
            loss, parts = F._fused(z, v if method != "ce" else None, y, method=method, ce_weight=self.ce_weight,
                                   kd_weight=kd_w if method != "ce" else 0.0, label_smoothing=self.label_smoothing,
                                   ignore_index=self.ignore_index, reduction="batchmean", **kd_params)
            # Kept as per-row buffers; the means are reduced only if someone reads last_terms,
            # so the fused path stays a single launch per step.
            self._last_parts = (parts, y)
            return loss
        count = F._valid_count(y, self.ignore_index).clamp_min(1)
        ce_rows = ref.cross_entropy(z, y, self.label_smoothing, self.ignore_index)
        ce = ce_rows.sum() / count
        if method == "ce":
            kd = torch.zeros((), device=z.device, dtype=ce.dtype)
        else:
            kd_rows = _KD_ROWS[method](z, v, y, self.ignore_index, **kd_params)
            kd = kd_rows.sum() / count
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


def _kd_rows_kd(z, v, y, ignore_index, temperature):
    rows = ref.kd(z, v, temperature)
    return torch.where(y != ignore_index, rows, torch.zeros_like(rows))


_KD_ROWS = {
    "kd": _kd_rows_kd,
    "ats": lambda z, v, y, ii, tau_target, tau_other, student_temperature:
        ref.ats(z, v, y, tau_target, tau_other, student_temperature, ii),
    "isats": lambda z, v, y, ii, tau_target, candidates, student_temperature:
        ref.isats(z, v, y, tau_target, candidates, student_temperature, ii),
    "dkd": lambda z, v, y, ii, alpha, beta, temperature: ref.dkd(z, v, y, alpha, beta, temperature, ii),
}

