"""Optimizers (PyTorch's fused SGD / AdamW, apex's FusedLAMB) and the per-step LR schedule."""
from __future__ import annotations

import math

import torch

from .. import _compat


def build_optimizer(name: str, params, *, lr: float, weight_decay: float, momentum: float = 0.9):
    """``sgd`` / ``adamw``: PyTorch's fused implementations (one kernel for all parameters);
    ``lamb``: apex's FusedLAMB, which needs NVIDIA apex (built from source, not on PyPI)."""
    params = [p for p in params if p.requires_grad]
    if name == "lamb":
        if not _compat.has_apex():
            raise RuntimeError(
                "--opt lamb uses apex.optimizers.FusedLAMB, and NVIDIA apex is not installed (it is not on PyPI: "
                "build it from https://github.com/NVIDIA/apex); use --opt sgd or --opt adamw otherwise"
            )
        from apex.optimizers import FusedLAMB

        return FusedLAMB(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        cls, kw = torch.optim.SGD, dict(lr=lr, momentum=momentum, weight_decay=weight_decay)
    elif name == "adamw":
        cls, kw = torch.optim.AdamW, dict(lr=lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"unknown optimizer {name!r}; expected sgd, adamw or lamb")
    try:
        return cls(params, fused=True, **kw)
    except (RuntimeError, TypeError) as exc:  # e.g. a device type without a fused kernel
        _compat.log_once(f"fastkd: fused {name} is not available here ({exc}); using the foreach implementation "
                         f"(the same update rule, slower)")
        return cls(params, foreach=True, **kw)


class LRSchedule:
    """Learning-rate factor per optimizer step: linear warm-up, then cosine, step or multistep decay.

    ``step`` multiplies by ``decay_rate`` every ``decay_epochs``; ``multistep`` at each epoch of
    ``milestones`` (e.g. 150, 180, 210 of 240: the CIFAR setting of CRD / mdistiller).

    A callable object (not a lambda) so that ``LambdaLR.state_dict()`` saves it with the
    checkpoint.
    """

    def __init__(self, kind: str, steps_per_epoch: int, epochs: int, warmup_epochs: float = 0.0,
                 min_lr_ratio: float = 0.0, decay_epochs: float = 30.0, decay_rate: float = 0.1,
                 milestones=None):
        if kind not in ("cosine", "step", "multistep"):
            raise ValueError(f"unknown schedule {kind!r}; expected cosine, step or multistep")
        if kind == "multistep" and not milestones:
            raise ValueError("the multistep schedule needs milestones (epochs)")
        self.kind = kind
        self.steps_per_epoch = int(steps_per_epoch)
        self.total = int(steps_per_epoch) * int(epochs)
        self.warmup = int(round(warmup_epochs * steps_per_epoch))
        self.min_lr_ratio = float(min_lr_ratio)
        self.decay_steps = max(1, int(round(decay_epochs * steps_per_epoch)))
        self.decay_rate = float(decay_rate)
        self.milestone_steps = [int(round(m * steps_per_epoch)) for m in (milestones or ())]

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "step":
            return self.decay_rate ** (step // self.decay_steps)
        if self.kind == "multistep":
            return self.decay_rate ** sum(step >= m for m in self.milestone_steps)
        t = (step - self.warmup) / max(1, self.total - self.warmup)
        t = min(max(t, 0.0), 1.0)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def build_scheduler(optimizer, schedule: LRSchedule):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
