"""``TolerantTeacherLoss``: teacher training with ``ce_weight * (CE + eta * gap)``.

docs/methods.md §6; our reconstruction of Yang et al. 2018 (the paper's exact term is not
available to us, see :func:`fastkd.losses.reference.tolerant_teacher_loss`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from . import functional as F
from . import reference as ref


class TolerantTeacherLoss(nn.Module):
    """``ce_weight * (CE + eta * gap)`` averaged over the rows that count.

    ``gap`` is a row's top-1 logit minus the mean of its next ``k - 1`` largest logits. Same
    surface as :class:`~fastkd.losses.DistillLoss`: ``forward(logits, teacher_logits, target,
    valid=None)`` (``teacher_logits`` is ignored: no teacher), ``set_epoch``, ``needs_teacher``
    (False) and ``last_terms``: ``"ce"`` the CE mean, ``"kd"`` the tolerance term ``eta * gap``
    (mean over the same rows), so an engine's ``train_ce`` / ``train_kd`` columns add up to the
    loss. Rows labelled ``ignore_index`` or with ``valid`` False count for nothing.

    Raises:
        ValueError / TypeError: ``k < 2``, a negative or non-numeric ``eta`` or weight, and at
        call time ``k`` above the class count or bad logits / labels.
    """

    needs_teacher = False

    def __init__(self, ce_weight: float, eta: float, k: int = 5, label_smoothing: float = 0.0,
                 ignore_index: int = -100, check_labels: bool = True):
        super().__init__()
        self.ce_weight = F._check_nonneg("ce_weight", ce_weight)
        self.eta = F._check_nonneg("eta", eta)
        self.k = F._check_int("k", k)
        if self.k < 2:
            raise ValueError(f"k must be >= 2 (top-1 against the next k-1 logits), got {k}")
        self.label_smoothing = F._check_smoothing(label_smoothing)
        self.ignore_index = F._check_int("ignore_index", ignore_index)
        F._resolve_checks(check_labels)
        self.check_labels = check_labels
        self.last_terms: dict[str, Tensor] = {}

    def set_epoch(self, epoch: float) -> None:
        pass

    def forward(self, logits: Tensor, teacher_logits, target: Tensor, valid: Optional[Tensor] = None) -> Tensor:
        F._check_logits("logits", logits)
        if self.k > logits.shape[-1]:
            raise ValueError(f"k={self.k} needs at least {self.k} classes; the logits have {logits.shape[-1]}")
        if target is None:
            raise ValueError("TolerantTeacherLoss needs target labels (got None)")
        _, y, _ = F._prepare(logits, target, valid, self.ignore_index, self.check_labels)
        z = F._flatten(logits)
        loss = ref.tolerant_teacher_loss(z, y, self.eta, self.k, self.label_smoothing, self.ignore_index)
        with torch.no_grad():
            count = F._valid_count(y, self.ignore_index).clamp_min(1)
            ce = ref.cross_entropy(z, y, self.label_smoothing, self.ignore_index).sum() / count
        self.last_terms = {"ce": ce, "kd": loss.detach() - ce}
        return self.ce_weight * loss
