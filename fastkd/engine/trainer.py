"""The distillation loop: ``train(cfg)`` runs a whole ``fastkd train``.

Each epoch reads as a story: :func:`fastkd.engine.pipeline.steps` yields the batches, each
paired with its own teacher output from a teacher source (:mod:`fastkd.engine.teacher`: the
online model one batch ahead on its own stream, or a cache) and the loader state to resume
after it; for each step the loop runs the student step (forward, loss, backward, optimizer),
adds to the meters, maybe writes a log line and maybe a mid-epoch checkpoint.

Per epoch the engine logs the train loss (and its CE / KD terms), the student's validation
top-1/top-5 counted exactly over all ranks (padding excluded), with a teacher model the
teacher's top-1, teacher-student top-1 agreement and mean KL(teacher || student) at T=1,
images/s and the step-time breakdown; it then writes ``last.pt`` (and ``best.pt``, ``epoch_N.pt``) atomically.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn

from .. import __version__
from .._device import cpu_cores
from .._runlock import lock_output
from ..losses import DistillLoss
from ..losses import reference as ref
from ..losses.tolerant import TolerantTeacherLoss
from . import checkpoint as ckpt
from . import config as C
from . import distributed as D
from .metrics import MetricsLogger, Progress, read_metrics
from .optim import LRSchedule, build_optimizer, build_scheduler
from .pipeline import steps
from .runner import TeacherOutput, autocast_context
from .teacher import OnlineTeacher, TeacherSource
from .timing import StepTimer

logger = logging.getLogger("fastkd")

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}
IGNORE_INDEX = -100
# Config keys that may differ between a checkpoint's run and the run resuming it.
# Config keys that must be the same: the checkpoint's state cannot fit another value (checked
# before anything is loaded, so the error names the setting, not a state_dict mismatch).
_RESUME_SAME_KEYS = ("student", "teacher", "method", "dpk_logit", "opt", "image_size", "teacher_image_size",
                     "dpk_stages", "dpk_teacher_stages")
_RESUME_FREE_KEYS = {"resume", "output", "epochs", "log_interval", "device", "workers", "save_every",
                     "checkpoint_interval", "data", "threads", "dist_timeout", "skip_corrupt"}


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------
class Trainer:
    """Holds the state of one ``fastkd train`` run; :meth:`run` trains and returns a summary.

    ``teacher_source``: where the teacher outputs come from. None (the default) runs the teacher
    model online (:class:`~fastkd.engine.teacher.OnlineTeacher`). Otherwise a
    :class:`~fastkd.engine.teacher.TeacherSource`, or a callable ``f(trainer) -> TeacherSource``
    called once the loaders exist (``trainer.train_loader``, ``trainer.classes``,
    ``trainer.device`` are set); a source without a model (``has_model=False``, e.g. a cache)
    means no teacher model is built: no teacher forward, no teacher memory, no teacher
    validation metrics.
    """

    def __init__(self, cfg: C.TrainConfig, teacher_source=None):
        C.validate(cfg)
        self.cfg = cfg
        if teacher_source is None and cfg.teacher_cache is not None:
            from ..cache.source import CachedTeacher  # --teacher-cache DIR: no teacher model

            teacher_source = CachedTeacher.for_trainer
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

    # ---- set-up ---------------------------------------------------------------------------
    def _seed(self) -> None:
        import random

        # The same seed on every rank: identical initial weights (DDP also broadcasts them).
        torch.manual_seed(self.cfg.seed)
        np.random.seed(self.cfg.seed % 2**32)
        random.seed(self.cfg.seed)
        if self.cfg.deterministic:
            # warn_only: a few CUDA kernels (e.g. adaptive pooling's backward) have no
            # deterministic version; PyTorch then warns naming them instead of failing the run.
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    def _make_loaders(self) -> None:
        from ..data import create_loader

        cfg = self.cfg
        tis = None
        if self.use_teacher_at_all and cfg.teacher_image_size not in (None, cfg.image_size):
            tis = cfg.teacher_image_size
        common = dict(backend=cfg.data_backend, image_size=cfg.image_size, teacher_image_size=tis,
                      **self._view_norms(),
                      shard_id=self.dist.rank, num_shards=self.dist.world_size, seed=cfg.seed,
                      num_threads=cfg.workers, device=self.device, channels_last=cfg.channels_last,
                      skip_corrupt=cfg.skip_corrupt)
        if cfg.augment != "imagenet":
            import inspect

            if "augment" not in inspect.signature(create_loader).parameters:
                raise C.ConfigError(f"--augment {cfg.augment}: this version's data loaders offer only the imagenet "
                                    f"augmentation")
            common["augment"] = cfg.augment
        if cfg.data_backend == "synthetic" and cfg.data is None:
            n = cfg.synthetic_samples
            common["synthetic_classes"] = cfg.synthetic_classes
            train_extra = {"synthetic_samples": n}
            val_extra = {"synthetic_samples": None if n is None else max(self.dist.world_size, n // 25)}
        else:
            train_extra = val_extra = {}
        self.train_loader = create_loader(cfg.data, train=True, batch_size=cfg.batch_size, **common, **train_extra)
        self.val_loader = create_loader(cfg.data, train=False, batch_size=cfg.val_batch_size or cfg.batch_size,
                                        **common, **val_extra)
        self.classes = self.train_loader.classes
        if self.val_loader.classes != self.classes:
            only_train = sorted(set(self.classes) - set(self.val_loader.classes))[:5]
            only_val = sorted(set(self.val_loader.classes) - set(self.classes))[:5]
            raise ValueError(f"the training and validation sets hold different classes ({len(self.classes)} vs "
                             f"{len(self.val_loader.classes)}; only in training: {only_train}, only in validation: "
                             f"{only_val}): labels would not match")
        self.steps_per_epoch = len(self.train_loader)
        if self.steps_per_epoch == 0:
            raise ValueError("the training loader yields no batches")

    def _view_norms(self) -> dict:
        """The loaders' normalisation keywords: the student's, and the teacher's when it differs
        (:mod:`fastkd.engine.teacher_setup`); the values are kept for checkpoints and the teacher check."""
        from .teacher_setup import student_preprocessing, teacher_preprocessing

        self.student_norm = student_preprocessing(self.cfg)
        out = {"mean": self.student_norm[0], "std": self.student_norm[1]}
        self.teacher_view = None
        if self.use_teacher_at_all:
            self.teacher_view = teacher_preprocessing(self.cfg, self.student_norm, what="fastkd train")
            if (self.teacher_view.mean, self.teacher_view.std) != tuple(self.student_norm):
                out.update(teacher_mean=self.teacher_view.mean, teacher_std=self.teacher_view.std)
                logger.info("fastkd: teacher view normalised with mean %s, std %s (%s)",
                            self.teacher_view.mean, self.teacher_view.std, self.teacher_view.source)
        return out

    def _make_models(self) -> None:
        from ..models import check_input_size
        from .teacher_setup import build_student, build_teacher

        cfg = self.cfg
        num_classes = len(self.classes)
        student = build_student(cfg, num_classes)
        check_input_size(student, cfg.student, cfg.image_size)
        student.to(self.device)
        if cfg.channels_last:
            student.to(memory_format=torch.channels_last)
        self.student = student
        self.teacher = None
        self.teacher_source: Optional[TeacherSource] = None
        src = self._teacher_source_arg
        if src is not None and self.use_teacher_at_all:
            self.teacher_source = src if isinstance(src, TeacherSource) else src(self)
            if not isinstance(self.teacher_source, TeacherSource):
                raise TypeError(f"teacher_source must be a TeacherSource or return one, got "
                                f"{type(self.teacher_source).__name__}")
            if cfg.method == "dpk" and not self.teacher_source.provides_features:
                raise ValueError(f"--method dpk needs the teacher's features, which {type(self.teacher_source).__name__} "
                                 f"does not provide: run DPK with the online teacher")
            self.teacher = getattr(self.teacher_source, "model", None)  # DPK sizes its projections with it
        elif self.use_teacher_at_all:
            teacher = build_teacher(cfg, self.classes)
            check_input_size(teacher, cfg.teacher, cfg.teacher_image_size or cfg.image_size,
                             "--teacher-image-size" if cfg.teacher_image_size else "--image-size")
            if not (cfg.teacher_checkpoint or cfg.teacher_pretrained):
                logger.warning("fastkd: no --teacher-checkpoint: the teacher %s is randomly initialised "
                               "(fine for benchmarks, useless for distillation)", cfg.teacher)
            self.teacher = teacher

    def _make_loss(self) -> None:
        cfg = self.cfg
        ce_w, kd_w = C.weights(cfg)
        lm = C.logit_method(cfg)
        if cfg.tolerant_eta is not None:
            k = 5 if cfg.tolerant_k is None else cfg.tolerant_k
            if k > len(self.classes):
                raise ValueError(f"--tolerant-k {k} needs at least {k} classes; the data set has {len(self.classes)}")
            self.loss_fn = TolerantTeacherLoss(ce_w, cfg.tolerant_eta, k, cfg.label_smoothing, IGNORE_INDEX, False)
        else:
            from ..losses import methods as M

            # Labels come from the loader's index (always in [0, C)) or are ignore_index for
            # padding, so check_labels=False: the check would cost a device sync every step on CUDA.
            self.loss_fn = DistillLoss(lm, ce_weight=ce_w, kd_weight=kd_w if lm != "ce" else 0.0,
                                       label_smoothing=cfg.label_smoothing, ignore_index=IGNORE_INDEX,
                                       backend=cfg.loss_backend, check_labels=False, **M.loss_kwargs(lm, cfg))
        # After --eskd-stop-epoch (or without a teacher): the CE term alone, same weight.
        self.ce_only = DistillLoss("ce", ce_weight=ce_w, kd_weight=0.0, label_smoothing=cfg.label_smoothing,
                                   ignore_index=IGNORE_INDEX, backend=cfg.loss_backend, check_labels=False)
        self.dpk = None
        self.student_hooks = None
        self.teacher_stages = None
        if cfg.method == "dpk":
            from ..losses.dpk import DPKLoss, FeatureHooks, default_stages, feature_channels

            s_stages = cfg.dpk_stages or default_stages(cfg.student)
            t_stages = cfg.dpk_teacher_stages or (cfg.dpk_stages if cfg.dpk_stages else default_stages(cfg.teacher))
            if len(s_stages) != len(t_stages):
                raise ValueError(f"DPK needs as many teacher stages as student stages: {s_stages} vs {t_stages}")
            s_in = torch.zeros(2, 3, cfg.image_size, cfg.image_size, device=self.device)
            t_size = cfg.teacher_image_size or cfg.image_size
            t_in = torch.zeros(2, 3, t_size, t_size, device=self.device)
            self.teacher.to(self.device)
            s_ch = feature_channels(self.student, s_stages, s_in)
            t_ch = feature_channels(self.teacher, t_stages, t_in)
            # seed=None: the masks draw from torch's global generator, whose state the
            # checkpoints save, so a resumed DPK run repeats the uninterrupted one exactly.
            self.dpk = DPKLoss(s_ch, t_ch, seed=None).to(self.device)
            self.student_hooks = FeatureHooks(self.student, s_stages)
            self.dpk_stages, self.teacher_stages = list(s_stages), list(t_stages)

    def _make_optim(self) -> None:
        cfg = self.cfg
        self.lr = C.resolve_lr(cfg, self.dist.world_size)
        if cfg.min_lr > self.lr:
            raise C.ConfigError(f"--min-lr ({cfg.min_lr:g}) exceeds the learning rate of this run ({self.lr:g}, "
                                f"from --lr-base x global batch / 256): lower --min-lr or give --lr")
        params = list(self.student.parameters()) + (list(self.dpk.parameters()) if self.dpk is not None else [])
        self.optimizer = build_optimizer(cfg.opt, params, lr=self.lr, weight_decay=cfg.weight_decay,
                                         momentum=cfg.momentum)
        schedule = LRSchedule(cfg.sched, self.steps_per_epoch, cfg.epochs, warmup_epochs=cfg.warmup_epochs,
                              min_lr_ratio=cfg.min_lr / self.lr, decay_epochs=cfg.decay_epochs,
                              decay_rate=cfg.decay_rate, milestones=cfg.decay_milestones)
        self.scheduler = build_scheduler(self.optimizer, schedule)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")
        self.clip_params = params

    def _resolve(self) -> None:
        cfg = self.cfg
        self.amp = cfg.amp if cfg.amp != "auto" else ("bf16" if self.device.type == "cuda" else "none")
        self.amp_dtype = AMP_DTYPES[self.amp]
        self.use_teacher_at_all = C.needs_teacher(cfg)
        if cfg.teacher_cuda_graph and self.device.type != "cuda":
            raise ValueError(f"--teacher-cuda-graph (given, or set by the --config preset) needs a CUDA device; this "
                             f"run uses {self.device}: add --no-teacher-cuda-graph to run without it (speed only)")
        C.check_input_files(cfg)  # before the data is indexed (minutes on a large data set)

    def _resolved_config(self) -> C.TrainConfig:
        """The config with every default made explicit: re-running it repeats this run."""
        cfg = dataclasses.replace(self.cfg, amp=self.amp, lr=self.lr, resume=None)
        ce_w, kd_w = C.weights(self.cfg)
        cfg.ce_weight = ce_w
        if C.logit_method(self.cfg) != "ce":
            cfg.kd_weight = kd_w
        if isinstance(self.loss_fn, DistillLoss):
            from ..losses import methods as M

            for key, value in M.config_values(self.loss_fn.method, self.loss_fn.params).items():
                setattr(cfg, key, value)
        if self.cfg.tolerant_eta is not None:
            cfg.tolerant_k = self.loss_fn.k
        if self.dpk is not None:
            cfg.dpk_stages, cfg.dpk_teacher_stages = self.dpk_stages, self.teacher_stages
        return cfg

    def setup(self) -> None:
        cfg = self.cfg
        self._resolve()
        self._seed()
        # Folders this run creates (the output and missing parents): a failed run removes them if empty.
        self._created_dirs = [p for p in (self.out, *self.out.parents) if not p.exists()]
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        D.barrier(self.dist)
        self._lock = lock_output(self.out, "run", self.dist)  # one run per folder; refuses a cache folder
        self._make_loaders()
        self._make_models()
        self._make_loss()
        self._make_optim()
        self.timer = StepTimer(self.device)
        self.start_epoch, self.start_batch, self.global_step = 0, 0, 0
        self.best_top1 = -math.inf
        self.progress_state: Optional[dict] = None
        self.resumed = self._maybe_resume()
        if not self.resumed and (self.out / ckpt.LAST).exists():
            raise ValueError(f"--output {self.out} already holds a run (last.pt); continue it with --resume auto "
                             f"or choose another --output")
        # Wrappers for training only: DDP (the student and DPK's trainable modules; never the
        # teacher), then torch.compile. Validation and checkpoints use the plain modules.
        self.student_train = self.student
        self.dpk_train = self.dpk
        if self.dist.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.student_train = DDP(self.student, device_ids=ids)
            if self.dpk is not None:
                self.dpk_train = DDP(self.dpk, device_ids=ids)
        if cfg.compile:
            self.student_train = torch.compile(self.student_train)
        if self.teacher_source is None and self.teacher is not None:
            self.teacher_source = OnlineTeacher.from_model(
                self.teacher, self.device, amp_dtype=self.amp_dtype, channels_last=cfg.channels_last,
                concurrent=not cfg.sequential, cuda_graph=cfg.teacher_cuda_graph, compile=cfg.compile,
                feature_layers=self.teacher_stages, timer=self.timer)
        if not self.resumed:
            self._check_teacher()
        self.metrics = MetricsLogger(self.out, enabled=self.is_main, append=self.resumed)
        if self.is_main:
            extra = {"world_size": self.dist.world_size, "device": str(self.device), "classes": len(self.classes),
                     "steps_per_epoch": self.steps_per_epoch, "global_batch": cfg.batch_size * self.dist.world_size,
                     "fastkd": __version__, "torch": str(torch.__version__),
                     "concurrent_teacher": bool(self.teacher_source is not None and self.teacher_source.concurrent)}
            C.save_yaml(self._resolved_config(), self.out / "config.yaml", extra)
            teacher = getattr(self.teacher_source, "teacher_name", None) or cfg.teacher or "(no teacher)"
            logger.info("fastkd train: %s -> %s, method %s, %d classes, %d steps/epoch x %d epochs, lr %.4g, amp %s, "
                        "device %s x %d%s", teacher, cfg.student, cfg.method, len(self.classes),
                        self.steps_per_epoch, cfg.epochs, self.lr, self.amp, self.device, self.dist.world_size,
                        ", concurrent teacher stream" if extra["concurrent_teacher"] else "")

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

    # ---- checkpoints ----------------------------------------------------------------------
    def _state(self, epoch: int, step_in_epoch: int, loader_state: dict, progress: Optional[dict]) -> dict:
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
            "global_step": self.global_step,
            "best_top1": self.best_top1,
            "epoch_progress": progress,  # running sums of a partly trained epoch
            "rng": rngs,
            "loader": loaders,
            "world_size": self.dist.world_size,
            "config": dataclasses.asdict(cfg),
            "resolved_config": dataclasses.asdict(self._resolved_config()),  # defaults made explicit
            "teacher_cache": self._cache_identity(),
            # What the student's input was: a run distilling from this checkpoint normalises its teacher view so.
            "input": {"image_size": cfg.image_size, "mean": list(self.student_norm[0]),
                      "std": list(self.student_norm[1])},
        }

    def _cache_identity(self) -> Optional[dict]:
        identity = getattr(self.teacher_source, "identity", None)
        return identity() if callable(identity) else None

    def _source_report(self, epoch: Optional[int] = None) -> dict:
        """The teacher source's check of the epoch (a cache: the epoch file's checksum, verified before
        any checkpoint is written, and its teacher's top-1 on the training rows); {} for other sources."""
        report = getattr(self.teacher_source, "epoch_report", None)
        return report(epoch) if callable(report) else {}

    def _save(self, state: dict, *, best: bool = False, epoch_file: Optional[int] = None) -> None:
        self._source_report()  # raises (on every rank) when the teacher rows just trained on were damaged
        self._require_finite_weights(state["epoch"] - (state["step_in_epoch"] == 0), state)  # never save NaN
        if self.is_main:
            path = ckpt.save_atomic(state, self.out / ckpt.LAST)
            if best:
                ckpt.link_atomic(path, self.out / ckpt.BEST)
            if epoch_file is not None:
                ckpt.link_atomic(path, self.out / f"epoch_{epoch_file}.pt")
        D.barrier(self.dist)

    def _maybe_resume(self) -> bool:
        """Load the checkpoint named by --resume (if any); True when the run continues one."""
        cfg = self.cfg
        if cfg.resume is None:
            return False
        if cfg.resume == "auto":
            if self.is_main:
                ckpt.remove_stale_temp_files(self.out)
            D.barrier(self.dist)
            found = ckpt.find_latest(self.out)
            D.agree_on_checkpoint(None if found is None else found[1], self.dist, self.out)
            if found is None:
                logger.info("fastkd: --resume auto: no checkpoint in %s, starting from scratch", self.out)
                return False
            path, state = found
        else:
            path = Path(cfg.resume)
            state = ckpt.load(path)
            D.agree_on_checkpoint(state, self.dist, path)
        logger.info("fastkd: resuming from %s (epoch %d, step %d of it, global step %d)", path, state["epoch"],
                    state["step_in_epoch"], state["global_step"])
        saved = state.get("config", {})
        for key in _RESUME_SAME_KEYS:
            if key in saved and saved[key] != getattr(cfg, key):
                raise ValueError(f"checkpoint {path} was trained with {C.flag(key)} {saved[key]!r}, this run asks for "
                                 f"{getattr(cfg, key)!r}: it cannot continue that run (resume with the same "
                                 f"{C.flag(key)}, or start a new --output)")
        if state.get("classes") is not None and len(state["classes"]) != len(self.classes):
            raise ValueError(f"checkpoint {path} was trained on {len(state['classes'])} classes, --data holds "
                             f"{len(self.classes)}: it cannot continue on this data set")
        saved_world = int(state.get("world_size", 1))
        regrid = saved_world != self.dist.world_size
        if regrid and int(state["step_in_epoch"]) != 0:
            raise ValueError(f"checkpoint {path} was written in the middle of an epoch by {saved_world} process(es) "
                             f"and this run has {self.dist.world_size}: a position inside an epoch's shards cannot "
                             f"move to other shards; resume with {saved_world} process(es), or from an epoch-end "
                             f"checkpoint (epoch_N.pt, kept with --save-every)")
        # Compare what each run resolved (a default such as lr or amp made explicit is no change);
        # a checkpoint from before resolved configs: compare the given values, a saved default aside.
        now = dataclasses.asdict(self._resolved_config())
        was = state.get("resolved_config")
        if was is None:
            was = {k: v for k, v in saved.items() if v is not None}
            changed = sorted(k for k in was if k in now and k not in _RESUME_FREE_KEYS
                             and was[k] != now[k] and was[k] != getattr(cfg, k, None))
        else:
            changed = sorted(k for k in was if k in now and k not in _RESUME_FREE_KEYS and was[k] != now[k])
        if changed:
            logger.warning("fastkd: resuming with settings that differ from the checkpoint's run: %s",
                           ", ".join(f"{k}: {was[k]!r} -> {now[k]!r}" for k in changed))
        was_cache, now_cache = state.get("teacher_cache"), self._cache_identity()
        if was_cache is not None and now_cache is not None and was_cache != now_cache:
            logger.warning("fastkd: resuming with a teacher cache that holds other outputs than the one the "
                           "checkpoint's run read (%s): the rest of the run distils other teacher logits",
                           ", ".join(k for k in now_cache if was_cache.get(k) != now_cache[k]))
        if state.get("classes") is not None and list(state["classes"]) != list(self.classes):
            raise ValueError(f"checkpoint {path} was trained on other classes than the data set in --data")
        self.student.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        schedule = self.scheduler.lr_lambdas[0]
        this_run = dict(vars(schedule))
        self.scheduler.load_state_dict(state["scheduler"])  # also overwrites the LRSchedule's attributes
        if vars(schedule) != this_run:
            # --epochs (free to change on resume) or the steps per epoch differ: follow this run's
            # schedule, not the checkpoint's (whose cosine would end at the old last epoch, LR 0).
            vars(schedule).update(this_run)
            lrs = [base * schedule(self.scheduler.last_epoch) for base in self.scheduler.base_lrs]
            for group, lr in zip(self.optimizer.param_groups, lrs):
                group["lr"] = lr
            self.scheduler._last_lr = lrs
            logger.info("fastkd: the LR schedule follows this run's %d epochs x %d steps", self.cfg.epochs,
                        self.steps_per_epoch)
        self.scaler.load_state_dict(state["scaler"])
        if self.dpk is not None:
            if state.get("dpk") is None:
                raise ValueError(f"checkpoint {path} has no DPK state but this run uses --method dpk")
            self.dpk.load_state_dict(state["dpk"])
        self.start_epoch, self.start_batch = int(state["epoch"]), int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self.best_top1 = float(state["best_top1"])
        self.progress_state = state.get("epoch_progress")
        if not regrid:
            ckpt.set_rng_state(state["rng"][self.dist.rank])
            self.train_loader.load_state_dict(state["loader"][self.dist.rank])
        else:
            ckpt.set_rng_state(state["rng"][self.dist.rank % saved_world])
        if self.is_main:
            self._truncate_metrics()
        if regrid:
            self._regrid(saved_world)
        return True

    def _regrid(self, saved_world: int) -> None:
        """Continue an epoch-end checkpoint of another world size on this run's grid: the global
        step counts this run's steps per epoch, and the LR follows this run's schedule and rate
        (``--lr`` as given, else ``lr_base`` x this run's global batch / 256). The data order of
        the next epoch is keyed by (seed, epoch), so the new shards continue it exactly."""
        old_step = self.global_step
        self.global_step = self.start_epoch * self.steps_per_epoch
        sched = self.scheduler
        for group in self.optimizer.param_groups:
            group["initial_lr"] = self.lr
        sched.base_lrs = [self.lr for _ in self.optimizer.param_groups]
        sched.last_epoch = self.global_step
        lrs = [base * sched.lr_lambdas[0](sched.last_epoch) for base in sched.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        sched._last_lr = lrs
        logger.warning("fastkd: checkpoint from %d process(es), resuming with %d at the start of epoch %d: global step "
                       "%d -> %d (%d steps per epoch now), learning rate %.4g for the global batch of %d",
                       saved_world, self.dist.world_size, self.start_epoch + 1, old_step, self.global_step,
                       self.steps_per_epoch, self.lr, self.cfg.batch_size * self.dist.world_size)

    def _truncate_metrics(self) -> None:
        """Drop metrics records written after the checkpoint (the resumed run writes them again)."""
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return
        rows = read_metrics(path)
        keep = [r for r in rows if r.get("global_step", 0) <= self.global_step]
        if len(keep) != len(rows):
            import json

            tmp = path.with_name(".metrics.jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
            os.replace(tmp, path)

    # ---- training -------------------------------------------------------------------------
    def _teacher_used(self, epoch: int) -> bool:
        cfg = self.cfg
        if self.teacher_source is None:
            return False
        return cfg.eskd_stop_epoch is None or epoch < cfg.eskd_stop_epoch

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
        # The one sync of a logging boundary reads the logged loss and whether any loss of this
        # epoch so far was non-finite: the epoch's running loss sum (already on the device)
        # stays finite exactly when every step's loss was (summed over ranks: all stop together).
        check = torch.stack([loss.detach().double(), meters.sums[0]])
        bad = (~torch.isfinite(check)).any().to(torch.float64).reshape(1)
        D.all_reduce_sum(bad, self.dist)
        loss_value, bad_value = torch.cat([check[:1], bad]).tolist()
        if bad_value:
            self._stop_nonfinite(epoch, f"the training loss became non-finite ({loss_value:g} at the logged step)")
        self._last_finite_step = self.global_step
        self.timer.flush()  # resolve this interval's CUDA timing events (bounded memory)
        lr = self.optimizer.param_groups[0]["lr"]
        self.metrics.write("step", {"epoch": epoch, "global_step": self.global_step, "loss": loss_value,
                                    "lr": lr, "images_per_s_rank": meters.rate()})
        bar.update(0, loss=f"{loss_value:.4f}", lr=f"{lr:.3g}")

    def _stop_nonfinite(self, epoch: int, what: str):
        """Stop the run: one line naming the step(s), the likely causes and the last good checkpoint.

        Nothing non-finite is saved; a ``stop`` record in metrics.jsonl marks the folder as
        stopped (not finished). ``--resume auto`` continues from the last good checkpoint."""
        self._source_report()  # a damaged teacher-cache epoch is the more precise cause: it raises first
        first, last = getattr(self, "_last_finite_step", self.global_step) + 1, self.global_step
        where = f"at global step {last}" if first >= last else f"between global steps {first} and {last}"
        self.metrics.write("stop", {"reason": "non-finite", "epoch": epoch, "global_step": last,
                                    "first_possible_step": min(first, last)})
        good = self.out / ckpt.LAST
        saved = (f"the last good checkpoint is {good} (--resume auto continues from it once the cause is fixed)"
                 if good.exists() else "no checkpoint was written")
        from ..errors import NonFiniteError

        raise NonFiniteError(
            f"{what} {where} (epoch {epoch + 1}); likely causes: a learning rate too high ({self.lr:g}; --lr), "
            f"an AMP/fp16 overflow (--amp {self.amp}; bf16 has fp32's range), a non-finite teacher output (the "
            f"teacher checkpoint or a --teacher-cache row holding NaN/inf), or bad input; nothing non-finite "
            f"was saved: {saved}")

    def _require_finite_weights(self, epoch: int, state: Optional[dict] = None) -> None:
        """Every floating-point tensor of the model (and DPK) state is finite; else stop (one
        sync, at epoch ends and checkpoints only)."""
        if state is None:
            state = {"model": self.student.state_dict(),
                     "dpk": self.dpk.state_dict() if self.dpk is not None else None}
        tensors = [*state["model"].values(), *(state.get("dpk") or {}).values()]
        flags = [torch.isfinite(t).all() for t in tensors if torch.is_tensor(t) and t.is_floating_point()]
        bad = torch.zeros(1, dtype=torch.float64, device=self.device)
        if flags:
            bad += (~torch.stack([f.to(self.device) for f in flags]).all()).to(torch.float64)
        D.all_reduce_sum(bad, self.dist)
        progress = state.get("epoch_progress")
        if bad.item() or (progress is not None and not all(math.isfinite(v) for v in progress["sums"])):
            self._stop_nonfinite(epoch, "the student's weights became non-finite")

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
        source = self.teacher_source if use_teacher else None
        step_in_epoch = first_step
        for step in steps(self.train_loader, source, epoch, start=first_step, want_state=self._checkpoint_due,
                          timer=self.timer):
            ckpt_due = self._checkpoint_due(step.index)
            loss = self._step(step.batch, step.teacher, loss_fn, epoch + step.index / n_steps)
            meters.add(loss, loss_fn.last_terms, step.batch)
            step_in_epoch = step.index + 1
            self.global_step += 1
            if self.global_step % cfg.log_interval == 0 or step_in_epoch == n_steps:
                self._log_step(epoch, loss, meters, bar)
            bar.update(1)
            if ckpt_due:
                self._save(self._state(epoch, step_in_epoch, step.loader_state_after, meters.state_dict()))
        bar.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # epoch boundary: the timing must include queued work
        elapsed = meters.elapsed()
        # Exact epoch means over all ranks: sum the sums and the counts.
        totals = torch.cat([meters.sums, torch.tensor([step_in_epoch, meters.samples], dtype=torch.float64,
                                                      device=self.device)])
        D.all_reduce_sum(totals, self.dist)
        loss_sum, ce_sum, kd_sum, step_count, sample_count = totals.tolist()
        if sample_count == 0 and step_in_epoch > first_step:
            skipped = (f"; the loader skipped {int(getattr(self.train_loader, 'skipped', 0))} corrupt file(s) "
                       f"(--skip-corrupt): are all the training images damaged?" if cfg.skip_corrupt else "")
            raise ValueError(f"epoch {epoch + 1} trained on no valid image: every row of its "
                             f"{step_in_epoch - first_step} step(s) was left out{skipped}")
        record = {
            "epoch": epoch,
            "global_step": self.global_step,
            "train_loss": loss_sum / step_count,
            "train_ce": ce_sum / step_count,
            "train_kd": kd_sum / step_count,
            "lr": self.optimizer.param_groups[0]["lr"],
            "images_per_s": sample_count / max(elapsed, 1e-9),
            "train_samples": int(sample_count),
            "epoch_time_s": elapsed,
            "steps_this_session": step_in_epoch - first_step,
            "teacher_forward": use_teacher,
            "step_time_ms": self.timer.per_step_ms(step_in_epoch),
        }
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

    def _skipped_files(self) -> dict:
        """Corrupt files skipped (--skip-corrupt) over all ranks: in this epoch (a known corrupt file
        is skipped again in every epoch that reads it), and distinct files so far."""
        loader = self.train_loader
        total = int(getattr(loader, "skipped", 0))
        in_epoch = getattr(loader, "skipped_in_epoch", None)
        if in_epoch is None:  # a loader without per-epoch counts: the files new in this epoch
            in_epoch = total - self._skipped_before
        counts = torch.tensor([int(in_epoch), total], dtype=torch.int64)
        self._skipped_before = total
        if self.dist.distributed:
            counts = D.all_reduce_sum(counts.to(self.device), self.dist).cpu()
        new, total = counts.tolist()
        return {"skipped_files": new, "skipped_files_total": total}

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
            self._skipped_before = 0
            if self.start_epoch >= cfg.epochs:
                logger.info("fastkd: the checkpoint has already finished all %d epochs", cfg.epochs)
            self._last_finite_step = self.global_step
            for epoch in range(self.start_epoch, cfg.epochs):
                record = self._train_epoch(epoch)
                # A damaged cache epoch is named first (it may be why the weights went non-finite).
                record.update(self._source_report(epoch) if record["teacher_forward"] else {})
                self._require_finite_weights(epoch)  # before validation reports anything of them
                if cfg.skip_corrupt:
                    record.update(self._skipped_files())
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
                self._log_epoch(record)
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
            D.shutdown(self.dist)
            if getattr(self, "_lock", None) is not None:
                self._lock.release()
            if failed and self.is_main:
                for folder in getattr(self, "_created_dirs", ()):
                    try:
                        folder.rmdir()  # a failed run leaves no empty output folder (rmdir: only if empty)
                    except OSError:
                        break

    def _log_epoch(self, r: dict) -> None:
        parts = [f"epoch {r['epoch'] + 1}/{self.cfg.epochs}", f"loss {r['train_loss']:.4f}",
                 f"top1 {r['val_top1']:.2f}", f"top5 {r['val_top5']:.2f}"]
        if "teacher_top1" in r:
            parts += [f"teacher {r['teacher_top1']:.2f}", f"agree {r['agreement']:.2f}", f"KL {r['kl']:.4f}"]
        if "loader" in r:
            parts.append(f"(val: {r['loader']} loader, {r['decoder']})")
        if "teacher_train_top1" in r:  # a teacher cache: its top-1 on this epoch's training views
            parts.append(f"teacher (train views, cached) {r['teacher_train_top1']:.2f}")
        parts.append(f"{r['images_per_s']:.0f} img/s")
        if r.get("skipped_files_total"):
            parts.append(f"skipped {r['skipped_files']} corrupt file(s) ({r['skipped_files_total']} in all)")
        steps = ", ".join(f"{k} {v:.2f}" for k, v in r["step_time_ms"].items())
        logger.info("  ".join(parts) + f"  [ms/step: {steps}]")


def train(cfg: C.TrainConfig) -> dict:
    """Run ``fastkd train`` with a config; returns ``{"output", "epochs": [records], "best_top1", ...}``."""
    return Trainer(cfg).run()
