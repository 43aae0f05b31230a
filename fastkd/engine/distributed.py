"""Distributed helpers: torchrun's environment, process groups, exact reductions.

``torchrun`` (single- or multi-node) sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; each
process then drives one GPU (``cuda:LOCAL_RANK``) with NCCL, or the CPU with gloo. Without those
variables everything here degrades to a single process and every collective is a no-op.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .._device import DeviceError  # noqa: F401  (re-exported: a --device this machine cannot provide)
from .._device import resolve_device as _resolve_device
from ..errors import UsageError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False  # we created the process group (and destroy it at the end)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:LOCAL_RANK`` when CUDA is available, else CPU; ``cuda`` -> ``cuda:LOCAL_RANK``."""
    return _resolve_device(spec, local_rank=local_rank)


DEFAULT_TIMEOUT_S = 600.0


class CollectiveTimeout(UsageError):
    """A collective waited longer than ``--dist-timeout`` for another rank (reported in one line)."""


def is_timeout(exc: BaseException) -> bool:
    """True for the error a gloo / NCCL collective raises when the process group's timeout expires."""
    text = str(exc).lower()
    return "timed out" in text or "timeout" in text


def is_peer_lost(exc: BaseException) -> bool:
    """True for the error a gloo / NCCL collective raises when another rank's process died (its
    connection reset or closed: a killed process, a lost node)."""
    text = str(exc).lower()
    return any(k in text for k in ("connection reset by peer", "connection closed by peer", "connection refused",
                                   "broken pipe", "socket closed", "remote process exited"))


def collective_error(exc: BaseException, rank: int, timeout_s: float) -> Optional[CollectiveTimeout]:
    """The one-line error for a collective that failed because another rank stopped or died
    (None for any other error, which keeps its traceback)."""
    if is_timeout(exc):
        return CollectiveTimeout(
            f"rank {rank}: a collective with the other processes timed out after {timeout_s:g} s (--dist-timeout): "
            f"another rank stopped, crashed or fell far behind (resume with --resume auto; raise --dist-timeout if "
            f"that rank was legitimately busy)")
    if is_peer_lost(exc):
        return CollectiveTimeout(
            f"rank {rank}: another rank's process ended during a collective (killed, crashed, or its node was lost): "
            f"stopping; resume every node with --resume auto")
    return None


def init(device_spec: str = "auto", timeout_s: Optional[float] = DEFAULT_TIMEOUT_S) -> DistInfo:
    """Join torchrun's process group if launched by it (NCCL on CUDA, gloo on CPU).

    ``timeout_s``: how long a collective waits for the other ranks before failing (``--dist-timeout``;
    ``None`` keeps PyTorch's default, 30 minutes for gloo): a stopped or dead rank then ends the
    run with an error instead of blocking every other process.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    device = resolve_device(device_spec, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size <= 1:
        return DistInfo(device=device)
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, initialized_here=False)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    if timeout_s is not None:
        kwargs["timeout"] = datetime.timedelta(seconds=float(timeout_s))
    dist.init_process_group(backend=backend, **kwargs)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, initialized_here=True)


def shutdown(info: DistInfo) -> None:
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """In-place sum over ranks (exact for integer tensors); a no-op in one process."""
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_object(obj, info: DistInfo) -> list:
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, info: DistInfo, src: int = 0):
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def agree_on_checkpoint(state: Optional[dict], info: DistInfo, where) -> None:
    """Every rank must resume from the same checkpoint (or none): on several nodes each rank reads
    ``--output`` itself, and a folder that is not shared (or not yet synced) would let the ranks
    start from different steps. Raises :class:`UsageError` on every rank, naming what each sees."""
    if not info.distributed:
        return
    mine = None if state is None else (int(state.get("global_step", -1)), state.get("checksum"))
    seen = all_gather_object(mine, info)
    if any(s != seen[0] for s in seen):
        views = ", ".join(f"rank {r}: " + ("no checkpoint" if s is None else f"global step {s[0]}"
                                             + (f" (checksum {str(s[1])[:12]})" if s[1] else ""))
                          for r, s in enumerate(seen))
        raise UsageError(f"rank {info.rank}: the ranks resume from different checkpoints in {where} ({views}): "
                         f"give every node one --output folder they all share (rank 0 writes it), or copy rank 0's "
                         f"checkpoint to every node's --output")


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def broadcast_buffers(module: torch.nn.Module, info: DistInfo, src: int = 0) -> None:
    """Give every rank ``src``'s buffers (batch-norm running statistics).

    DDP broadcasts buffers at the start of each forward, so after the last training step every
    rank holds statistics updated by its own batch; validation and checkpoints must see one
    model, the one rank 0 saves.
    """
    if info.distributed:
        for buf in module.buffers():
            dist.broadcast(buf, src=src)
