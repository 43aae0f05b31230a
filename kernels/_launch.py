"""Launch configuration of the fused KD kernel: which path a row takes, its block width and
warps, and the small per-device caches (ISATS grid, ticket counter).

Paths (see :mod:`.kd_softmax_kl` for the traffic argument):

* ``single``: ``C <= max_single``: the row is one block, read once into registers.
* ``chunked``: one program per row, two sweeps over ``chunk``-wide column chunks.
* ``split``: the row is cut into ``slice``-wide slices, one program per slice and phase.

Defaults: the best of a sweep on an H100 (triton 3.6) for the chunked path at 4096 x 32000 and
8192 x 128256 bf16 (benchmarks/results/kernels-*.md; 4096 columns x 8 warps spills). The split
path's defaults (slice 4096 x 8 warps, ISATS 2048 x 4: configurations that compile without
spills; lag 512 slices) are NOT yet measured on a GPU, and its cross-program hand-off (an atomic
ticket, spin-waits, published statistics) has only run in Triton's interpreter. Until a GPU visit
has run it compiled (tests/ops' gpu tests) and measured it, the shipped default stays the chunked
path measured on the H100 (``SPLIT_BY_DEFAULT = False``); ``LaunchConfig(split=True)`` opts in.
Numbers never depend on the configuration beyond fp32 summation order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import triton

MAX_SINGLE = 8192        # rows up to this many classes: one block from registers
MAX_SINGLE_ISATS = 4096  # ISATS keeps 2 x NUM_CAND sums and an unrolled loop: 8192 x 16 warps spills
CHUNK = 2048             # chunked path: columns per chunk
CHUNK_WARPS = 4
PREFETCH = True          # chunked path: load chunk k+1 into registers while computing chunk k
SPLIT_BY_DEFAULT = False  # see the module docstring: opt-in until verified compiled on a GPU
SPLIT_MIN_C = 8192       # with SPLIT_BY_DEFAULT, rows longer than this take the split path
SLICE = 4096             # split path: columns per program
SLICE_WARPS = 8
SLICE_ISATS = 2048       # ISATS at 4096 x 8 warps spills (tests/ops' compile test); 2048 x 4 does not
SLICE_ISATS_WARPS = 4
SPLIT_LAG = 512          # split path: work items (slices) between a row's statistics and its gradient
COUNT_IN_KERNEL_MAX = 1024  # batchmean with N <= this many rows: each program counts the labels itself
BLOCK_N = 1024           # label / row-loss chunk for the in-kernel count and the final reduction
MAX_SLICES = 1024        # split path: at most this many slices per row (statistics buffer size)


def _pow2(name: str, val, lo: int, hi: int) -> None:
    if val is None:
        return
    if isinstance(val, bool) or not isinstance(val, int) or val < lo or val > hi or val & (val - 1):
        raise ValueError(f"LaunchConfig.{name} must be a power of two in [{lo}, {hi}], got {val!r}")


@dataclass(frozen=True)
class LaunchConfig:
    """Explicit launch configuration for :func:`fastkd.kernels.fused_distill` (tests exercise
    the chunked and split paths on small rows with it; benchmarks sweep it). ``None`` fields
    take the shipped defaults above.

    ``split``: ``None`` takes the shipped default (the chunked path while ``SPLIT_BY_DEFAULT`` is
    False; else the split path for ``C > SPLIT_MIN_C``); ``True`` splits every
    row longer than ``max_single``; ``False`` never splits (rows longer than ``max_single``
    take the chunked path).
    """

    max_single: Optional[int] = None
    chunk: Optional[int] = None
    warps: Optional[int] = None
    prefetch: Optional[bool] = None
    split: Optional[bool] = None
    slice: Optional[int] = None
    slice_warps: Optional[int] = None
    lag: Optional[int] = None

    def __post_init__(self):
        _pow2("max_single", self.max_single, 16, 65536)
        _pow2("chunk", self.chunk, 16, 16384)
        _pow2("slice", self.slice, 16, 16384)
        _pow2("warps", self.warps, 1, 32)
        _pow2("slice_warps", self.slice_warps, 1, 32)
        for name in ("prefetch", "split"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise ValueError(f"LaunchConfig.{name} must be True, False or None, got {getattr(self, name)!r}")
        if self.lag is not None and (isinstance(self.lag, bool) or not isinstance(self.lag, int) or self.lag < 0):
            raise ValueError(f"LaunchConfig.lag must be an int >= 0, got {self.lag!r}")


DEFAULT = LaunchConfig()


class Plan(NamedTuple):
    path: str       # "single" | "chunked" | "split"
    block: int      # columns per block (the padded row, a chunk or a slice)
    warps: int
    prefetch: bool  # chunked path only
    slices: int     # split path: slices per row (1 otherwise)
    lag_rows: int   # split path: rows between a row's statistics items and its gradient items


def _single_warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def plan(C: int, method: str = "kd", config: Optional[LaunchConfig] = None, N: int = 1) -> Plan:
    """The path, block and warps for an (N, C) problem under ``config``."""
    cfg = config or DEFAULT
    max_single = cfg.max_single or (MAX_SINGLE_ISATS if method == "isats" else MAX_SINGLE)
    if C <= max_single:
        block = max(16, triton.next_power_of_2(C))
        return Plan("single", block, _single_warps(block), False, 1, 0)
    if cfg.split if cfg.split is not None else (SPLIT_BY_DEFAULT and C > SPLIT_MIN_C):
        default_slice, default_warps = (SLICE_ISATS, SLICE_ISATS_WARPS) if method == "isats" else (SLICE, SLICE_WARPS)
        block = cfg.slice or default_slice
        slices = triton.cdiv(C, block)
        if slices > MAX_SLICES:
            block = triton.next_power_of_2(triton.cdiv(C, MAX_SLICES))
            slices = triton.cdiv(C, block)
        warps = cfg.slice_warps or (default_warps if block == default_slice else _single_warps(block))
        lag = SPLIT_LAG if cfg.lag is None else cfg.lag
        return Plan("split", block, warps, False, slices, min(max(N, 1), triton.cdiv(lag, slices)))
    block = cfg.chunk or CHUNK
    warps = cfg.warps or (CHUNK_WARPS if block == CHUNK else 4 if block <= 1024 else 8)
    return Plan("chunked", block, warps, PREFETCH if cfg.prefetch is None else cfg.prefetch, 1, 0)


_counters: dict = {}
_candidate_tensors: dict = {}


def candidates_tensor(candidates: tuple, device: torch.device) -> torch.Tensor:
    """The ISATS grid on the device, cached: no host-to-device copy per call (and none inside
    a CUDA-graph capture)."""
    key = (device, candidates)
    buf = _candidate_tensors.get(key)
    if buf is None:
        buf = torch.tensor(candidates, dtype=torch.float32, device=device)
        _candidate_tensors[key] = buf
    return buf


def ticket_counter(device: torch.device) -> torch.Tensor:
    """A zeroed int32 counter per (device, stream); each launch leaves it at 0 again.

    Launches on one stream run one after another, so one counter per stream is race-free.
    """
    if device.type == "cuda":
        key = (device.index, torch.cuda.current_stream(device).cuda_stream)
    else:
        key = (device.type, None)
    buf = _counters.get(key)
    if buf is None:
        buf = torch.zeros(1, dtype=torch.int32, device=device)
        _counters[key] = buf
    return buf
