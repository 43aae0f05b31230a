"""Choose ATS's temperatures on a validation split, never on test (docs/methods.md §3).

The authors grid-search ``tau1 in {1..6} x tau2 in {1..5}``; a single point such as (4, 2) is
not their method. :func:`select_on_validation` trains (through a callable you pass) one student
per grid point and seed, picks the point by **validation** top-1 only, and reports that point's
test top-1 beside it. The split and the rule travel with the result (:class:`Selection`).

The selection reads nothing but the ``val_top1`` numbers; a test that poisons the test labels
checks that the chosen point does not move. :func:`carve_validation` carves a stratified
validation split out of training data, for users who have only train and test.

Example::

    def run(point, seed):           # train a student with ATS(point) from seed, evaluate it
        ...
        return {"val_top1": val_acc, "test_top1": test_acc}

    sel = select_on_validation(run, ats_points(), seeds=(0, 1, 2), split="10% of train, stratified")
    sel.point, sel.val_top1_mean, sel.test_top1_mean
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from .metrics import DEFAULT_ATS_GRID, grid_key

__all__ = ["RULE", "ats_points", "diagonal_points", "carve_validation", "select_point", "Selection",
           "select_on_validation", "mean_se"]

RULE = ("the grid point with the highest mean validation top-1 over the seeds; ties go to the "
        "smaller (tau1, tau2); test top-1 is reported for the chosen point only and never read by the rule")


def ats_points(tau_targets: Sequence[float] = DEFAULT_ATS_GRID[0], tau_others: Sequence[float] = DEFAULT_ATS_GRID[1]
               ) -> list[tuple[float, float]]:
    """The asymmetric grid points ``tau1 > tau2`` (ATS proper: the label gets the higher temperature)."""
    pts = [(float(a), float(b)) for a in tau_targets for b in tau_others if a > b]
    if not pts:
        raise ValueError(f"the ATS grid {tau_targets} x {tau_others} has no point with tau1 > tau2")
    return pts


def diagonal_points(temperatures: Sequence[float] = DEFAULT_ATS_GRID[1]) -> list[tuple[float, float]]:
    """The symmetric baseline of the authors: ``tau1 = tau2 = t`` with the same student temperature s = 1."""
    return [(float(t), float(t)) for t in temperatures]


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error (sample std / sqrt(n); NaN for one value)."""
    v = [float(x) for x in values]
    if not v:
        raise ValueError("mean_se of no values")
    m = sum(v) / len(v)
    if len(v) < 2:
        return m, math.nan
    var = sum((x - m) ** 2 for x in v) / (len(v) - 1)
    return m, math.sqrt(var / len(v))


def carve_validation(labels: Tensor, fraction: float = 0.1, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Split training rows into ``(train_idx, val_idx)``, stratified by class (each class gives
    ``round(fraction * count)`` rows, at least one where it has two or more)."""
    if not 0 < fraction < 1:
        raise ValueError(f"the validation fraction must be in (0, 1), got {fraction!r}")
    labels = labels.reshape(-1).long().cpu()
    g = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = min(len(idx) - 1, max(1, round(fraction * len(idx)))) if len(idx) > 1 else 0
        val.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def select_point(val_scores: Mapping[tuple, Sequence[float]]) -> tuple:
    """The key of ``val_scores`` (``{(tau1, tau2): [val top-1 per seed]}``) chosen by :data:`RULE`."""
    if not val_scores:
        raise ValueError("no grid points to select from")
    return max(sorted(val_scores), key=lambda p: mean_se(val_scores[p])[0])  # max keeps the first of ties


@dataclass
class Selection:
    point: tuple                  # the chosen (tau1, tau2)
    val_top1_mean: float
    test_top1_mean: float
    test_top1_se: float
    test_top1: list               # per seed, at the chosen point
    seeds: list
    split: str
    rule: str = RULE
    table: dict = field(default_factory=dict)  # "t1,t2" -> {"val_top1": [...], "val_top1_mean": ...}

    def as_dict(self) -> dict:
        return {"split": self.split, "rule": self.rule, "t1": self.point[0], "t2": self.point[1],
                "val_top1_mean": self.val_top1_mean, "test_top1_mean": self.test_top1_mean,
                "test_top1_se": self.test_top1_se, "test_top1": self.test_top1, "seeds": self.seeds,
                "grid_val_top1": self.table}


def select_on_validation(run: Callable[[tuple, int], Mapping], points: Sequence[tuple], seeds: Sequence[int], *,
                         split: str, results: Mapping | None = None) -> Selection:
    """Train one student per ``(point, seed)`` with ``run(point, seed) -> {"val_top1", "test_top1"}``
    (or take them from ``results[(point, seed)]`` when already trained), choose the point by
    validation top-1 (:data:`RULE`), and report the chosen point's test top-1 (mean, SE).
    """
    if not seeds:
        raise ValueError("select_on_validation needs at least one seed")
    out = {}
    for p in points:
        for s in seeds:
            r = results[(p, s)] if results is not None and (p, s) in results else run(p, s)
            out[(p, s)] = r
    val = {p: [float(out[(p, s)]["val_top1"]) for s in seeds] for p in points}
    chosen = select_point(val)
    test = [float(out[(chosen, s)]["test_top1"]) for s in seeds]
    m, se = mean_se(test)
    table = {grid_key(*p): {"val_top1": v, "val_top1_mean": mean_se(v)[0]} for p, v in val.items()}
    return Selection(chosen, mean_se(val[chosen])[0], m, se, test, list(seeds), split, RULE, table)
