"""Probes for optional backends: "is X installed / usable".

Nothing here imports a heavy optional package at module import, and nothing touches a CUDA
device at import time; every answer is computed on first call and cached.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os

logger = logging.getLogger("fastkd")


def has_module(name: str) -> bool:
    """True when ``name`` can be imported (looked up with ``find_spec``, not imported)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def has_triton() -> bool:
    return has_module("triton")


def has_dali() -> bool:
    return has_module("nvidia.dali")


def has_apex() -> bool:
    return has_module("apex")


def has_timm() -> bool:
    return has_module("timm")


def has_torchvision() -> bool:
    return has_module("torchvision")


def triton_interpret() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def triton_usable_on(device) -> tuple[bool, str]:
    """Can the fused Triton kernels run on tensors that live on ``device``?

    Returns ``(ok, reason)``; ``reason`` explains a ``False``.
    CUDA tensors need Triton; CPU tensors need Triton's interpreter (``TRITON_INTERPRET=1`` set
    before :mod:`fastkd.kernels` is imported).
    """
    if not has_triton():
        return False, "Triton is not installed (pip install triton; it ships with torch on Linux)"
    dev_type = getattr(device, "type", str(device))
    if dev_type == "cuda":
        return True, ""
    if dev_type == "cpu":
        if triton_interpret():
            return True, ""
        return False, (
            "the Triton kernels run on CUDA tensors; on CPU tensors they need Triton's "
            "interpreter (set TRITON_INTERPRET=1 before importing fastkd)"
        )
    return False, f"the Triton kernels do not run on device type {dev_type!r}"


_said_once: set[str] = set()


def log_once(message: str, level: int = logging.INFO) -> None:
    """Log ``message`` the first time it is seen in this process, never again."""
    if message in _said_once:
        return
    _said_once.add(message)
    logger.log(level, message)
