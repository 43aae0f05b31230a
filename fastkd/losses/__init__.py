"""Distillation losses: the pure-PyTorch reference and the public functional / module API."""
from .functional import (
    cross_entropy,
    dist_loss,
    dkd_loss,
    ats_loss,
    isats_loss,
    kd_loss,
    set_label_checks,
)
from .module import METHOD_PARAMS, METHODS, DistillLoss

__all__ = [
    "kd_loss",
    "ats_loss",
    "isats_loss",
    "dkd_loss",
    "dist_loss",
    "cross_entropy",
    "DistillLoss",
    "METHODS",
    "METHOD_PARAMS",
    "set_label_checks",
]
