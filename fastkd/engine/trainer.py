"""The distillation loop: ``train(cfg)`` runs a whole ``fastkd train``.

The :class:`Trainer` reads as a recipe: :meth:`~Trainer.setup` resolves the run's settings from
the config and the device, then builds the loaders, the student, the teacher source, the loss and
the optimizer, and resumes a checkpoint (:mod:`fastkd.engine.resume`); :meth:`~Trainer.run` trains
the epochs, validates and saves. Each epoch reads as a story: :func:`fastkd.engine.pipeline.steps`
yields the batches, each paired with its own teacher output from a teacher source
(:mod:`fastkd.engine.teacher`: the online model one batch ahead on its own stream, or a cache) and
the loader state to resume after it; for each step the loop runs the student step (forward, loss,
backward, optimizer), adds to the meters, maybe writes a log line and maybe a mid-epoch checkpoint.

Per epoch the engine logs the train loss (and its CE / KD terms), the student's validation
top-1/top-5 counted exactly over all ranks (padding excluded), with a teacher model the
teacher's top-1, teacher-student top-1 agreement and mean KL(teacher || student) at T=1,
images/s and the step-time breakdown (:mod:`fastkd.engine.meters`); it then writes ``last.pt``
(and ``best.pt``, ``epoch_N.pt``) atomically. Non-finite numbers stop the run before anything
non-finite is saved (:mod:`fastkd.engine.nonfinite`).
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import os
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .. import __version__
from .._device import cpu_cores
from . import checkpoint as ckpt
from .runlock import lock_output
from . import config as C
from . import distributed as D
from . import parts as P
from .meters import EpochMeters, SkippedFiles, epoch_line, evaluate
from .metrics import MetricsLogger, Progress
from .nonfinite import FiniteChecks
from .pipeline import steps
from .resume import Checkpoints, Position
from .runner import autocast_context
from .teacher import OnlineTeacher, TeacherOutput, TeacherSource
from .timing import StepTimer

__all__ = ["Trainer", "train", "evaluate", "EpochMeters"]

logger = logging.getLogger("fastkd")


class Trainer:
    """Holds the state of one ``fastkd train`` run; :meth:`run` trains and returns a summary.

    ``teacher_source``: where the teacher outputs come from. None (the default) runs the teacher
    model online (:class:`~fastkd.engine.teacher.OnlineTeacher`). Otherwise a
    :class:`~fastkd.engine.teacher.TeacherSource`, or a callable ``f(trainer) -> TeacherSource``
    called once the loaders exist (``trainer.train_loader``, ``trainer.classes``,
    ``trainer.device``, ``trainer.settings`` are set); a source without a model (``has_model=False``,
    e.g. the teacher-output cache, :func:`fastkd.recipes.train`) means no teacher model is built:
    no teacher forward, no teacher memory, no teacher validation metrics.
    """

    def __init__(self, cfg: C.TrainConfig, teacher_source=None):
        C.ensure_valid(cfg)
        if teacher_source is None and cfg.teacher_cache is not None:
            raise C.ConfigError("--teacher-cache: the engine alone does not read teacher caches; run this config "
                                "with fastkd.recipes.train(cfg) (what 'fastkd train' calls), or pass "
                                "teacher_source=fastkd.cache.source.CachedTeacher.for_trainer")
        self.cfg = cfg
        self._teacher_source_arg = teacher_source
        if cfg.deterministic:
            # cuBLAS needs this before its first use to be deterministic.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        self.dist = D.init(cfg.device, timeout_s=cfg.dist_timeout)
        self.device = self.dist.device
        self.is_main = self.dist.is_main
        if not self.is_main:
            logger.setLevel(logging.WARNING)
        self.out = Path(cfg.output)

    # The resolved settings under the names the teacher sources and tests read.
    amp = property(lambda self: self.settings.amp)
    amp_dtype = property(lambda self: self.settings.amp_dtype)
    use_teacher_at_all = property(lambda self: self.settings.use_teacher)
    lr = property(lambda self: self.settings.lr)

    # ---- set-up ---------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        self.settings = s = P.resolve(cfg, self.device, self.dist.world_size)  # what all else depends on
        P.seed(cfg, self.device)
        # Folders this run creates (the output and missing parents): a failed run removes them if empty.
        self._created_dirs = [p for p in (self.out, *self.out.parents) if not p.exists()]
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        D.barrier(self.dist)
        self._lock = lock_output(self.out, "run", self.dist)  # one run per folder; refuses a cache folder
        self.timer = StepTimer(self.device)
        data = P.make_loaders(cfg, self.dist, self.device, s.use_teacher)
        self.train_loader, self.val_loader, self.classes = data.train, data.val, data.classes
        self.student_norm, self.teacher_view = data.student_norm, data.teacher_view
        self.steps_per_epoch = len(self.train_loader)
        self.skipped = SkippedFiles(self.train_loader, self.device, self.dist)
        self.student = P.make_student(cfg, len(self.classes), self.device)
        self._make_teacher(s)  # the one place the teacher source is chosen
        self.loss_fn, self.ce_only = P.make_loss(cfg, len(self.classes))
        self.dpk = self.student_hooks = None
        if cfg.method == "dpk":
            self.dpk, self.student_hooks = P.make_dpk(cfg, self.student, self.teacher, self.dpk_stages,
                                                      self.teacher_stages, self.device)
        self.clip_params = [*self.student.parameters(), *(self.dpk.parameters() if self.dpk is not None else ())]
        self.optimizer, self.scheduler, self.scaler = P.make_optim(cfg, self.clip_params, s, self.steps_per_epoch,
                                                                   self.device)
        # Once: the run's settings are fixed from here on (saved in config.yaml and every checkpoint).
        self.resolved_config = P.resolved_config(cfg, s, self.loss_fn, (self.dpk_stages, self.teacher_stages)
                                                 if self.dpk is not None else None)
        self.checkpoints = Checkpoints(
            cfg, self.out, self.dist, resolved=dataclasses.asdict(self.resolved_config), student=self.student,
            optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler, dpk=self.dpk,
            classes=self.classes, train_loader=self.train_loader, teacher_source=self.teacher_source, lr=s.lr,
            steps_per_epoch=self.steps_per_epoch, input_record={
                "image_size": cfg.image_size, "mean": list(self.student_norm[0]), "std": list(self.student_norm[1])})
        at = self.checkpoints.resume()
        self.resumed = at is not None
        if not self.resumed and (self.out / ckpt.LAST).exists():
            raise ValueError(f"--output {self.out} already holds a run (last.pt); continue it with --resume auto "
                             f"or choose another --output")
        at = at or Position()
        self.start_epoch, self.start_batch, self.global_step = at.epoch, at.batch, at.global_step
        self.best_top1, self.progress_state = at.best_top1, at.progress
        self._wrap_for_training()
        if not self.resumed:
            self._check_teacher()
        self.metrics = MetricsLogger(self.out, enabled=self.is_main, append=self.resumed)
        self.finite = FiniteChecks(self.out, self.dist, self.device, self.metrics, lr=s.lr, amp=s.amp,
                                   last_finite_step=self.global_step, source_check=self._source_report)
        if self.is_main:
            self._write_config()

    def _make_teacher(self, s: P.Settings) -> None:
        """``self.teacher_source`` (None without a teacher) and ``self.teacher`` (its model, None for a
        source without one): the source given to the Trainer, else the teacher model run online."""
        from ..models import check_input_size
        from .teacher_setup import build_teacher

        cfg, src = self.cfg, self._teacher_source_arg
        self.teacher, self.teacher_source = None, None
        self.dpk_stages = self.teacher_stages = None
        if not s.use_teacher:
            return
        if src is not None:
            source = src if isinstance(src, TeacherSource) else src(self)
            if not isinstance(source, TeacherSource):
                raise TypeError(f"teacher_source must be a TeacherSource or return one, got {type(source).__name__}")
            if cfg.method == "dpk" and not source.provides_features:
                raise ValueError(f"--method dpk needs the teacher's features, which {type(source).__name__} "
                                 f"does not provide: run DPK with the online teacher")
            self.teacher_source = source
            self.teacher = getattr(source, "model", None)  # DPK sizes its projections with it
            self.dpk_stages, self.teacher_stages = P.dpk_stages(cfg)
            return
        teacher = build_teacher(cfg, self.classes)
        check_input_size(teacher, cfg.teacher, cfg.teacher_image_size or cfg.image_size,
                         "--teacher-image-size" if cfg.teacher_image_size else "--image-size")
        if not (cfg.teacher_checkpoint or cfg.teacher_pretrained):
            logger.warning("fastkd: no --teacher-checkpoint: the teacher %s is randomly initialised "
                           "(fine for benchmarks, useless for distillation)", cfg.teacher)
        self.dpk_stages, self.teacher_stages = P.dpk_stages(cfg)
        self.teacher = teacher
        self.teacher_source = OnlineTeacher.from_model(
            teacher, self.device, amp_dtype=s.amp_dtype, channels_last=cfg.channels_last,
            concurrent=not cfg.sequential, cuda_graph=cfg.teacher_cuda_graph, compile=cfg.compile,
            feature_layers=self.teacher_stages, timer=self.timer)

    def _wrap_for_training(self) -> None:
        """Wrappers for training only: DDP (the student and DPK's trainable modules; never the
        teacher), then torch.compile. Validation and checkpoints use the plain modules."""
        self.student_train, self.dpk_train = self.student, self.dpk
        if self.dist.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.student_train = DDP(self.student, device_ids=ids)
            if self.dpk is not None:
                self.dpk_train = DDP(self.dpk, device_ids=ids)
        if self.cfg.compile:
            self.student_train = torch.compile(self.student_train)

    def _release_process_group(self) -> None:
        """Drop the DDP wrappers, leave the process group, and free what held it now, while the
        interpreter is fully alive: a DDP reducer left to interpreter exit (the trainer sits in
        reference cycles) takes gloo's communication threads down during finalisation, which can
        abort a finished rank (SIGABRT, "terminate called without an active exception")."""
        self.student_train, self.dpk_train = getattr(self, "student", None), getattr(self, "dpk", None)
        D.shutdown(self.dist)
        if self.dist.distributed:
            gc.collect()

    def _check_teacher(self) -> None:
        """Before epoch 0: the teacher's top-1 on a few validation batches; near chance stops the run
        (--check-teacher; see :func:`fastkd.engine.teacher_setup.check_teacher`)."""
        from .teacher_setup import check_teacher, has_weights

        cfg, source = self.cfg, self.teacher_source
        if not cfg.check_teacher or source is None or not source.has_model or cfg.data_backend == "synthetic":
            return
        if not has_weights(cfg):
            return  # a randomly initialised teacher (--random-teacher): nothing to check
        check_teacher(source, self.val_loader, self.device, len(self.classes), name=cfg.teacher,
                      view=self.teacher_view, what="fastkd train", dist=self.dist)

    def _write_config(self) -> None:
        """config.yaml (the resolved config: re-running it repeats this run) and the run's first log line."""
        cfg = self.cfg
        concurrent = bool(self.teacher_source is not None and self.teacher_source.concurrent)
        extra = {"world_size": self.dist.world_size, "device": str(self.device), "classes": len(self.classes),
                 "steps_per_epoch": self.steps_per_epoch, "global_batch": cfg.batch_size * self.dist.world_size,
                 "fastkd": __version__, "torch": str(torch.__version__), "concurrent_teacher": concurrent}
        C.save_yaml(self.resolved_config, self.out / "config.yaml", extra)
        teacher = getattr(self.teacher_source, "teacher_name", None) or cfg.teacher or "(no teacher)"
        logger.info("fastkd train: %s -> %s, method %s, %d classes, %d steps/epoch x %d epochs, lr %.4g, amp %s, "
                    "device %s x %d%s", teacher, cfg.student, cfg.method, len(self.classes),
                    self.steps_per_epoch, cfg.epochs, self.lr, self.amp, self.device, self.dist.world_size,
                    ", concurrent teacher stream" if concurrent else "")

    # ---- checkpoints ----------------------------------------------------------------------
    def _state(self, epoch: int, step_in_epoch: int, loader_state: dict, progress: Optional[dict]) -> dict:
        return self.checkpoints.state(epoch, step_in_epoch, loader_state, progress, global_step=self.global_step,
                                      best_top1=self.best_top1)

    def _source_report(self, epoch: Optional[int] = None) -> dict:
        """The teacher source's check of the epoch (a cache: the epoch file's checksum, verified before
        any checkpoint is written, and its teacher's top-1 on the training rows); {} for other sources."""
        report = getattr(self.teacher_source, "epoch_report", None)
        return report(epoch) if callable(report) else {}

    def _save(self, state: dict, *, best: bool = False, epoch_file: Optional[int] = None) -> None:
        self._source_report()  # raises (on every rank) when the teacher rows just trained on were damaged
        epoch = state["epoch"] - (state["step_in_epoch"] == 0)
        self.finite.require_finite_weights(epoch, self.global_step, self.student, self.dpk, state)  # never save NaN
        self.checkpoints.save(state, best=best, epoch_file=epoch_file)

    # ---- training -------------------------------------------------------------------------
    def _teacher_used(self, epoch: int) -> bool:
        if self.teacher_source is None:
            return False
        return self.cfg.eskd_stop_epoch is None or epoch < self.cfg.eskd_stop_epoch

    def _checkpoint_due(self, step_index: int) -> bool:
        """Whether a mid-epoch checkpoint follows the step on batch ``step_index`` (0-based)."""
        every = self.cfg.checkpoint_interval
        return bool(every) and (self.global_step + 1) % every == 0 and step_index + 1 < self.steps_per_epoch

    def _step(self, batch, tout: Optional[TeacherOutput], loss_fn, epoch_pos: float) -> Tensor:
        images = batch.images.to(self.device, non_blocking=True)
        labels = batch.labels.to(self.device, non_blocking=True)
        t_logits = tout.logits if tout is not None else None
        # Wrap-around padding evens out DDP shards; it must not count twice: the loss leaves the
        # rows with valid=False out, for every method (DIST's batch statistics included).
        valid = batch.valid.to(self.device, non_blocking=True) if batch.valid is not None else None
        loss_fn.set_epoch(epoch_pos)
        dpk_on = self.dpk is not None and tout is not None
        with self.timer.section("forward"):
            with autocast_context(self.device, self.amp_dtype):
                logits = self.student_train(images)
        with self.timer.section("loss"):
            # The logit losses upcast to fp32 themselves (and pick the fused kernel on CUDA).
            loss = loss_fn(logits, t_logits, labels, valid=valid)
            if dpk_on:
                feats = self.student_hooks.features
                with autocast_context(self.device, self.amp_dtype):
                    dpk = self.dpk_train(feats, tout.features, valid=valid)
                loss = loss + self.cfg.dpk_weight * dpk
        with self.timer.section("backward"):
            self.scaler.scale(loss).backward()
        with self.timer.section("optimizer"):
            if self.cfg.clip_grad is not None:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.clip_params, self.cfg.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
        return loss.detach()

    def _log_step(self, epoch: int, loss: Tensor, meters: EpochMeters, bar) -> None:
        loss_value = self.finite.logged_loss(loss, meters.sums[0], epoch, self.global_step)
        self.timer.flush()  # resolve this interval's CUDA timing events (bounded memory)
        lr = self.optimizer.param_groups[0]["lr"]
        self.metrics.write("step", {"epoch": epoch, "global_step": self.global_step, "loss": loss_value,
                                    "lr": lr, "images_per_s_rank": meters.rate()})
        bar.update(0, loss=f"{loss_value:.4f}", lr=f"{lr:.3g}")

    def _train_epoch(self, epoch: int) -> dict:
        """For each step of the pipeline: the student step, meters, maybe a log line, maybe a checkpoint."""
        cfg = self.cfg
        self.student.train()
        if self.dpk is not None:
            self.dpk.train()
        n_steps = self.steps_per_epoch
        first_step, self.start_batch = self.start_batch, 0
        use_teacher = self._teacher_used(epoch)
        loss_fn = self.loss_fn if (use_teacher or self.teacher_source is None) else self.ce_only
        if self.teacher_source is not None and not use_teacher and epoch == cfg.eskd_stop_epoch:
            logger.info("fastkd: ESKD: from epoch %d on the KD weight is 0 and the teacher forward is skipped", epoch)
        self.timer.reset()
        meters = EpochMeters(self.device, self.progress_state, self.timer)  # restores a resumed partial epoch
        self.progress_state = None
        bar = Progress(n_steps, f"epoch {epoch + 1}/{cfg.epochs}", self.is_main, initial=first_step)
        step_in_epoch = first_step
        # want_state decides once per step whether a checkpoint follows it: only those steps carry
        # the loader state to resume after them.
        for step in steps(self.train_loader, self.teacher_source if use_teacher else None, epoch, start=first_step,
                          want_state=self._checkpoint_due, timer=self.timer):
            loss = self._step(step.batch, step.teacher, loss_fn, epoch + step.index / n_steps)
            meters.add(loss, loss_fn.last_terms, step.batch)
            step_in_epoch = step.index + 1
            self.global_step += 1
            if self.global_step % cfg.log_interval == 0 or step_in_epoch == n_steps:
                self._log_step(epoch, loss, meters, bar)
            bar.update(1)
            if step.loader_state_after is not None:  # _checkpoint_due said so
                self._save(self._state(epoch, step_in_epoch, step.loader_state_after, meters.state_dict()))
        bar.close()
        record = meters.summary(epoch, global_step=self.global_step, lr=self.optimizer.param_groups[0]["lr"],
                                steps=step_in_epoch, first_step=first_step, teacher_forward=use_teacher, dist=self.dist)
        if record["train_samples"] == 0 and step_in_epoch > first_step:
            skipped = (f"; the loader skipped {int(getattr(self.train_loader, 'skipped', 0))} corrupt file(s) "
                       f"(--skip-corrupt): are all the training images damaged?" if cfg.skip_corrupt else "")
            raise ValueError(f"epoch {epoch + 1} trained on no valid image: every row of its "
                             f"{step_in_epoch - first_step} step(s) was left out{skipped}")
        if self.dpk is not None:
            record["dpk_ratios"] = self.dpk.ratios
        return record

    def _threads(self) -> Optional[int]:
        """``--threads``, else on CPU half the cores (at most 8) unless OMP_NUM_THREADS chose; None: leave."""
        if self.cfg.threads is not None:
            return self.cfg.threads
        if self.device.type != "cpu" or os.environ.get("OMP_NUM_THREADS"):
            return None
        return max(1, min(8, cpu_cores() // 2))

    def run(self) -> dict:
        cfg = self.cfg
        records = []
        previous_threads = torch.get_num_threads()
        threads = self._threads()
        if threads is not None and threads != previous_threads:
            torch.set_num_threads(threads)  # restored below: the caller's process keeps its setting
            logger.info("fastkd: %d math thread(s) (--threads to change; speed only)", threads)
        failed = True
        try:
            self.setup()
            if self.start_epoch >= cfg.epochs:
                logger.info("fastkd: the checkpoint has already finished all %d epochs", cfg.epochs)
            for epoch in range(self.start_epoch, cfg.epochs):
                record = self._train_epoch(epoch)
                # A damaged cache epoch is named first (it may be why the weights went non-finite).
                record.update(self._source_report(epoch) if record["teacher_forward"] else {})
                # before validation reports anything of them
                self.finite.require_finite_weights(epoch, self.global_step, self.student, self.dpk)
                if cfg.skip_corrupt:
                    record.update(self.skipped.epoch_counts())
                D.broadcast_buffers(self.student, self.dist)
                source = self.teacher_source
                record.update(evaluate(self.student, self.val_loader, self.device,
                                       teacher=source if source is not None and source.has_model else None,
                                       amp_dtype=self.amp_dtype, dist=self.dist))
                # accuracies depend slightly on the decoder (DALI vs PIL): every record names it
                record.update(loader=self.val_loader.backend, decoder=getattr(self.val_loader, "decoder", "?"))
                is_best = record["val_top1"] > self.best_top1
                self.best_top1 = max(self.best_top1, record["val_top1"])
                record["best_top1"] = self.best_top1
                records.append(record)
                self.metrics.write("epoch", record, step=self.global_step)
                logger.info(epoch_line(record, cfg.epochs))
                keep_epoch = cfg.save_every and (epoch + 1) % cfg.save_every == 0
                self._save(self._state(epoch + 1, 0, self.train_loader.state_dict(), None), best=is_best,
                           epoch_file=epoch + 1 if keep_epoch else None)
            failed = False
            return {"output": str(self.out), "epochs": records, "best_top1": self.best_top1,
                    "final": records[-1] if records else None, "global_step": self.global_step}
        except RuntimeError as exc:
            error = D.collective_error(exc, self.dist.rank, cfg.dist_timeout) if self.dist.distributed else None
            if error is not None:  # another rank stopped (timeout) or died (connection reset): one line
                raise error from exc
            raise
        finally:
            torch.set_num_threads(previous_threads)
            if getattr(self, "metrics", None) is not None:
                self.metrics.close()
            if getattr(self, "teacher_source", None) is not None:
                self.teacher_source.close()
            if getattr(self, "student_hooks", None) is not None:
                self.student_hooks.remove()
            for loader in (getattr(self, "train_loader", None), getattr(self, "val_loader", None)):
                if loader is not None:
                    loader.close()
            self._release_process_group()
            if getattr(self, "_lock", None) is not None:
                self._lock.release()
            if failed and self.is_main:
                for folder in getattr(self, "_created_dirs", ()):
                    try:
                        folder.rmdir()  # a failed run leaves no empty output folder (rmdir: only if empty)
                    except OSError:
                        break


def train(cfg: C.TrainConfig) -> dict:
    """Run ``fastkd train`` with a config; returns ``{"output", "epochs": [records], "best_top1", ...}``.

    The engine's teacher is the online model; a config with ``teacher_cache`` runs through
    :func:`fastkd.recipes.train`, which also picks the cache's teacher source."""
    return Trainer(cfg).run()
