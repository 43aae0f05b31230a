"""Dark-knowledge metrics of teachers (docs/methods.md §9) and agreement between two models.

Per sample, a teacher's soft label ``q`` (``sm(v/T)``, or ATS's ``sm(v_c/tau_c)``) is split into
the target probability ``q_y`` and the ``C-1`` wrong-class probabilities. Over those:

* ``wrong_mean``    ``(1 - q_y) / (C-1)`` (fixed by ``q_y``; reported because the papers do),
* ``wrong_var``     population variance of the wrong-class probabilities,
* ``wrong_std``     its square root,
* ``wrong_entropy`` entropy (nats) of the wrong classes renormalised to sum to 1,
* ``target_prob``   ``q_y``.

Observation 1 of the capacity-mismatch papers is that larger teachers give a smaller wrong-class
spread; observation 2 is that teachers of different size still rank the wrong classes alike,
measured here as the per-sample Spearman rank correlation of the two teachers' wrong-class
logits, averaged over samples (our choice of statistic). Top-1 agreement and KL between two
models' soft labels are reported alongside (as big_vision logs for student vs teacher).

Everything is computed in float64 from the logits, per row, so that data sets of any size can be
streamed through :class:`TeacherMeter` / :class:`PairMeter`, which keep only running sums on the
logits' device (no host synchronisation until :meth:`result`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..losses import reference as ref

__all__ = [
    "METRICS",
    "SoftLabel",
    "parse_temperatures",
    "parse_ats",
    "wrong_class_stats",
    "wrong_class_logits",
    "average_ranks",
    "wrong_class_spearman",
    "top1_agreement",
    "kl_rows",
    "TeacherMeter",
    "PairMeter",
    "DEFAULT_ATS_GRID",
    "grid_key",
    "parse_ats_grid",
    "wrong_to_target_ratio",
    "ats_label_on_top",
    "LabelOnTopMeter",
]

# Per-row statistics of :func:`wrong_class_stats`, in reporting order.
METRICS = ("wrong_mean", "wrong_std", "wrong_var", "wrong_entropy", "target_prob")


@dataclass(frozen=True)
class SoftLabel:
    """How a teacher's logits become a soft label: one temperature, or ATS's pair.

    ``SoftLabel(temperature=T)`` is ``sm(v/T)``; ``SoftLabel(tau_target=a, tau_other=b)`` is
    ATS's ``sm(v_c/tau_c)`` with ``tau_c = a`` on the label and ``b`` elsewhere.
    """

    temperature: Optional[float] = None
    tau_target: Optional[float] = None
    tau_other: Optional[float] = None

    def __post_init__(self):
        is_t = self.temperature is not None
        is_ats = self.tau_target is not None or self.tau_other is not None
        if is_t == is_ats:
            raise ValueError("a SoftLabel takes either temperature=T or both tau_target and tau_other")
        if is_ats and (self.tau_target is None or self.tau_other is None):
            raise ValueError("an ATS SoftLabel needs both tau_target and tau_other")
        for name in ("temperature", "tau_target", "tau_other"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")

    @property
    def is_ats(self) -> bool:
        return self.temperature is None

    @property
    def name(self) -> str:
        """A short key: ``T=2`` or ``ATS(4,2)``."""
        if self.is_ats:
            return f"ATS({self.tau_target:g},{self.tau_other:g})"
        return f"T={self.temperature:g}"

    def scaled_logits(self, logits: Tensor, target: Tensor) -> Tensor:
        """``v / tau_c`` per class, so that the soft label is ``softmax`` of the result."""
        if not self.is_ats:
            return logits / self.temperature
        on_target = _target_mask(logits, target)
        return torch.where(on_target, logits / self.tau_target, logits / self.tau_other)


def parse_temperatures(text: str) -> list[float]:
    """``"1,2,4,8"`` -> ``[1.0, 2.0, 4.0, 8.0]``; every value must be positive and finite."""
    values = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"temperatures must be comma-separated numbers, got {part!r} in {text!r}") from None
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"temperatures must be positive and finite, got {part!r} in {text!r}")
        values.append(value)
    if len(set(values)) != len(values):
        raise ValueError(f"temperatures contain a duplicate: {text!r}")
    return values


def parse_ats(text: str) -> Optional[SoftLabel]:
    """``"4,2"`` -> ATS soft label (tau_target=4, tau_other=2); ``"none"`` -> ``None``."""
    if str(text).strip().lower() in ("", "none", "off"):
        return None
    parts = [p.strip() for p in str(text).split(",")]
    try:
        tau_t, tau_o = (float(p) for p in parts)
    except ValueError:
        raise ValueError(f"--ats takes TAU_TARGET,TAU_OTHER (two numbers) or 'none', got {text!r}") from None
    if tau_t < tau_o:
        # docs/methods.md §3: ATS softens the target class at least as much as the others.
        raise ValueError(f"ATS needs tau_target >= tau_other, got {tau_t:g} < {tau_o:g}")
    return SoftLabel(tau_target=tau_t, tau_other=tau_o)


# --------------------------------------------------------------------------------------------
# Validation and small helpers
# --------------------------------------------------------------------------------------------
def _check(logits: Tensor, target: Tensor, name: str = "logits", min_classes: int = 2) -> None:
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise TypeError(f"{name} must be a floating-point torch.Tensor")
    if logits.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, C), got shape {tuple(logits.shape)}")
    N, C = logits.shape
    if C < min_classes:
        raise ValueError(f"{name} has {C} classes; these metrics need at least {min_classes}")
    if not isinstance(target, Tensor) or target.dtype.is_floating_point or target.dtype == torch.bool:
        raise TypeError("target must be an integer torch.Tensor of class indices")
    if target.shape != (N,):
        raise ValueError(f"target must have shape ({N},) to match {name}, got {tuple(target.shape)}")


def _check_range(target: Tensor, C: int, name: str = "logits") -> None:
    """Labels in [0, C) (a host sync: used by the one-shot functions, never per batch by the meters)."""
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= C):
        bad = target[(target < 0) | (target >= C)][0].item()
        raise ValueError(f"target holds label {bad}, outside [0, {C}) for {C}-class {name}")


class _LabelGuard:
    """The meters' label check without a host sync: out-of-range labels are counted on the device
    (and clamped so the batch can be computed), and :meth:`raise_if_bad` reports them in ``result()``."""

    def __init__(self):
        self._bad: Optional[Tensor] = None

    def __call__(self, target: Tensor, C: int) -> Tensor:
        bad = ((target < 0) | (target >= C)).sum()
        self._bad = bad if self._bad is None else self._bad + bad
        return target.long().clamp(0, C - 1)

    def raise_if_bad(self, C: Optional[int]) -> None:
        if self._bad is not None and int(self._bad):
            raise ValueError(f"{int(self._bad)} target label(s) outside [0, {C}) for {C}-class logits")


def _target_mask(logits: Tensor, target: Tensor) -> Tensor:
    mask = torch.zeros_like(logits, dtype=torch.bool)
    mask.scatter_(1, target.long()[:, None], True)
    return mask


def _f64(x: Tensor) -> Tensor:
    return x.detach().to(torch.float64)


# --------------------------------------------------------------------------------------------
# Per-row metrics
# --------------------------------------------------------------------------------------------
def wrong_class_stats(logits: Tensor, target: Tensor, soft_label: SoftLabel = SoftLabel(temperature=1.0)) -> dict:
    """Per-row dark-knowledge statistics of the soft label ``soft_label`` of ``logits`` (N, C).

    Returns ``{metric: (N,) float64 tensor}`` for every name in :data:`METRICS`.
    """
    _check(logits, target)
    _check_range(target, logits.shape[1])
    return _wrong_class_stats(logits, target, soft_label)


def _wrong_class_stats(logits: Tensor, target: Tensor, soft_label: SoftLabel) -> dict:
    C = logits.shape[1]
    y = target.long()
    s = soft_label.scaled_logits(_f64(logits), y)
    on_target = _target_mask(s, y)
    log_q = torch.log_softmax(s, dim=1)
    q = log_q.exp()
    q_y = q.gather(1, y[:, None]).squeeze(1)
    wrong = torch.where(on_target, torch.zeros_like(q), q)
    # The mean of the wrong-class probabilities, from their sum rather than from 1 - q_y, which
    # would lose every digit when q_y rounds to 1.
    mean = wrong.sum(1) / (C - 1)
    var = torch.where(on_target, torch.zeros_like(q), (q - mean[:, None]) ** 2).sum(1) / (C - 1)
    # Renormalised wrong-class distribution in log form: log p^_c = s_c - LSE_{c != y}(s).
    s_wrong = s.masked_fill(on_target, -math.inf)
    log_hat = s_wrong - torch.logsumexp(s_wrong, dim=1, keepdim=True)
    hat = log_hat.exp()
    entropy = -torch.where(hat > 0, hat * log_hat, torch.zeros_like(hat)).sum(1)
    return {"wrong_mean": mean, "wrong_std": var.sqrt(), "wrong_var": var, "wrong_entropy": entropy,
            "target_prob": q_y}


def wrong_class_logits(logits: Tensor, target: Tensor) -> Tensor:
    """(N, C) -> (N, C-1): each row without its target column, other classes in their order."""
    N, C = logits.shape
    idx = torch.arange(C - 1, device=logits.device).expand(N, C - 1)
    idx = idx + (idx >= target.long()[:, None]).long()  # skip the label's column
    return logits.gather(1, idx)


def average_ranks(x: Tensor) -> Tensor:
    """Per-row ranks 1..n of ``x`` (N, n), ties sharing their average rank (as scipy's rankdata)."""
    x = _f64(x)
    sorted_x = x.sort(dim=1).values
    # For a value tied over sorted positions lo .. hi-1 the ranks are lo+1 .. hi: average (lo+1+hi)/2.
    lo = torch.searchsorted(sorted_x, x, side="left")
    hi = torch.searchsorted(sorted_x, x, side="right")
    return (lo + hi + 1).to(torch.float64) / 2


def wrong_class_spearman(a: Tensor, b: Tensor, target: Tensor) -> Tensor:
    """Per-row Spearman correlation of two models' wrong-class logits (N,) float64.

    Rows where either model's wrong-class logits are all equal have no rank correlation: they
    come back as NaN (:class:`PairMeter` counts and reports them instead of averaging them in).
    """
    _check(a, target, "logits_a", min_classes=3)
    _check(b, target, "logits_b", min_classes=3)
    if a.shape != b.shape:
        raise ValueError(f"the two models' logits differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    _check_range(target, a.shape[1], "logits_a")
    return _wrong_class_spearman(a, b, target)


def _wrong_class_spearman(a: Tensor, b: Tensor, target: Tensor) -> Tensor:
    ra = average_ranks(wrong_class_logits(a, target))
    rb = average_ranks(wrong_class_logits(b, target))
    ra = ra - ra.mean(1, keepdim=True)
    rb = rb - rb.mean(1, keepdim=True)
    den = ra.norm(dim=1) * rb.norm(dim=1)
    rho = (ra * rb).sum(1) / den
    return torch.where(den > 0, rho, torch.full_like(rho, math.nan))


def top1_agreement(a: Tensor, b: Tensor) -> Tensor:
    """Per-row ``argmax a == argmax b`` (bool)."""
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"need two (N, C) logit tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return a.argmax(1) == b.argmax(1)


def kl_rows(a: Tensor, b: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-row ``KL(sm(a/T) || sm(b/T))`` in float64 (no T^2 factor)."""
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"need two (N, C) logit tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return ref.kd(_f64(b), _f64(a), temperature) / float(temperature) ** 2


# --------------------------------------------------------------------------------------------
# Streaming meters
# --------------------------------------------------------------------------------------------
class TeacherMeter:
    """Running dark-knowledge metrics of one model over a data set, for several soft labels.

    ``update(logits, target)`` per batch; ``result()`` gives
    ``{"num_samples", "accuracy", "settings": {name: {"kind", ..., metric: mean}}}``.
    """

    def __init__(self, soft_labels: Sequence[SoftLabel]):
        if not soft_labels:
            raise ValueError("TeacherMeter needs at least one soft label (a temperature or ATS)")
        names = [s.name for s in soft_labels]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate soft labels: {names}")
        self.soft_labels = list(soft_labels)
        self._sums: Optional[Tensor] = None  # (settings, metrics) float64
        self._correct: Optional[Tensor] = None
        self.num_samples = 0
        self.num_classes: Optional[int] = None
        self._labels = _LabelGuard()

    def update(self, logits: Tensor, target: Tensor) -> None:
        _check(logits, target)
        if self.num_classes is None:
            self.num_classes = logits.shape[1]
        elif logits.shape[1] != self.num_classes:
            raise ValueError(f"logits changed class count: {logits.shape[1]} after {self.num_classes}")
        target = self._labels(target, logits.shape[1])
        rows = []
        for sl in self.soft_labels:
            stats = _wrong_class_stats(logits, target, sl)
            rows.append(torch.stack([stats[m].sum() for m in METRICS]))
        sums = torch.stack(rows)
        correct = (logits.argmax(1) == target).sum()
        self._sums = sums if self._sums is None else self._sums + sums
        self._correct = correct if self._correct is None else self._correct + correct
        self.num_samples += logits.shape[0]

    def result(self) -> dict:
        if not self.num_samples:
            raise ValueError("no samples were seen; the data set is empty")
        self._labels.raise_if_bad(self.num_classes)
        means = (self._sums / self.num_samples).cpu().tolist()
        settings = {}
        for sl, row in zip(self.soft_labels, means):
            entry = {"kind": "ats" if sl.is_ats else "temperature"}
            if sl.is_ats:
                entry.update(tau_target=sl.tau_target, tau_other=sl.tau_other)
            else:
                entry["temperature"] = sl.temperature
            entry.update(zip(METRICS, row))
            settings[sl.name] = entry
        return {"num_samples": self.num_samples, "num_classes": self.num_classes,
                "accuracy": int(self._correct) / self.num_samples, "settings": settings}


class PairMeter:
    """Running agreement between two models on the same samples.

    ``result()`` gives the mean wrong-class Spearman over rows where it is defined
    (``spearman_rows``; ``spearman_undefined`` counts the rest), top-1 agreement, and the mean
    ``KL(a || b)`` and ``KL(b || a)`` of the soft labels at ``temperature``.
    """

    def __init__(self, temperature: float = 1.0):
        self.temperature = float(temperature)
        self._sums: Optional[Tensor] = None  # spearman sum, defined rows, agreements, kl_ab, kl_ba
        self.num_samples = 0
        self.num_classes: Optional[int] = None
        self._labels = _LabelGuard()

    def update(self, a: Tensor, b: Tensor, target: Tensor) -> None:
        _check(a, target, "logits_a", min_classes=3)
        _check(b, target, "logits_b", min_classes=3)
        if a.shape != b.shape:
            raise ValueError(f"the two models' logits differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
        self.num_classes = a.shape[1]
        rho = _wrong_class_spearman(a, b, self._labels(target, a.shape[1]))
        defined = ~rho.isnan()
        sums = torch.stack([
            torch.where(defined, rho, torch.zeros_like(rho)).sum(),
            defined.sum().to(torch.float64),
            top1_agreement(a, b).sum().to(torch.float64),
            kl_rows(a, b, self.temperature).sum(),
            kl_rows(b, a, self.temperature).sum(),
        ])
        self._sums = sums if self._sums is None else self._sums + sums
        self.num_samples += a.shape[0]

    def result(self) -> dict:
        if not self.num_samples:
            raise ValueError("no samples were seen; the data set is empty")
        self._labels.raise_if_bad(self.num_classes)
        rho_sum, defined, agree, kl_ab, kl_ba = self._sums.cpu().tolist()
        n = self.num_samples
        return {
            "num_samples": n,
            "spearman": rho_sum / defined if defined else math.nan,
            "spearman_rows": int(defined),
            "spearman_undefined": n - int(defined),
            "top1_agreement": agree / n,
            "kl_ab": kl_ab / n,
            "kl_ba": kl_ba / n,
            "kl_temperature": self.temperature,
        }


# --------------------------------------------------------------------------------------------
# ATS regime diagnostic (docs/methods.md §3: "report the label-on-top fraction")
# --------------------------------------------------------------------------------------------
DEFAULT_ATS_GRID = ((1.0, 2.0, 3.0, 4.0, 5.0, 6.0), (1.0, 2.0, 3.0, 4.0, 5.0))
RATIO_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def grid_key(tau_target: float, tau_other: float) -> str:
    """``(4.0, 2.0)`` -> ``"4,2"``: the key of a grid point in ``ats_label_on_top``."""
    return f"{float(tau_target):g},{float(tau_other):g}"


def parse_ats_grid(text: str) -> Optional[tuple]:
    """``"1,2,3,4,5,6:1,2,3,4,5"`` (tau_target values : tau_other values) -> two tuples; ``"none"`` -> None."""
    if str(text).strip().lower() in ("", "none", "off"):
        return None
    head, sep, tail = str(text).partition(":")
    if not sep:
        raise ValueError(f"--ats-grid takes TAU_TARGETS:TAU_OTHERS, e.g. 1,2,3,4,5,6:1,2,3,4,5, got {text!r}")
    try:
        return tuple(parse_temperatures(head)), tuple(parse_temperatures(tail))
    except ValueError as e:
        raise ValueError(f"--ats-grid {text!r}: {e}") from None


def target_and_max_wrong(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Per row, the target logit ``v_y`` and the largest wrong-class logit (float64, raw logits)."""
    _check(logits, target)
    _check_range(target, logits.shape[1])
    return _target_and_max_wrong(logits, target)


def _target_and_max_wrong(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    v = _f64(logits)
    y = target.long()
    v_y = v.gather(1, y[:, None]).squeeze(1)
    m = v.masked_fill(_target_mask(v, y), -math.inf).amax(1)
    return v_y, m


def wrong_to_target_ratio(logits: Tensor, target: Tensor) -> Tensor:
    """Per row ``max_{c != y} v~_c / v~_y`` with ``v~ = v - mean(v)`` (the row-centred logits), float64.

    For zero-mean logits ATS(tau_target, tau_other) keeps the label on top exactly while this
    ratio is below ``tau_other / tau_target`` (and the centred target logit is positive).
    """
    _check(logits, target)
    _check_range(target, logits.shape[1])
    v = _f64(logits)
    v = v - v.mean(1, keepdim=True)
    v_y, m = _target_and_max_wrong(v, target)
    return m / v_y


def ats_label_on_top(logits: Tensor, target: Tensor, tau_target: float, tau_other: float) -> Tensor:
    """Per row, whether ATS's soft label ``sm(v_c / tau_c)`` of the *raw* logits (as the loss uses
    them) keeps the label as its strict arg-max: ``v_y / tau_target > max_{c != y} v_c / tau_other``."""
    v_y, m = target_and_max_wrong(logits, target)
    return v_y / float(tau_target) > m / float(tau_other)


class LabelOnTopMeter:
    """Streaming ATS regime diagnostic over a grid of ``(tau_target, tau_other)``.

    ``result()`` gives ``{"ats_label_on_top": {"t1,t2": fraction}, "wrong_target_ratio":
    {"q05", "q25", "q50", "q75", "q95", "mean", "nonpositive_target"}}``; the ratio is that of
    :func:`wrong_to_target_ratio` (its quantiles are over every row; ``nonpositive_target`` is the
    share of rows whose centred target logit is <= 0, where the ratio does not describe ATS).
    """

    def __init__(self, tau_targets: Sequence[float] = DEFAULT_ATS_GRID[0],
                 tau_others: Sequence[float] = DEFAULT_ATS_GRID[1]):
        self.points = [(float(a), float(b)) for a in tau_targets for b in tau_others]
        if not self.points:
            raise ValueError("the ATS grid is empty")
        for a, b in self.points:
            SoftLabel(tau_target=a, tau_other=b)  # validates both
        self._inv = None
        self._counts: Optional[Tensor] = None
        self._ratios: list[Tensor] = []  # per row; NaN where the centred target logit is <= 0
        self.num_samples = 0
        self.num_classes: Optional[int] = None
        self._labels = _LabelGuard()

    def update(self, logits: Tensor, target: Tensor) -> None:
        _check(logits, target)
        self.num_classes = logits.shape[1]
        target = self._labels(target, logits.shape[1])
        v_y, m = _target_and_max_wrong(logits, target)
        if self._inv is None:
            self._inv = torch.tensor([[1 / a, 1 / b] for a, b in self.points], dtype=torch.float64,
                                     device=v_y.device)
        on_top = v_y[None, :] * self._inv[:, :1] > m[None, :] * self._inv[:, 1:]  # (points, N)
        counts = on_top.sum(1)
        self._counts = counts if self._counts is None else self._counts + counts
        v = _f64(logits)
        c_y, c_m = _target_and_max_wrong(v - v.mean(1, keepdim=True), target)
        # No boolean indexing here (it would sync the host every batch): mark, filter in result().
        self._ratios.append(torch.where(c_y > 0, c_m / c_y, torch.full_like(c_y, math.nan)))
        self.num_samples += logits.shape[0]

    def result(self) -> dict:
        if not self.num_samples:
            raise ValueError("no samples were seen; the data set is empty")
        self._labels.raise_if_bad(self.num_classes)
        frac = (self._counts.double() / self.num_samples).cpu().tolist()
        every = torch.cat(self._ratios).cpu()
        ratio = every[~every.isnan()]  # rows with a positive centred target logit
        nonpositive = every.numel() - ratio.numel()
        if ratio.numel():
            q = torch.quantile(ratio, torch.tensor(RATIO_QUANTILES, dtype=torch.float64)).tolist()
        else:
            q = [math.nan] * len(RATIO_QUANTILES)
        stats = {f"q{round(p * 100):02d}": float(x) for p, x in zip(RATIO_QUANTILES, q)}
        stats["mean"] = float(ratio.mean()) if ratio.numel() else math.nan
        stats["nonpositive_target"] = nonpositive / self.num_samples
        return {"ats_label_on_top": {grid_key(a, b): f for (a, b), f in zip(self.points, frac)},
                "wrong_target_ratio": stats}
