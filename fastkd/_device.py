"""Device resolution and CPU core count, written once for the whole package.

``resolve_device`` turns what a user writes (``auto``, ``cpu``, ``cuda``, ``cuda:N`` or a
``torch.device``) into a concrete device, or raises :class:`DeviceError` with a one-line reason.
Nothing here queries a device at import time.
"""
from __future__ import annotations

import os
from typing import Optional, Union

import torch

from .errors import UsageError

__all__ = ["DeviceError", "resolve_device", "cpu_cores"]

DEVICE_NAMES = ("auto", "cpu", "cuda")


class DeviceError(UsageError, RuntimeError):
    """A device this machine cannot provide, or a device name fastkd does not know.

    A ``ValueError`` (a usage error) and a ``RuntimeError`` alike, as the per-module resolvers
    it replaces raised one or the other.
    """


def resolve_device(spec: Union[str, torch.device, None] = "auto", *, local_rank: Optional[int] = None,
                   flag: str = "--device") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` -> ``cuda:local_rank`` (or the current
    CUDA device when ``local_rank`` is None); ``cuda:N`` and ``cpu`` as written.

    ``flag`` names the option in error messages.
    """
    if spec is None:
        spec = "auto"
    if isinstance(spec, torch.device):
        dev = spec
    elif isinstance(spec, str):
        name = spec.strip().lower()
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        if name not in DEVICE_NAMES and not name.startswith("cuda:"):
            raise DeviceError(f"{flag} must be auto, cpu, cuda or cuda:N, got {spec!r}")
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise DeviceError(f"{flag} must be auto, cpu, cuda or cuda:N, got {spec!r}") from None
    else:
        raise DeviceError(f"{flag} must be a device name or a torch.device, got {type(spec).__name__}")
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise DeviceError(f"{flag} must be a CPU or CUDA device, got {dev}")
    if not torch.cuda.is_available():
        raise DeviceError(f"{flag} {spec} asked for CUDA, but CUDA is not available on this machine")
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device() if local_rank is None else local_rank)
    if dev.index >= torch.cuda.device_count():
        raise DeviceError(f"{flag} {dev}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
