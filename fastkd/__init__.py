"""fastkd: fast knowledge distillation for PyTorch.

Public surface: the distillation losses (functional and ``nn.Module``) and the version.
The engine (``fastkd.engine``), data loaders (``fastkd.data``) and analysis tools
(``fastkd.analysis``) are imported from their subpackages.

The loss names are loaded on first use (PEP 562), so ``import fastkd`` (and ``fastkd --version``)
does not import torch.
"""
import importlib as _importlib

__version__ = "0.1.0"

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
    "TopKTeacher",
    "compress_topk",
    "__version__",
]

_LAZY = {name: "losses" for name in __all__ if name != "__version__"}
_SUBPACKAGES = ("losses", "engine", "data", "analysis", "models", "kernels", "bench", "cache")


def __getattr__(name):
    if name in _LAZY:
        value = getattr(_importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _SUBPACKAGES:
        return _importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
