"""Stopping a run whose numbers became non-finite, before anything non-finite is saved.

At each logging boundary the logged loss and the epoch's running loss sum are checked (summed
over ranks, in the boundary's one sync); the weights before validation and before every save.
Either stops the run with :class:`fastkd.errors.NonFiniteError` (a ``stop`` record in
metrics.jsonl first) naming the step(s), the likely causes and the last good checkpoint.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from ..errors import NonFiniteError
from . import checkpoint as ckpt
from . import distributed as D

__all__ = ["FiniteChecks"]


class FiniteChecks:
    """The non-finite checks of one run.

    Args:
        out: the run folder (its ``last.pt`` is the last good checkpoint); metrics: where the
            ``stop`` record goes; lr, amp: this run's, named in the message.
        last_finite_step: the global step known good (the run's start).
        source_check: called first when the run stops (the teacher source's epoch check: a damaged
            teacher-cache epoch raises its own, more precise error).
    """

    def __init__(self, out: Path, dist: D.DistInfo, device: torch.device, metrics, *, lr: float, amp: str,
                 last_finite_step: int, source_check=None):
        self.out, self.dist, self.device, self.metrics = out, dist, device, metrics
        self.lr, self.amp, self.last_finite_step = lr, amp, last_finite_step
        self.source_check = source_check

    def logged_loss(self, loss: Tensor, running_sum: Tensor, epoch: int, global_step: int) -> float:
        """The logged loss as a float; stops the run when it or the epoch's running loss sum is non-finite.

        The one sync of a logging boundary reads the logged loss and whether any loss of this
        epoch so far was non-finite: the epoch's running loss sum (already on the device) stays
        finite exactly when every step's loss was (summed over ranks: all stop together)."""
        check = torch.stack([loss.detach().double(), running_sum])
        bad = (~torch.isfinite(check)).any().to(torch.float64).reshape(1)
        D.all_reduce_sum(bad, self.dist)
        loss_value, bad_value = torch.cat([check[:1], bad]).tolist()
        if bad_value:
            self.stop(epoch, global_step, f"the training loss became non-finite ({loss_value:g} at the logged step)")
        self.last_finite_step = global_step
        return loss_value

    def require_finite_weights(self, epoch: int, global_step: int, student: nn.Module, dpk: Optional[nn.Module],
                               state: Optional[dict] = None) -> None:
        """Every floating-point tensor of the model (and DPK) state, or of a checkpoint ``state``, is
        finite, and so are its running sums; else stop (one sync, at epoch ends and checkpoints only)."""
        if state is None:
            state = {"model": student.state_dict(), "dpk": dpk.state_dict() if dpk is not None else None}
        tensors = [*state["model"].values(), *(state.get("dpk") or {}).values()]
        flags = [torch.isfinite(t).all() for t in tensors if torch.is_tensor(t) and t.is_floating_point()]
        bad = torch.zeros(1, dtype=torch.float64, device=self.device)
        if flags:
            bad += (~torch.stack([f.to(self.device) for f in flags]).all()).to(torch.float64)
        D.all_reduce_sum(bad, self.dist)
        progress = state.get("epoch_progress")
        if bad.item() or (progress is not None and not all(math.isfinite(v) for v in progress["sums"])):
            self.stop(epoch, global_step, "the student's weights became non-finite")

    def stop(self, epoch: int, global_step: int, what: str):
        """Stop the run: one line naming the step(s), the likely causes and the last good checkpoint.

        Nothing non-finite is saved; a ``stop`` record in metrics.jsonl marks the folder as
        stopped (not finished). ``--resume auto`` continues from the last good checkpoint."""
        if self.source_check is not None:
            self.source_check()
        first, last = self.last_finite_step + 1, global_step
        where = f"at global step {last}" if first >= last else f"between global steps {first} and {last}"
        self.metrics.write("stop", {"reason": "non-finite", "epoch": epoch, "global_step": last,
                                    "first_possible_step": min(first, last)})
        good = self.out / ckpt.LAST
        saved = (f"the last good checkpoint is {good} (--resume auto continues from it once the cause is fixed)"
                 if good.exists() else "no checkpoint was written")
        raise NonFiniteError(
            f"{what} {where} (epoch {epoch + 1}); likely causes: a learning rate too high ({self.lr:g}; --lr), "
            f"an AMP/fp16 overflow (--amp {self.amp}; bf16 has fp32's range), a non-finite teacher output (the "
            f"teacher checkpoint or a --teacher-cache row holding NaN/inf), or bad input; nothing non-finite "
            f"was saved: {saved}")
