"""Distillation losses: the pure-PyTorch reference and the public functional / module API."""
from .compressed import TopKTeacher, compress_topk, densify
from .functional import (
    ats_loss,
    cross_entropy,
    dist_loss,
    dkd_loss,
    isats_loss,
    jsd_loss,
    kd_loss,
    rkl_loss,
)
from .linear import FusedLinearDistillLoss, fused_linear_distill
from .methods import METHOD_TABLE, loss_kwargs, params_for
from .module import METHOD_PARAMS, METHODS, DistillLoss

__all__ = [
    "kd_loss",
    "ats_loss",
    "isats_loss",
    "dkd_loss",
    "dist_loss",
    "jsd_loss",
    "rkl_loss",
    "cross_entropy",
    "DistillLoss",
    "fused_linear_distill",
    "FusedLinearDistillLoss",
    "METHODS",
    "METHOD_PARAMS",
    "METHOD_TABLE",
    "params_for",
    "loss_kwargs",
    "TopKTeacher",
    "compress_topk",
    "densify",
]
