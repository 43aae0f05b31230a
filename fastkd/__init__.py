"""fastkd: fast knowledge distillation for PyTorch.

Public surface: the distillation losses (functional and ``nn.Module``) and the version.
The engine (``fastkd.engine``), data loaders (``fastkd.data``) and analysis tools
(``fastkd.analysis``) are imported from their subpackages.
"""
from .losses import (
    DistillLoss,
    ats_loss,
    cross_entropy,
    dist_loss,
    dkd_loss,
    isats_loss,
    kd_loss,
    set_label_checks,
)

__version__ = "0.1.0"

__all__ = [
    "kd_loss",
    "ats_loss",
    "isats_loss",
    "dkd_loss",
    "dist_loss",
    "cross_entropy",
    "DistillLoss",
    "set_label_checks",
    "__version__",
]
