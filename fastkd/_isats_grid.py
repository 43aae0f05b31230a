"""The default ISATS candidate grid, in a leaf module both the reference (:mod:`fastkd.losses`)
and the kernels (:mod:`fastkd.kernels`) import, so neither reaches into the other for it."""
from __future__ import annotations

import torch


def isats_default_candidates(tau_target: float, n: int = 16) -> list[float]:
    """The default ISATS grid: ``n`` values evenly spaced in [0.5, tau_target] (docs/methods.md §3)."""
    lo = min(0.5, float(tau_target))
    return torch.linspace(lo, float(tau_target), n, dtype=torch.float64).tolist()
