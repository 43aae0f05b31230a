"""What an epoch measures: the running training sums (:class:`EpochMeters`, summed over ranks at
the epoch's end), the corrupt files skipped (:class:`SkippedFiles`) and the validation pass
(:func:`evaluate`), all exact across ranks."""
from __future__ import annotations

import time
from typing import Optional

import torch
from torch import Tensor, nn

from ..losses import reference as ref
from . import distributed as D
from .runner import autocast_context
from .timing import StepTimer

__all__ = ["EpochMeters", "SkippedFiles", "evaluate", "epoch_line"]


@torch.inference_mode()
def evaluate(student: nn.Module, loader, device: torch.device, *, teacher=None,
             amp_dtype: Optional[torch.dtype] = None, dist: D.DistInfo = D.DistInfo()) -> dict:
    """Student (and teacher) metrics over the whole validation set, exact across ranks.

    ``teacher``: anything called as ``teacher(images) -> TeacherOutput`` (an online teacher
    source or a TeacherRunner), or None for no teacher metrics (e.g. a cached teacher source).
    Counts are integers, summed with one all-reduce; rows flagged ``valid=False`` (the padding
    that evens out shards) are left out, so N processes count exactly what one process counts.
    Returns percentages (``val_top1``, ``val_top5``, ``teacher_top1``, ``agreement``), the mean
    ``kl`` = KL(teacher || student) at T=1, and the raw counts.
    """
    was_training = student.training
    student.eval()
    counts = torch.zeros(5, dtype=torch.int64, device=device)  # samples, top1, top5, teacher top1, agree
    kl_sum = torch.zeros((), dtype=torch.float64, device=device)
    try:
        for batch in loader:
            images = batch.images.to(device, non_blocking=True)
            labels = batch.labels.to(device, non_blocking=True)
            valid = (torch.ones_like(labels, dtype=torch.bool) if batch.valid is None
                     else batch.valid.to(device, non_blocking=True))
            with autocast_context(device, amp_dtype):
                logits = student(images)
            logits = logits.float()
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hit = top == labels[:, None]
            counts[0] += valid.sum()
            counts[1] += (hit[:, 0] & valid).sum()
            counts[2] += (hit.any(1) & valid).sum()
            if teacher is not None:
                t_in = batch.teacher_images if batch.teacher_images is not None else batch.images
                t_logits = teacher(t_in).logits.float()
                t_pred = t_logits.argmax(1)
                counts[3] += ((t_pred == labels) & valid).sum()
                counts[4] += ((t_pred == top[:, 0]) & valid).sum()
                kl_sum += torch.where(valid, ref.kd(logits, t_logits, 1.0), 0.0).sum().double()
    finally:
        student.train(was_training)
    D.all_reduce_sum(counts, dist)
    D.all_reduce_sum(kl_sum, dist)
    n, top1, top5, t1, agree = counts.tolist()
    if n == 0:
        raise RuntimeError("the validation loader produced no samples")
    out = {"val_samples": n, "val_correct_top1": top1, "val_correct_top5": top5,
           "val_top1": 100.0 * top1 / n, "val_top5": 100.0 * top5 / n}
    if teacher is not None:
        out.update(teacher_correct_top1=t1, teacher_top1=100.0 * t1 / n, agreement=100.0 * agree / n,
                   kl=float(kl_sum) / n)
    return out


class EpochMeters:
    """Running sums of an epoch on the device (no per-step sync): loss, CE and KD terms, samples.

    ``progress`` (a mid-epoch checkpoint's ``epoch_progress``) restores a partly trained epoch.
    """

    def __init__(self, device: torch.device, progress: Optional[dict], timer: StepTimer):
        self.device, self.timer = device, timer
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, ce, kd
        self.samples, self._elapsed_before = 0, 0.0
        if progress is not None:
            self.sums += torch.tensor(progress["sums"], dtype=torch.float64, device=device)
            self.samples, self._elapsed_before = int(progress["samples"]), float(progress["elapsed"])
            timer.load_state_dict(progress["timer"])
        self._t0 = time.perf_counter()

    def add(self, loss: Tensor, terms: dict, batch) -> None:
        # Two small launches (stack, then an fp64 add of the exact fp32 values); reading
        # ``terms`` (the loss's last_terms) reduces the fused loss's per-row terms, a few more:
        # the price of exact epoch means of the CE and KD terms.
        self.sums += torch.stack([loss, terms["ce"], terms["kd"]])
        self.samples += int(batch.valid.sum()) if batch.valid is not None else len(batch.labels)

    def elapsed(self) -> float:
        return self._elapsed_before + time.perf_counter() - self._t0

    def rate(self) -> float:
        """Images/s of this rank so far in the epoch."""
        return self.samples / max(self.elapsed(), 1e-9)

    def state_dict(self) -> dict:
        return {"sums": self.sums.tolist(), "samples": self.samples, "elapsed": self.elapsed(),
                "timer": self.timer.state_dict()}

    def summary(self, epoch: int, *, global_step: int, lr: float, steps: int, first_step: int,
                teacher_forward: bool, dist: D.DistInfo) -> dict:
        """The epoch's record at its end: exact means over all ranks (one all-reduce of the sums and
        the counts). ``steps``: the batches of the epoch trained (a resumed epoch's included),
        ``first_step``: where this session started in it."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # epoch boundary: the timing must include queued work
        elapsed = self.elapsed()
        totals = torch.cat([self.sums, torch.tensor([steps, self.samples], dtype=torch.float64, device=self.device)])
        D.all_reduce_sum(totals, dist)
        loss_sum, ce_sum, kd_sum, step_count, sample_count = totals.tolist()
        return {
            "epoch": epoch,
            "global_step": global_step,
            "train_loss": loss_sum / step_count,
            "train_ce": ce_sum / step_count,
            "train_kd": kd_sum / step_count,
            "lr": lr,
            "images_per_s": sample_count / max(elapsed, 1e-9),
            "train_samples": int(sample_count),
            "epoch_time_s": elapsed,
            "steps_this_session": steps - first_step,
            "teacher_forward": teacher_forward,
            "step_time_ms": self.timer.per_step_ms(steps),
        }


class SkippedFiles:
    """Corrupt files the training loader skipped (--skip-corrupt), counted over all ranks."""

    def __init__(self, loader, device: torch.device, dist: D.DistInfo):
        self.loader, self.device, self.dist = loader, device, dist
        self._before = 0

    def epoch_counts(self) -> dict:
        """Files skipped in this epoch (a known corrupt file is skipped again in every epoch that
        reads it), and distinct files so far."""
        total = int(getattr(self.loader, "skipped", 0))
        in_epoch = getattr(self.loader, "skipped_in_epoch", None)
        if in_epoch is None:  # a loader without per-epoch counts: the files new in this epoch
            in_epoch = total - self._before
        counts = torch.tensor([int(in_epoch), total], dtype=torch.int64)
        self._before = total
        if self.dist.distributed:
            counts = D.all_reduce_sum(counts.to(self.device), self.dist).cpu()
        new, total = counts.tolist()
        return {"skipped_files": new, "skipped_files_total": total}


def epoch_line(r: dict, epochs: int) -> str:
    """The log line of an epoch's record."""
    parts = [f"epoch {r['epoch'] + 1}/{epochs}", f"loss {r['train_loss']:.4f}",
             f"top1 {r['val_top1']:.2f}", f"top5 {r['val_top5']:.2f}"]
    if "teacher_top1" in r:
        parts += [f"teacher {r['teacher_top1']:.2f}", f"agree {r['agreement']:.2f}", f"KL {r['kl']:.4f}"]
    if "teacher_train_top1" in r:  # a teacher cache: its top-1 on this epoch's training views
        parts.append(f"teacher (train views, cached) {r['teacher_train_top1']:.2f}")
    if "loader" in r:
        parts.append(f"(val: {r['loader']} loader, {r['decoder']})")
    parts.append(f"{r['images_per_s']:.0f} img/s")
    if r.get("skipped_files_total"):
        parts.append(f"skipped {r['skipped_files']} corrupt file(s) ({r['skipped_files_total']} in all)")
    steps = ", ".join(f"{k} {v:.2f}" for k, v in r["step_time_ms"].items())
    return "  ".join(parts) + f"  [ms/step: {steps}]"
