"""A run's checkpoints: the full training state, its atomic save, and resuming from it.

:class:`Checkpoints` is built once the run's modules exist. :meth:`~Checkpoints.state` gathers
the training state (RNG and loader states from every rank), :meth:`~Checkpoints.save` writes it
as ``last.pt`` (linked as ``best.pt`` / ``epoch_N.pt``) and :meth:`~Checkpoints.resume` loads the
checkpoint named by ``--resume`` into the modules and returns the :class:`Position` to continue at.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from pathlib import Path
from typing import Optional

from torch import nn

from . import checkpoint as ckpt
from . import config as C
from . import distributed as D
from .metrics import read_metrics

logger = logging.getLogger("fastkd")

__all__ = ["Checkpoints", "Position", "RESUME_SAME_KEYS", "RESUME_FREE_KEYS", "truncate_metrics"]

# Config keys that must be the same: the checkpoint's state cannot fit another value (checked
# before anything is loaded, so the error names the setting, not a state_dict mismatch).
RESUME_SAME_KEYS = ("student", "teacher", "method", "dpk_logit", "opt", "image_size", "teacher_image_size",
                    "dpk_stages", "dpk_teacher_stages")
# Config keys that may differ between a checkpoint's run and the run resuming it.
RESUME_FREE_KEYS = {"resume", "output", "epochs", "log_interval", "device", "workers", "save_every",
                    "checkpoint_interval", "data", "threads", "dist_timeout", "skip_corrupt"}


@dataclasses.dataclass
class Position:
    """Where training continues: the epoch, its batches already trained, the global step, the best
    validation top-1 so far and the running sums of a partly trained epoch (``epoch_progress``)."""

    epoch: int = 0
    batch: int = 0
    global_step: int = 0
    best_top1: float = -math.inf
    progress: Optional[dict] = None


class Checkpoints:
    """The checkpoints of one run in ``out``.

    Args:
        cfg: the run's config; resolved: the config with its defaults made explicit (as a dict);
            both are saved, and resolved is what a resume compares.
        student, optimizer, scheduler, scaler, dpk (or None): what a checkpoint saves and restores.
        classes: the data set's classes; train_loader: its state is saved and restored per rank.
        input_record: the student's input (``image_size``, ``mean``, ``std``), saved for runs that
            distil from this checkpoint.
        teacher_source: its ``identity()`` (a cache's) is saved and compared on resume.
        lr, steps_per_epoch: this run's, which a resume from another world size follows.
    """

    def __init__(self, cfg: C.TrainConfig, out: Path, dist: D.DistInfo, *, resolved: dict, student: nn.Module,
                 optimizer, scheduler, scaler, dpk: Optional[nn.Module], classes, train_loader, input_record: dict,
                 teacher_source, lr: float, steps_per_epoch: int):
        self.cfg, self.out, self.dist, self.resolved = cfg, out, dist, resolved
        self.student, self.optimizer, self.scheduler, self.scaler, self.dpk = student, optimizer, scheduler, scaler, dpk
        self.classes, self.train_loader, self.input_record = classes, train_loader, input_record
        self.teacher_source, self.lr, self.steps_per_epoch = teacher_source, lr, steps_per_epoch

    def cache_identity(self) -> Optional[dict]:
        identity = getattr(self.teacher_source, "identity", None)
        return identity() if callable(identity) else None

    # ---- saving ---------------------------------------------------------------------------
    def state(self, epoch: int, step_in_epoch: int, loader_state: dict, progress: Optional[dict], *,
              global_step: int, best_top1: float) -> dict:
        """Full training state; RNG and loader states are gathered from every rank."""
        cfg = self.cfg
        rngs = D.all_gather_object(ckpt.rng_state(), self.dist)
        loaders = D.all_gather_object(loader_state, self.dist)
        return {
            "format": "fastkd-train/1",
            "model": self.student.state_dict(),
            "model_name": cfg.student,
            "classes": list(self.classes),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "dpk": self.dpk.state_dict() if self.dpk is not None else None,
            "epoch": epoch,  # the epoch to continue in
            "step_in_epoch": step_in_epoch,  # its batches already trained
            "global_step": global_step,
            "best_top1": best_top1,
            "epoch_progress": progress,  # running sums of a partly trained epoch
            "rng": rngs,
            "loader": loaders,
            "world_size": self.dist.world_size,
            "config": dataclasses.asdict(cfg),
            "resolved_config": self.resolved,  # defaults made explicit
            "teacher_cache": self.cache_identity(),
            # What the student's input was: a run distilling from this checkpoint normalises its teacher view so.
            "input": self.input_record,
        }

    def save(self, state: dict, *, best: bool = False, epoch_file: Optional[int] = None) -> None:
        """``last.pt`` written atomically by the main process (``best.pt`` / ``epoch_N.pt`` linked to it)."""
        if self.dist.is_main:
            path = ckpt.save_atomic(state, self.out / ckpt.LAST)
            if best:
                ckpt.link_atomic(path, self.out / ckpt.BEST)
            if epoch_file is not None:
                ckpt.link_atomic(path, self.out / f"epoch_{epoch_file}.pt")
        D.barrier(self.dist)

    # ---- resuming -------------------------------------------------------------------------
    def _find(self) -> Optional[tuple[Path, dict]]:
        """The checkpoint ``--resume`` names (``auto``: the latest in ``out``), agreed on by every rank."""
        cfg = self.cfg
        if cfg.resume is None:
            return None
        if cfg.resume == "auto":
            if self.dist.is_main:
                ckpt.remove_stale_temp_files(self.out)
            D.barrier(self.dist)
            found = ckpt.find_latest(self.out)
            D.agree_on_checkpoint(None if found is None else found[1], self.dist, self.out)
            if found is None:
                logger.info("fastkd: --resume auto: no checkpoint in %s, starting from scratch", self.out)
            return found
        path = Path(cfg.resume)
        state = ckpt.load(path)
        D.agree_on_checkpoint(state, self.dist, path)
        return path, state

    def _check(self, path: Path, state: dict) -> None:
        """Refuse a checkpoint this run cannot continue (naming the setting); warn about settings
        that differ from its run's."""
        cfg = self.cfg
        saved = state.get("config", {})
        for key in RESUME_SAME_KEYS:
            if key in saved and saved[key] != getattr(cfg, key):
                raise ValueError(f"checkpoint {path} was trained with {C.flag(key)} {saved[key]!r}, this run asks for "
                                 f"{getattr(cfg, key)!r}: it cannot continue that run (resume with the same "
                                 f"{C.flag(key)}, or start a new --output)")
        if state.get("classes") is not None and len(state["classes"]) != len(self.classes):
            raise ValueError(f"checkpoint {path} was trained on {len(state['classes'])} classes, --data holds "
                             f"{len(self.classes)}: it cannot continue on this data set")
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.dist.world_size and int(state["step_in_epoch"]) != 0:
            raise ValueError(f"checkpoint {path} was written in the middle of an epoch by {saved_world} process(es) "
                             f"and this run has {self.dist.world_size}: a position inside an epoch's shards cannot "
                             f"move to other shards; resume with {saved_world} process(es), or from an epoch-end "
                             f"checkpoint (epoch_N.pt, kept with --save-every)")
        # Compare what each run resolved (a default such as lr or amp made explicit is no change);
        # a checkpoint from before resolved configs: compare the given values, a saved default aside.
        now = self.resolved
        was = state.get("resolved_config")
        if was is None:
            was = {k: v for k, v in saved.items() if v is not None}
            changed = sorted(k for k in was if k in now and k not in RESUME_FREE_KEYS
                             and was[k] != now[k] and was[k] != getattr(cfg, k, None))
        else:
            changed = sorted(k for k in was if k in now and k not in RESUME_FREE_KEYS and was[k] != now[k])
        if changed:
            logger.warning("fastkd: resuming with settings that differ from the checkpoint's run: %s",
                           ", ".join(f"{k}: {was[k]!r} -> {now[k]!r}" for k in changed))
        was_cache, now_cache = state.get("teacher_cache"), self.cache_identity()
        if was_cache is not None and now_cache is not None and was_cache != now_cache:
            logger.warning("fastkd: resuming with a teacher cache that holds other outputs than the one the "
                           "checkpoint's run read (%s): the rest of the run distils other teacher logits",
                           ", ".join(k for k in now_cache if was_cache.get(k) != now_cache[k]))
        if state.get("classes") is not None and list(state["classes"]) != list(self.classes):
            raise ValueError(f"checkpoint {path} was trained on other classes than the data set in --data")

    def resume(self) -> Optional[Position]:
        """Load the checkpoint named by --resume (if any) into the modules, the RNGs and the loader;
        None when the run starts from scratch."""
        found = self._find()
        if found is None:
            return None
        path, state = found
        logger.info("fastkd: resuming from %s (epoch %d, step %d of it, global step %d)", path, state["epoch"],
                    state["step_in_epoch"], state["global_step"])
        self._check(path, state)
        self.student.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        schedule = self.scheduler.lr_lambdas[0]
        this_run = dict(vars(schedule))
        self.scheduler.load_state_dict(state["scheduler"])  # also overwrites the LRSchedule's attributes
        if vars(schedule) != this_run:
            # --epochs (free to change on resume) or the steps per epoch differ: follow this run's
            # schedule, not the checkpoint's (whose cosine would end at the old last epoch, LR 0).
            vars(schedule).update(this_run)
            self._set_lrs([base * schedule(self.scheduler.last_epoch) for base in self.scheduler.base_lrs])
            logger.info("fastkd: the LR schedule follows this run's %d epochs x %d steps", self.cfg.epochs,
                        self.steps_per_epoch)
        self.scaler.load_state_dict(state["scaler"])
        if self.dpk is not None:
            if state.get("dpk") is None:
                raise ValueError(f"checkpoint {path} has no DPK state but this run uses --method dpk")
            self.dpk.load_state_dict(state["dpk"])
        at = Position(int(state["epoch"]), int(state["step_in_epoch"]), int(state["global_step"]),
                      float(state["best_top1"]), state.get("epoch_progress"))
        saved_world, rank = int(state.get("world_size", 1)), self.dist.rank
        regrid = saved_world != self.dist.world_size
        if not regrid:
            ckpt.set_rng_state(state["rng"][rank])
            self.train_loader.load_state_dict(state["loader"][rank])
        else:
            ckpt.set_rng_state(state["rng"][rank % saved_world])
        if self.dist.is_main:
            truncate_metrics(self.out, at.global_step)
        if regrid:
            self._regrid(at, saved_world)
        return at

    def _set_lrs(self, lrs: list) -> None:
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self.scheduler._last_lr = lrs

    def _regrid(self, at: Position, saved_world: int) -> None:
        """Continue an epoch-end checkpoint of another world size on this run's grid: the global
        step counts this run's steps per epoch, and the LR follows this run's schedule and rate
        (``--lr`` as given, else ``lr_base`` x this run's global batch / 256). The data order of
        the next epoch is keyed by (seed, epoch), so the new shards continue it exactly."""
        old_step = at.global_step
        at.global_step = at.epoch * self.steps_per_epoch
        sched = self.scheduler
        for group in self.optimizer.param_groups:
            group["initial_lr"] = self.lr
        sched.base_lrs = [self.lr for _ in self.optimizer.param_groups]
        sched.last_epoch = at.global_step
        self._set_lrs([base * sched.lr_lambdas[0](sched.last_epoch) for base in sched.base_lrs])
        logger.warning("fastkd: checkpoint from %d process(es), resuming with %d at the start of epoch %d: global step "
                       "%d -> %d (%d steps per epoch now), learning rate %.4g for the global batch of %d",
                       saved_world, self.dist.world_size, at.epoch + 1, old_step, at.global_step,
                       self.steps_per_epoch, self.lr, self.cfg.batch_size * self.dist.world_size)


def truncate_metrics(out: Path, global_step: int) -> None:
    """Drop metrics records written after the checkpoint at ``global_step`` (the resumed run writes them again)."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return
    rows = read_metrics(path)
    keep = [r for r in rows if r.get("global_step", 0) <= global_step]
    if len(keep) != len(rows):
        tmp = path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        os.replace(tmp, path)
