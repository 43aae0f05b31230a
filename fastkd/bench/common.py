"""What every benchmark row records about where it was measured: the commit and the machine.

A number without the code it was measured at cannot be checked later, so each benchmark
(``fastkd bench kernels``, ``fastkd bench data``, ``benchmarks/bench_engine.py``) stamps every
row with :func:`source_commit` and :func:`machine`.
"""
from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parents[2]


def source_commit(explicit: Optional[str] = None, root: Path = REPO_ROOT) -> str:
    """The commit the measured code is at: ``explicit`` when given (a copy of the tree without
    ``.git``, e.g. on the GPU machine, is told its commit by the caller), else ``git rev-parse``
    of ``root`` with ``+dirty`` when tracked files differ from it, else ``"unknown"``."""
    if explicit:
        return explicit
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=7", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine(device: str = "cuda", commit: Optional[str] = None) -> dict:
    """:func:`fastkd.envinfo.machine` (date, versions, CPU, GPU) plus the commit and the
    Liger-Kernel version; ``gpu`` names the CPU on a CPU run (results files are named after it)."""
    from importlib.metadata import PackageNotFoundError, version

    from ..envinfo import machine as base

    info = base(device)
    if not info.get("gpu"):
        info["gpu"] = f"CPU ({info.get('cpu') or platform.machine()})"
    info["commit"] = source_commit(commit)
    try:
        info["liger_kernel"] = version("liger-kernel")
    except PackageNotFoundError:
        info["liger_kernel"] = None
    return info
