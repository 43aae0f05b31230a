"""``fastkd study capacity``: a reproducible capacity-mismatch mini-study on a 2-core CPU.

The data set is synthetic but has a class hierarchy, so that "which wrong classes are likely"
means something: ``super_classes`` centres in a latent space, each with ``classes_per_super``
class prototypes around it (prototype = centre + offset), samples = prototype + Gaussian noise,
seen through a fixed random two-layer ``tanh`` embedding (so that a model must undo a
nonlinearity and width buys accuracy). Classes of one super-class are close, so a good teacher
should put its wrong-class mass on the label's siblings.

Teachers are MLPs (two hidden ReLU layers) of increasing width, all trained with cross-entropy
for the same schedule. On the held-out split the study then checks

* observation 1: the wrong-class spread (standard deviation of the wrong-class probabilities)
  shrinks as the teacher grows, at each temperature;
* observation 2: teachers of different width rank the wrong classes alike (mean per-sample
  Spearman of their wrong-class logits, see :mod:`fastkd.analysis.metrics`);

and distils one student MLP from each teacher with KD, ATS and DKD (``fastkd.DistillLoss``),
next to a student trained on labels alone. There is no data augmentation, so each teacher's
logits on the training set are computed once and reused every epoch: the same numbers an online
teacher forward would give. Every run is seeded; the printed table and the files under
``--output`` (README.md, study.json, students.csv, teachers/ with the ``fastkd analyze`` outputs,
PNG plots) are what ``benchmarks/results/study-capacity/`` holds.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from . import metrics as M

logger = logging.getLogger("fastkd")

__all__ = ["StudyConfig", "HierarchicalData", "make_data", "mlp", "run_study", "add_arguments", "main"]


@dataclass
class StudyConfig:
    # the data set
    super_classes: int = 20
    classes_per_super: int = 5
    latent_dim: int = 16
    input_dim: int = 64
    super_spread: float = 1.0  # std of the super-class centres
    class_spread: float = 0.5  # std of a class prototype around its super-class centre
    noise: float = 0.8  # std of a sample around its class prototype
    train_per_class: int = 50
    test_per_class: int = 30
    # the models
    teacher_widths: tuple = (16, 64, 256, 1024)
    student_width: int = 16
    teacher_epochs: int = 30
    student_epochs: int = 30
    batch_size: int = 128
    lr: float = 0.05
    weight_decay: float = 5e-4
    # the analysis and the distillation methods (CIFAR-100-style settings from methods.md)
    temperatures: tuple = (1.0, 2.0, 4.0, 8.0)
    kd: dict = field(default_factory=lambda: {"ce_weight": 0.1, "kd_weight": 0.9, "temperature": 4.0})
    ats: dict = field(default_factory=lambda: {"ce_weight": 0.1, "kd_weight": 0.9, "tau_target": 4.0,
                                               "tau_other": 2.0, "student_temperature": 1.0})
    isats: dict = field(default_factory=lambda: {"ce_weight": 0.1, "kd_weight": 0.9, "tau_target": 4.0,
                                                 "student_temperature": 1.0})
    # DKD's CIFAR-100 beta=8 makes these normalisation-free MLP students diverge at lr 0.05
    # (about 3% accuracy in our runs; it trains at lr 0.02), so the study uses beta=2.
    dkd: dict = field(default_factory=lambda: {"ce_weight": 1.0, "kd_weight": 1.0, "alpha": 1.0, "beta": 2.0,
                                               "temperature": 4.0, "warmup_epochs": 3.0})
    seed: int = 0

    @property
    def num_classes(self) -> int:
        return self.super_classes * self.classes_per_super

    def validate(self) -> None:
        positive = ("super_classes", "classes_per_super", "latent_dim", "input_dim", "train_per_class",
                    "test_per_class", "student_width", "teacher_epochs", "student_epochs", "batch_size")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.num_classes < 3:
            raise ValueError(f"the study needs at least 3 classes (wrong-class rankings), got {self.num_classes}")
        if not self.teacher_widths or any(int(w) < 1 for w in self.teacher_widths):
            raise ValueError(f"teacher_widths must be positive integers, got {self.teacher_widths!r}")
        if len(set(self.teacher_widths)) != len(self.teacher_widths):
            raise ValueError(f"teacher_widths contain a duplicate: {self.teacher_widths!r}")
        for name in ("super_spread", "class_spread", "noise", "lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
@dataclass
class HierarchicalData:
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    super_of_class: Tensor  # (C,) super-class of each class


def make_data(cfg: StudyConfig) -> HierarchicalData:
    """The seeded synthetic hierarchical data set (see the module docstring); inputs standardised
    with the training split's statistics."""
    g = torch.Generator().manual_seed(cfg.seed)
    K, S, d, D = cfg.super_classes, cfg.classes_per_super, cfg.latent_dim, cfg.input_dim
    centres = torch.randn(K, d, generator=g) * cfg.super_spread
    super_of_class = torch.arange(K).repeat_interleave(S)
    prototypes = centres[super_of_class] + torch.randn(K * S, d, generator=g) * cfg.class_spread
    # The fixed random embedding latent -> input: two tanh layers, weights ~ N(0, 1/fan_in).
    w1 = torch.randn(d, D, generator=g) / math.sqrt(d)
    b1 = torch.randn(D, generator=g) * 0.5
    w2 = torch.randn(D, D, generator=g) * (2 / math.sqrt(D))

    def draw(per_class: int):
        y = torch.arange(K * S).repeat_interleave(per_class)
        z = prototypes[y] + torch.randn(len(y), d, generator=g) * cfg.noise
        return torch.tanh(torch.tanh(z @ w1 + b1) @ w2), y

    x_train, y_train = draw(cfg.train_per_class)
    x_test, y_test = draw(cfg.test_per_class)
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    return HierarchicalData((x_train - mean) / std, y_train, (x_test - mean) / std, y_test, super_of_class)


# --------------------------------------------------------------------------------------------
# Models and training
# --------------------------------------------------------------------------------------------
def mlp(in_dim: int, width: int, num_classes: int, depth: int = 2) -> nn.Sequential:
    layers, d = [], in_dim
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, num_classes))


def _param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def train(model: nn.Module, x: Tensor, y: Tensor, loss_fn: Callable, cfg: StudyConfig, epochs: int, seed: int,
          on_epoch: Optional[Callable[[int], None]] = None) -> nn.Module:
    """SGD (momentum 0.9, Nesterov) with a cosine schedule over ``epochs``, batches drawn from a
    generator seeded with ``seed``. ``loss_fn(logits, index)`` gets the rows' positions in ``x``."""
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(y) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        if on_epoch is not None:
            on_epoch(epoch)
        perm = torch.randperm(len(y), generator=g).to(x.device)
        for i in range(0, len(y), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            loss = loss_fn(model(x[idx]), idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def _logits(model: nn.Module, x: Tensor) -> Tensor:
    return model.eval()(x)


def _accuracy(logits: Tensor, y: Tensor) -> float:
    return (logits.argmax(1) == y).double().mean().item()


def _sibling_mass(logits: Tensor, y: Tensor, super_of_class: Tensor) -> float:
    """Mean share of the wrong-class probability (T=1) that falls on the label's super-class
    siblings; a teacher blind to the hierarchy gives (S-1)/(C-1)."""
    log_q = torch.log_softmax(logits.double(), 1)
    wrong = log_q.scatter(1, y[:, None], -math.inf)
    hat = torch.softmax(wrong, 1)
    siblings = super_of_class[None, :] == super_of_class[y][:, None]
    return (hat * siblings).sum(1).mean().item()


def _ats_label_on_top(logits: Tensor, y: Tensor, ats: dict) -> float:
    """Share of rows whose ATS soft label still has the label as its arg-max. ATS is not invariant
    to a shift of the logits: when ``v_y / tau_target < max_c v_c / tau_other`` a wrong class wins."""
    from ..losses import reference as ref

    log_q = ref.ats_teacher_log_probs(logits, y, ats["tau_target"], ats["tau_other"])
    return (log_q.argmax(1) == y).double().mean().item()


def _rank_corr(a, b) -> float:
    """Spearman correlation of two short sequences (average ranks for ties)."""
    ra = M.average_ranks(torch.tensor([a], dtype=torch.float64))[0]
    rb = M.average_ranks(torch.tensor([b], dtype=torch.float64))[0]
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = ra.norm() * rb.norm()
    return (ra @ rb / den).item() if den > 0 else math.nan


# --------------------------------------------------------------------------------------------
# The study
# --------------------------------------------------------------------------------------------
METHODS = ("kd", "ats", "isats", "dkd")


def run_study(cfg: StudyConfig, device: torch.device = torch.device("cpu")) -> dict:
    """Train the teachers, analyse them, distil the students; return every number (no files)."""
    cfg.validate()
    t_start = time.perf_counter()
    data = make_data(cfg)
    x_tr, y_tr = data.x_train.to(device), data.y_train.to(device)
    x_te, y_te = data.x_test.to(device), data.y_test.to(device)
    C = cfg.num_classes
    ce = nn.CrossEntropyLoss()
    soft_labels = [M.SoftLabel(temperature=float(t)) for t in cfg.temperatures]
    soft_labels.append(M.SoftLabel(tau_target=cfg.ats["tau_target"], tau_other=cfg.ats["tau_other"]))

    teachers, models, test_logits, train_logits = {}, {}, {}, {}
    for i, width in enumerate(cfg.teacher_widths):
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed + 1000 + i)
        model = mlp(cfg.input_dim, int(width), C).to(device)
        train(model, x_tr, y_tr, lambda out, idx: ce(out, y_tr[idx]), cfg, cfg.teacher_epochs, seed=cfg.seed + 1)
        label = f"w{width}"
        models[label] = model
        train_logits[label], test_logits[label] = _logits(model, x_tr), _logits(model, x_te)
        teachers[label] = {"width": int(width), "params": _param_count(model),
                           "train_accuracy": _accuracy(train_logits[label], y_tr),
                           "test_accuracy": _accuracy(test_logits[label], y_te),
                           "sibling_mass": _sibling_mass(test_logits[label], y_te, data.super_of_class.to(device)),
                           "ats_label_on_top": _ats_label_on_top(train_logits[label], y_tr, cfg.ats),
                           "seconds": round(time.perf_counter() - t0, 2)}
        logger.info(f"teacher {label}: {teachers[label]['params']} params, test accuracy "
                    f"{teachers[label]['test_accuracy']:.4f} ({teachers[label]['seconds']} s)")

    # The analysis of the held-out split: the code behind `fastkd analyze`, with one batch.
    from .cli import analyze

    analysis = analyze(models, [(x_te, y_te)], soft_labels, device=device)
    labels = list(models)

    # Observation 1: per temperature, the rank correlation between width and wrong-class std
    # (-1 = the spread shrinks at every step up in width).
    widths = [teachers[k]["width"] for k in labels]
    obs1 = {}
    for sl in soft_labels:
        stds = [analysis["teachers"][k]["settings"][sl.name]["wrong_std"] for k in labels]
        obs1[sl.name] = {"wrong_std": stds, "spearman_width_vs_std": _rank_corr(widths, stds),
                         "monotone_decreasing": all(b < a for a, b in zip(stds, stds[1:]))}
    rhos = [p["spearman"] for p in analysis["pairs"]]
    obs2 = {"pairwise_spearman": {f"{p['a']}-{p['b']}": p["spearman"] for p in analysis["pairs"]},
            "min": min(rhos) if rhos else math.nan, "mean": sum(rhos) / len(rhos) if rhos else math.nan}

    # Students: one per (teacher, method), plus one on labels alone; same seed, same batches.
    t0 = time.perf_counter()
    students = {"ce": _train_student(cfg, x_tr, y_tr, x_te, y_te, None, None, device)}
    for label in labels:
        for method in METHODS:
            students[f"{label}/{method}"] = _train_student(cfg, x_tr, y_tr, x_te, y_te, method, (
                train_logits[label], test_logits[label]), device)
        logger.info(f"students of {label}: " + ", ".join(
            f"{m} {students[f'{label}/{m}']['test_accuracy']:.4f}" for m in METHODS))
    student_seconds = round(time.perf_counter() - t0, 2)
    ce_student = students["ce"]["test_accuracy"]
    return {
        "config": _config_dict(cfg),
        "teachers": teachers,
        "analysis": analysis,
        "observation_1": obs1,
        "observation_2": obs2,
        "students": students,
        "student_params": students["ce"]["params"],
        "ce_student_accuracy": ce_student,
        "sibling_mass_chance": (cfg.classes_per_super - 1) / (C - 1),
        "seconds": {"students": student_seconds, "total": round(time.perf_counter() - t_start, 2)},
    }


def _train_student(cfg, x_tr, y_tr, x_te, y_te, method, teacher_logits, device) -> dict:
    from ..losses import DistillLoss

    torch.manual_seed(cfg.seed + 7)  # every student starts from the same weights
    model = mlp(cfg.input_dim, cfg.student_width, cfg.num_classes).to(device)
    if method is None:
        loss = DistillLoss("ce", ce_weight=1.0, kd_weight=0.0)
        fn = lambda out, idx: loss(out, None, y_tr[idx])  # noqa: E731
    else:
        loss = DistillLoss(method, **getattr(cfg, method))
        t_train = teacher_logits[0]
        fn = lambda out, idx: loss(out, t_train[idx], y_tr[idx])  # noqa: E731
    train(model, x_tr, y_tr, fn, cfg, cfg.student_epochs, seed=cfg.seed + 2, on_epoch=loss.set_epoch)
    out = _logits(model, x_te)
    res = {"method": method or "ce", "params": _param_count(model), "test_accuracy": _accuracy(out, y_te)}
    if teacher_logits is not None:
        t_test = teacher_logits[1]
        res["top1_agreement"] = M.top1_agreement(out, t_test).double().mean().item()
        res["kl_teacher_student"] = M.kl_rows(t_test, out).mean().item()
    return res


def _config_dict(cfg: StudyConfig) -> dict:
    d = asdict(cfg)
    d["teacher_widths"] = list(cfg.teacher_widths)
    d["temperatures"] = list(cfg.temperatures)
    d["num_classes"] = cfg.num_classes
    return d


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------
def _machine(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device)}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        info["cpu"] = platform.processor() or None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


OBS2_THRESHOLD = 0.5  # "teachers agree": every pair's mean wrong-class Spearman at least this


def _summary(res: dict) -> list[str]:
    """Plain statements computed from the numbers (so they stay true when the study is rerun)."""
    held = [k for k, o in res["observation_1"].items() if o["monotone_decreasing"]]
    not_held = [k for k, o in res["observation_1"].items() if not o["monotone_decreasing"]]
    o2 = res["observation_2"]
    lines = [f"- Observation 1 (wrong-class spread shrinks as the teacher grows) holds at every width step for "
             f"{', '.join(held) or 'no soft label'}" + (f"; not for {', '.join(not_held)}." if not_held else ".")]
    if not math.isnan(o2["min"]):
        verdict = "holds" if o2["min"] >= OBS2_THRESHOLD else "does not clearly hold"
        lines.append(f"- Observation 2 (teachers rank the wrong classes alike) {verdict}: the mean per-sample "
                     f"Spearman is {o2['min']:.3f} for the least similar pair and {o2['mean']:.3f} on average "
                     f"(threshold {OBS2_THRESHOLD}; unrelated rankings give 0).")
    ce = res["ce_student_accuracy"]
    labels = list(res["teachers"])
    for m in METHODS:
        accs = [res["students"][f"{k}/{m}"]["test_accuracy"] for k in labels]
        best = max(range(len(labels)), key=lambda i: accs[i])
        trend = ("rises with teacher width at every step" if all(b > a for a, b in zip(accs, accs[1:])) else
                 "falls with teacher width at every step" if all(b < a for a, b in zip(accs, accs[1:])) else
                 "is not monotone in teacher width")
        lines.append(f"- {m.upper()} students: {min(accs):.4f} to {max(accs):.4f} (best from {labels[best]}), "
                     f"{'above' if max(accs) > ce else 'never above'} the labels-only student ({ce:.4f}); "
                     f"accuracy {trend}.")
    return lines


def format_study(res: dict) -> str:
    """The Markdown report: teachers, the two observations, the student table."""
    cfg = res["config"]
    labels = list(res["teachers"])
    lines = ["# Capacity-mismatch mini-study", ""]
    if "command" in res:
        lines += ["Command: `" + res["command"] + "`", ""]
    if "machine" in res:
        m = res["machine"]
        lines += [f"Machine: {m.get('cpu')}, {m['cpu_count']} cores ({m['torch_threads']} torch threads), "
                  f"device {m['device']}{', ' + m['gpu'] if m.get('gpu') else ''}; Python {m['python']}, "
                  f"torch {m['torch']}. Wall time {res['seconds']['total']:.0f} s.", ""]
    lines += [f"Data: {cfg['num_classes']} classes in {cfg['super_classes']} super-classes, "
              f"{cfg['train_per_class']} training and {cfg['test_per_class']} test samples per class "
              f"(synthetic, {cfg['input_dim']}-d inputs). Teachers: MLPs with two hidden layers, trained with CE "
              f"for {cfg['teacher_epochs']} epochs. Students: the same MLP, width {cfg['student_width']} "
              f"({res['student_params']} parameters), {cfg['student_epochs']} epochs; no augmentation, so each teacher's "
              f"training-set logits are computed once and reused (what an online teacher would give). "
              f"All numbers on the test split.",
              "", "## Summary", ""] + _summary(res) + ["", "## Teachers", ""]
    temps = [f"T={t:g}" for t in cfg["temperatures"]]
    head = ["teacher", "params", "train acc", "test acc"] + [f"wrong std {t}" for t in temps] + \
        ["wrong entropy T=1", "q_y T=1", "sibling share"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in labels:
        t, a = res["teachers"][k], res["analysis"]["teachers"][k]["settings"]
        row = [k, f"{t['params']:,}", f"{t['train_accuracy']:.4f}", f"{t['test_accuracy']:.4f}"]
        row += [f"{a[name]['wrong_std']:.3e}" for name in temps]
        row += [f"{a['T=1']['wrong_entropy']:.3f}" if "T=1" in a else "n/a",
                f"{a['T=1']['target_prob']:.3f}" if "T=1" in a else "n/a", f"{t['sibling_mass']:.3f}"]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"Sibling share: the part of a teacher's wrong-class probability (T=1) that falls on the "
              f"label's super-class siblings; a teacher blind to the hierarchy gives {res['sibling_mass_chance']:.3f}.",
              "", "## Observation 1: wrong-class spread against teacher width", ""]
    for name, o in res["observation_1"].items():
        verdict = "shrinks at every step" if o["monotone_decreasing"] else "does NOT shrink at every step"
        lines.append(f"- {name}: spread {verdict} (Spearman of width vs std {o['spearman_width_vs_std']:+.2f}; "
                     + ", ".join(f"{v:.3e}" for v in o["wrong_std"]) + ")")
    o2 = res["observation_2"]
    lines += ["", "## Observation 2: do teachers rank the wrong classes alike?", "",
              f"Mean per-sample Spearman of two teachers' wrong-class logits (0 for unrelated rankings): "
              f"mean over pairs {o2['mean']:.3f}, lowest pair {o2['min']:.3f}.", ""]
    lines += ["| pair | Spearman |", "|---|---|"] + [f"| {k} | {v:.3f} |" for k, v in o2["pairwise_spearman"].items()]
    lines += ["", "## Students (test accuracy)", "",
              f"Student trained on labels alone: {res['ce_student_accuracy']:.4f}.", ""]
    head = ["teacher", "teacher acc"] + [m.upper() for m in METHODS] + ["ATS label on top (train)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in labels:
        row = [k, f"{res['teachers'][k]['test_accuracy']:.4f}"]
        row += [f"{res['students'][f'{k}/{m}']['test_accuracy']:.4f}" for m in METHODS]
        row.append(f"{res['teachers'][k]['ats_label_on_top']:.4f}")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Top-1 agreement and KL between each student and its teacher are in `students.csv`.",
              "'ATS label on top': the share of training rows whose ATS soft label keeps the label as its "
              "arg-max (ATS is not invariant to a shift of the logits; where a wrong class wins, the student is "
              "taught a wrong arg-max; ISATS's constraint keeps the label on top where it can).",
              "", "Settings: " + "; ".join(f"{m.upper()} {cfg[m]}" for m in METHODS) + ". Students share their "
              f"initial weights and batch order; SGD lr {cfg['lr']}, cosine schedule, batch {cfg['batch_size']}. "
              "DKD uses beta=2: the CIFAR-100 beta=8 diverged with these normalisation-free MLPs at this lr."]
    return "\n".join(lines) + "\n"


def write_study(res: dict, out_dir, plots: bool = True) -> list[Path]:
    from .cli import write_outputs

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    path = out / "study.json"
    path.write_text(json.dumps(res, indent=2) + "\n")
    written.append(path)
    path = out / "students.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["teacher", "teacher_width", "teacher_test_accuracy", "method", "test_accuracy",
                    "top1_agreement", "kl_teacher_student"])
        w.writerow(["", "", "", "ce", res["students"]["ce"]["test_accuracy"], "", ""])
        for k, t in res["teachers"].items():
            for m in METHODS:
                s = res["students"][f"{k}/{m}"]
                w.writerow([k, t["width"], t["test_accuracy"], m, s["test_accuracy"], s["top1_agreement"],
                            s["kl_teacher_student"]])
    written.append(path)
    path = out / "README.md"
    path.write_text(format_study(res))
    written.append(path)
    analysis = {"config": {"data": "synthetic hierarchical (test split)", "num_classes": res["config"]["num_classes"]},
                **res["analysis"]}
    written += write_outputs(analysis, out / "teachers", plots=plots, title="Teachers of the capacity study")
    if plots:
        from . import plots as P

        labels = list(res["teachers"])
        widths = [res["teachers"][k]["width"] for k in labels]
        series = {"teacher": [res["teachers"][k]["test_accuracy"] for k in labels]}
        series.update({f"student {m.upper()}": [res["students"][f"{k}/{m}"]["test_accuracy"] for k in labels]
                       for m in METHODS})
        written.append(P.plot_lines(widths, series, out / "students.png", xlabel="teacher width",
                                    ylabel="test accuracy", title="Students distilled from teachers of growing width",
                                    log_x=True, baseline=("student, labels only", res["ce_student_accuracy"])))
        spread = {name: o["wrong_std"] for name, o in res["observation_1"].items()}
        written.append(P.plot_lines(widths, spread, out / "wrong_std_vs_width.png", xlabel="teacher width",
                                    ylabel="wrong-class standard deviation", log_x=True, log_y=True,
                                    title="Observation 1: wrong-class spread vs teacher width"))
    return written


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------
def add_arguments(parser) -> None:
    d = StudyConfig()
    parser.add_argument("--output", default="runs/study-capacity", metavar="DIR",
                        help="where the report, JSON, CSV and plots go")
    parser.add_argument("--super-classes", type=int, default=d.super_classes)
    parser.add_argument("--classes-per-super", type=int, default=d.classes_per_super)
    parser.add_argument("--train-per-class", type=int, default=d.train_per_class)
    parser.add_argument("--test-per-class", type=int, default=d.test_per_class)
    parser.add_argument("--noise", type=float, default=d.noise, help="sample noise around its class prototype")
    parser.add_argument("--widths", default=",".join(str(w) for w in d.teacher_widths),
                        help="teacher widths, comma-separated")
    parser.add_argument("--student-width", type=int, default=d.student_width)
    parser.add_argument("--teacher-epochs", type=int, default=d.teacher_epochs)
    parser.add_argument("--student-epochs", type=int, default=d.student_epochs)
    parser.add_argument("--temperatures", default=",".join(f"{t:g}" for t in d.temperatures))
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--device", default="cpu", help="cpu (the reference setting), cuda or auto")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; the models are tiny, so more threads mostly add synchronisation "
                             "(and on a shared CPU slow it down many times)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")


def main(args) -> int:
    try:
        widths = tuple(int(w) for w in args.widths.split(","))
    except ValueError:
        raise ValueError(f"--widths takes comma-separated integers, got {args.widths!r}") from None
    cfg = StudyConfig(super_classes=args.super_classes, classes_per_super=args.classes_per_super,
                      train_per_class=args.train_per_class, test_per_class=args.test_per_class, noise=args.noise,
                      teacher_widths=widths, student_width=args.student_width, teacher_epochs=args.teacher_epochs,
                      student_epochs=args.student_epochs, temperatures=tuple(M.parse_temperatures(args.temperatures)),
                      seed=args.seed)
    cfg.validate()
    if not args.no_plots:
        from .plots import require_matplotlib

        require_matplotlib()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        res = run_study(cfg, device)
        res["machine"] = _machine(device)
    finally:
        torch.set_num_threads(threads)
    res["command"] = "fastkd study capacity " + " ".join(shlex.quote(a) for a in sys.argv[3:]) \
        if sys.argv[1:3] == ["study", "capacity"] else "fastkd study capacity (called from Python)"
    written = write_study(res, args.output, plots=not args.no_plots)
    print(format_study(res))
    print(f"wrote {len(written)} files to {args.output}")
    return 0
