"""The parts a training run is built from, each from the config and what it depends on, given
explicitly: the resolved :class:`Settings` (first: everything else may depend on them), the
loaders, the student, the loss (and DPK's trainable part), the optimizer, and the resolved config.
:class:`~fastkd.engine.trainer.Trainer` calls them in that order; the teacher source is chosen there.
"""
from __future__ import annotations

import dataclasses
import logging
import random
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..losses import DistillLoss
from ..losses.tolerant import TolerantTeacherLoss
from . import config as C
from . import distributed as D
from .optim import LRSchedule, build_optimizer, build_scheduler

logger = logging.getLogger("fastkd")

__all__ = ["Settings", "resolve", "seed", "Loaders", "make_loaders", "make_student", "dpk_stages", "make_loss",
           "make_dpk", "make_optim", "resolved_config", "AMP_DTYPES", "IGNORE_INDEX"]

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}
IGNORE_INDEX = -100


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a run resolves from its config and device before anything is built: the AMP mode, whether
    a teacher is used at all (by some epoch), and the learning rate (see :func:`resolve`)."""

    amp: str
    amp_dtype: Optional[torch.dtype]
    use_teacher: bool
    lr: float


def resolve(cfg: C.TrainConfig, device: torch.device, world_size: int) -> Settings:
    """The run's :class:`Settings`; refuses a CUDA-graph teacher off CUDA and missing input files
    (before the data is indexed: minutes on a large data set)."""
    amp = cfg.amp if cfg.amp != "auto" else ("bf16" if device.type == "cuda" else "none")
    if cfg.teacher_cuda_graph and device.type != "cuda":
        raise ValueError(f"--teacher-cuda-graph (given, or set by the --config preset) needs a CUDA device; this "
                         f"run uses {device}: add --no-teacher-cuda-graph to run without it (speed only)")
    C.check_input_files(cfg)
    return Settings(amp, AMP_DTYPES[amp], C.needs_teacher(cfg), C.resolve_lr(cfg, world_size))


def seed(cfg: C.TrainConfig, device: torch.device) -> None:
    """The same seed on every rank: identical initial weights (DDP also broadcasts them)."""
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    random.seed(cfg.seed)
    if cfg.deterministic:
        # warn_only: a few CUDA kernels (e.g. adaptive pooling's backward) have no
        # deterministic version; PyTorch then warns naming them instead of failing the run.
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


@dataclasses.dataclass
class Loaders:
    """The run's loaders, their classes, the student's normalisation ``(mean, std)`` and the teacher's
    view (:class:`fastkd.engine.teacher_setup.TeacherView`, None without a teacher)."""

    train: object
    val: object
    classes: list
    student_norm: tuple
    teacher_view: object


def make_loaders(cfg: C.TrainConfig, dist: D.DistInfo, device: torch.device, use_teacher: bool) -> Loaders:
    from ..data import create_loader
    from .teacher_setup import loader_norms

    # The student's normalisation, and the teacher's when it differs (fastkd.engine.teacher_setup).
    norms, view = loader_norms(cfg, teacher=use_teacher, what="fastkd train")
    if "teacher_mean" in norms:
        logger.info("fastkd: teacher view normalised with mean %s, std %s (%s)", view.mean, view.std, view.source)
    tis = cfg.teacher_image_size if use_teacher and cfg.teacher_image_size not in (None, cfg.image_size) else None
    common = dict(backend=cfg.data_backend, image_size=cfg.image_size, teacher_image_size=tis, **norms,
                  shard_id=dist.rank, num_shards=dist.world_size, seed=cfg.seed, num_threads=cfg.workers,
                  device=device, channels_last=cfg.channels_last, skip_corrupt=cfg.skip_corrupt, augment=cfg.augment)
    train_extra = val_extra = {}
    if cfg.data_backend == "synthetic" and cfg.data is None:
        n = cfg.synthetic_samples
        common["synthetic_classes"] = cfg.synthetic_classes
        train_extra = {"synthetic_samples": n}
        val_extra = {"synthetic_samples": None if n is None else max(dist.world_size, n // 25)}
    train = create_loader(cfg.data, train=True, batch_size=cfg.batch_size, **common, **train_extra)
    val = create_loader(cfg.data, train=False, batch_size=cfg.val_batch_size or cfg.batch_size, **common, **val_extra)
    classes = train.classes
    if val.classes != classes:
        only_train = sorted(set(classes) - set(val.classes))[:5]
        only_val = sorted(set(val.classes) - set(classes))[:5]
        raise ValueError(f"the training and validation sets hold different classes ({len(classes)} vs "
                         f"{len(val.classes)}; only in training: {only_train}, only in validation: "
                         f"{only_val}): labels would not match")
    if len(train) == 0:
        raise ValueError("the training loader yields no batches")
    return Loaders(train, val, classes, (norms["mean"], norms["std"]), view)


def make_student(cfg: C.TrainConfig, num_classes: int, device: torch.device) -> nn.Module:
    from ..models import check_input_size
    from .teacher_setup import build_student

    student = build_student(cfg, num_classes)
    check_input_size(student, cfg.student, cfg.image_size)
    student.to(device)
    if cfg.channels_last:
        student.to(memory_format=torch.channels_last)
    return student


def dpk_stages(cfg: C.TrainConfig) -> tuple[Optional[list], Optional[list]]:
    """With --method dpk: the student's and the teacher's stage names (given, else the defaults; as many
    of each); else (None, None)."""
    if cfg.method != "dpk":
        return None, None
    from ..losses.dpk import default_stages

    s_stages = cfg.dpk_stages or default_stages(cfg.student)
    t_stages = cfg.dpk_teacher_stages or (cfg.dpk_stages if cfg.dpk_stages else default_stages(cfg.teacher))
    if len(s_stages) != len(t_stages):
        raise ValueError(f"DPK needs as many teacher stages as student stages: {s_stages} vs {t_stages}")
    return list(s_stages), list(t_stages)


def make_loss(cfg: C.TrainConfig, num_classes: int) -> tuple[nn.Module, DistillLoss]:
    """The run's logit loss, and the CE term alone (same weight) for epochs without a teacher (ESKD)."""
    ce_w, kd_w = C.weights(cfg)
    lm = C.logit_method(cfg)
    if cfg.tolerant_eta is not None:
        k = 5 if cfg.tolerant_k is None else cfg.tolerant_k
        if k > num_classes:
            raise ValueError(f"--tolerant-k {k} needs at least {k} classes; the data set has {num_classes}")
        loss_fn = TolerantTeacherLoss(ce_w, cfg.tolerant_eta, k, cfg.label_smoothing, IGNORE_INDEX, False)
    else:
        from ..losses import methods as M

        # Labels come from the loader's index (always in [0, C)) or are ignore_index for
        # padding, so check_labels=False: the check would cost a device sync every step on CUDA.
        loss_fn = DistillLoss(lm, ce_weight=ce_w, kd_weight=kd_w if lm != "ce" else 0.0,
                              label_smoothing=cfg.label_smoothing, ignore_index=IGNORE_INDEX,
                              backend=cfg.loss_backend, check_labels=False, **M.loss_kwargs(lm, cfg))
    ce_only = DistillLoss("ce", ce_weight=ce_w, kd_weight=0.0, label_smoothing=cfg.label_smoothing,
                          ignore_index=IGNORE_INDEX, backend=cfg.loss_backend, check_labels=False)
    return loss_fn, ce_only


def make_dpk(cfg: C.TrainConfig, student: nn.Module, teacher: nn.Module, s_stages: Sequence[str],
             t_stages: Sequence[str], device: torch.device):
    """DPK's trainable part (:class:`fastkd.losses.dpk.DPKLoss`) and the hooks on the student's stages."""
    from ..losses.dpk import DPKLoss, FeatureHooks, feature_channels

    s_in = torch.zeros(2, 3, cfg.image_size, cfg.image_size, device=device)
    t_size = cfg.teacher_image_size or cfg.image_size
    t_in = torch.zeros(2, 3, t_size, t_size, device=device)
    teacher.to(device)
    s_ch = feature_channels(student, s_stages, s_in)
    t_ch = feature_channels(teacher, t_stages, t_in)
    # seed=None: the masks draw from torch's global generator, whose state the
    # checkpoints save, so a resumed DPK run repeats the uninterrupted one exactly.
    return DPKLoss(s_ch, t_ch, seed=None).to(device), FeatureHooks(student, s_stages)


def make_optim(cfg: C.TrainConfig, params: list, s: Settings, steps_per_epoch: int, device: torch.device):
    """(optimizer, LR scheduler stepped per step, gradient scaler) for ``params``."""
    if cfg.min_lr > s.lr:
        raise C.ConfigError(f"--min-lr ({cfg.min_lr:g}) exceeds the learning rate of this run ({s.lr:g}, "
                            f"from --lr-base x global batch / 256): lower --min-lr or give --lr")
    optimizer = build_optimizer(cfg.opt, params, lr=s.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    schedule = LRSchedule(cfg.sched, steps_per_epoch, cfg.epochs, warmup_epochs=cfg.warmup_epochs,
                          min_lr_ratio=cfg.min_lr / s.lr, decay_epochs=cfg.decay_epochs,
                          decay_rate=cfg.decay_rate, milestones=cfg.decay_milestones)
    scaler = torch.amp.GradScaler(device.type, enabled=s.amp == "fp16")
    return optimizer, build_scheduler(optimizer, schedule), scaler


def resolved_config(cfg: C.TrainConfig, s: Settings, loss_fn: nn.Module, stages: Optional[tuple]) -> C.TrainConfig:
    """The config with every default made explicit: re-running it repeats this run. ``stages``: DPK's
    (student, teacher) stage names, None without DPK."""
    out = dataclasses.replace(cfg, amp=s.amp, lr=s.lr, resume=None)
    ce_w, kd_w = C.weights(cfg)
    out.ce_weight = ce_w
    if C.logit_method(cfg) != "ce":
        out.kd_weight = kd_w
    if isinstance(loss_fn, DistillLoss):
        from ..losses import methods as M

        for key, value in M.config_values(loss_fn.method, loss_fn.params).items():
            setattr(out, key, value)
    if cfg.tolerant_eta is not None:
        out.tolerant_k = loss_fn.k
    if stages is not None:
        out.dpk_stages, out.dpk_teacher_stages = stages
    return out
