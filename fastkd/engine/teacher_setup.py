"""The teacher (and student) as a run asks for them: weights, preprocessing, classes, a sanity check.

Shared by ``fastkd train`` (:mod:`fastkd.engine.trainer`), ``fastkd cache build`` and
``fastkd analyze``:

* :func:`student_preprocessing` / :func:`teacher_preprocessing`: the normalisation of each view.
  The teacher's: ``--teacher-mean/--teacher-std`` when given (a value that disagrees with the
  teacher's own config is warned about once), else the pretrained config of ``--teacher-pretrained``
  weights (timm ``pretrained_cfg``, torchvision ``weights.transforms()``), else what a fastkd
  checkpoint recorded for its run, else the student's.
* :func:`build_student` / :func:`build_teacher`: the models with their weights (hub, file or none)
  and, with ``--teacher-classes``, the teacher's logits mapped to the data's classes.
* :func:`weights_identity`: what a teacher cache records about the weights.
* :func:`check_teacher`: the teacher's top-1 on a few validation batches before paying for it.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from .. import _compat
from . import config as C
from . import distributed as D

logger = logging.getLogger("fastkd")

__all__ = ["student_preprocessing", "teacher_preprocessing", "build_student", "build_teacher", "weights_identity",
           "recorded_input", "check_teacher", "TeacherCheckError", "near_chance", "CHECK_BATCHES", "CHECK_MIN_IMAGES"]

#: Validation batches the teacher check reads at most, and the images it needs before it may stop a run.
CHECK_BATCHES = 20
CHECK_MIN_IMAGES = 100


class TeacherCheckError(ValueError):
    """The teacher scores near chance on the validation batches checked."""


def _show(values) -> str:
    return ",".join(f"{float(v):g}" for v in values)


# --------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------
def recorded_input(path) -> dict:
    """What a fastkd training checkpoint records about its student's input: ``{"image_size", "mean",
    "std"}`` (keys absent when it does not say; ``{}`` for a bare state_dict or a safetensors file)."""
    from ..models import is_safetensors

    try:
        if is_safetensors(path):
            return {}
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return {}  # load_weights reports an unreadable file with a clear error later
    if not isinstance(obj, dict):
        return {}
    out = {}
    rec = obj.get("input") if isinstance(obj.get("input"), dict) else {}
    cfg = obj.get("config") if isinstance(obj.get("config"), dict) else {}
    for key in ("image_size", "mean", "std"):
        v = rec.get(key, cfg.get(key))
        if v is not None:
            out[key] = int(v) if key == "image_size" else tuple(float(x) for x in v)
    return out


def student_preprocessing(cfg: C.TrainConfig) -> tuple[tuple, tuple]:
    """(mean, std) of the student view: its pretrained config with ``--student-pretrained``, else ImageNet's."""
    from ..data import IMAGENET_MEAN, IMAGENET_STD

    if cfg.student_pretrained:
        from ..models.hub import preprocessing

        info = preprocessing(cfg.student, cfg.student_weights)
        return info.mean, info.std
    return tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)


@dataclass
class TeacherView:
    mean: tuple
    std: tuple
    source: str  # where the values come from (logged)
    stated: bool = True  # False: nothing about the teacher said; the student's values were taken


def teacher_preprocessing(cfg: C.TrainConfig, student: Optional[tuple] = None, *, what: str = "fastkd") -> TeacherView:
    """The teacher view's (mean, std) and where they come from (see the module docstring)."""
    student = student or student_preprocessing(cfg)
    own, source = None, None
    if cfg.teacher is not None and cfg.teacher_pretrained:
        from ..models.hub import preprocessing

        info = preprocessing(cfg.teacher, cfg.teacher_weights)
        label = info.identity.get("name") or info.identity.get("weights")
        own, source = (info.mean, info.std), f"the pretrained config of {label}"
    elif cfg.teacher is not None and cfg.teacher_checkpoint:
        rec = recorded_input(cfg.teacher_checkpoint)
        if "mean" in rec and "std" in rec:
            own, source = (rec["mean"], rec["std"]), f"the record of {cfg.teacher_checkpoint}"
    given = (tuple(cfg.teacher_mean) if cfg.teacher_mean is not None else None,
             tuple(cfg.teacher_std) if cfg.teacher_std is not None else None)
    if own is not None:
        for flag, value, theirs in (("--teacher-mean", given[0], own[0]), ("--teacher-std", given[1], own[1])):
            if value is not None and not all(math.isclose(a, b, abs_tol=1e-6) for a, b in zip(value, theirs)):
                _compat.log_once(f"{what}: {flag} {_show(value)} differs from the {_show(theirs)} of {source}: "
                                 f"the flag is used", level=logging.WARNING)
    base = own if own is not None else student
    mean = given[0] if given[0] is not None else base[0]
    std = given[1] if given[1] is not None else base[1]
    if given[0] is not None or given[1] is not None:
        source = "--teacher-mean/--teacher-std" + (f" (else {source})" if source else "")
    elif source is None:
        source = "the student's (no pretrained config or checkpoint record says otherwise)"
    stated = own is not None or given != (None, None)
    return TeacherView(tuple(float(v) for v in mean), tuple(float(v) for v in std), source, stated)


def loader_norms(cfg: C.TrainConfig, *, teacher: bool, what: str = "fastkd") -> tuple[dict, Optional[TeacherView]]:
    """``create_loader`` keywords of both views' normalisation (the teacher's only when it differs
    from the student's, so that no second view is made for nothing), and the teacher's view."""
    student = student_preprocessing(cfg)
    out = {"mean": student[0], "std": student[1]}
    view = None
    if teacher:
        view = teacher_preprocessing(cfg, student, what=what)
        if (view.mean, view.std) != tuple(student):
            out.update(teacher_mean=view.mean, teacher_std=view.std)
    return out, view


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------
def build_student(cfg: C.TrainConfig, num_classes: int) -> nn.Module:
    """The student with ``num_classes`` outputs: hub weights, a checkpoint file, or random."""
    from ..models import create_model, load_weights

    if cfg.student_pretrained:
        from ..models.hub import load_pretrained

        model, _ = load_pretrained(cfg.student, num_classes, weights=cfg.student_weights)
        return model
    model = create_model(cfg.student, num_classes)
    if cfg.student_checkpoint:
        load_weights(model, cfg.student_checkpoint)
    return model


def _output_count(model: nn.Module, fallback: Optional[int]) -> Optional[int]:
    n = getattr(model, "num_classes", None)
    return int(n) if isinstance(n, int) and n > 0 else fallback


def build_teacher(cfg: C.TrainConfig, classes: Sequence[str]) -> nn.Module:
    """The teacher of ``cfg`` for data of ``classes``: its weights loaded, its logits those of ``classes``.

    Without ``--teacher-classes`` the teacher must have exactly ``len(classes)`` outputs (a
    pretrained 1000-class teacher never gets a new random classifier). With it, the logits are
    reduced to the data's classes by name (:mod:`fastkd.models.classes`).
    """
    from ..models import create_model, load_weights
    from ..models.classes import map_teacher_classes, teacher_class_names

    n_data = len(classes)
    if cfg.teacher_pretrained:
        from ..models.hub import load_pretrained

        model, info = load_pretrained(cfg.teacher, None, weights=cfg.teacher_weights)
        n_out = _output_count(model, info.num_classes)
        what = f"the pretrained teacher {cfg.teacher}"
    else:
        n_out = n_data
        if cfg.teacher_classes is not None:
            n_out = len(teacher_class_names(cfg.teacher_classes, None))
        model = create_model(cfg.teacher, n_out)
        if cfg.teacher_checkpoint:
            if cfg.teacher_classes is None:  # a checkpoint that records its classes must hold the data's
                from ..models.classes import check_teacher_classes, recorded_classes

                check_teacher_classes(recorded_classes(cfg.teacher_checkpoint), classes,
                                      teacher=f"{cfg.teacher} ({cfg.teacher_checkpoint})", data=f"--data {cfg.data}")
            load_weights(model, cfg.teacher_checkpoint)
        what = f"the teacher {cfg.teacher}"
    if cfg.teacher_classes is not None:
        model.fastkd_class_map = map_teacher_classes(model, cfg.teacher_classes, classes, n_out)
        logger.info("fastkd: %s: its %d outputs mapped to the data's %d classes by name (--teacher-classes %s)",
                    what, n_out, n_data, cfg.teacher_classes)
    elif n_out is not None and n_out != n_data:
        raise ValueError(f"{what} has {n_out} outputs and the data {n_data} classes: give --teacher-classes imagenet "
                         f"(class folders named by WordNet id, e.g. n01440764) or --teacher-classes FILE (one name "
                         f"per teacher output) to map them by name")
    return model


def weights_identity(cfg: C.TrainConfig, *, file_hash=None) -> Optional[dict]:
    """What a teacher cache records about the teacher's weights (None: random weights).

    Hub weights: the timm name with its tag and hub id, or the torchvision enum and URL; a file:
    its sha256 (``file_hash(path)``, computed by the caller)."""
    if cfg.teacher_pretrained:
        from ..models.hub import preprocessing

        return preprocessing(cfg.teacher, cfg.teacher_weights).identity
    if cfg.teacher_checkpoint:
        return {"source": "file", "sha256": file_hash(cfg.teacher_checkpoint) if file_hash else None}
    return None


def has_weights(cfg: C.TrainConfig) -> bool:
    return bool(cfg.teacher_pretrained or cfg.teacher_checkpoint)


# --------------------------------------------------------------------------------------------
# The teacher check
# --------------------------------------------------------------------------------------------
def near_chance(num_classes: int) -> float:
    """The top-1 (a fraction) below which a teacher counts as near chance: min(1.5 x chance,
    chance + 10% of the rest)."""
    chance = 1.0 / num_classes
    return min(1.5 * chance, chance + 0.1 * (1.0 - chance))


@torch.inference_mode()
def check_teacher(teacher, loader, device: torch.device, num_classes: int, *, name: str, view: TeacherView,
                  what: str = "fastkd", dist: D.DistInfo = D.DistInfo(), max_batches: int = CHECK_BATCHES,
                  min_images: int = CHECK_MIN_IMAGES) -> dict:
    """Evaluate ``teacher`` (``teacher(images)`` -> logits, or an object with ``.logits``) on at most
    ``max_batches`` batches of the validation ``loader``; log its top-1 and raise
    :class:`TeacherCheckError` when it is near chance (:func:`near_chance`) over at least
    ``min_images`` images (fewer are too few to tell a weak teacher from a broken one: logged only).
    Counts are summed over all ranks, so every rank decides the same."""
    counts = torch.zeros(2, dtype=torch.int64, device=device)
    batches = 0
    for batch in loader:
        if batches >= max_batches:
            break
        images = batch.teacher_images if batch.teacher_images is not None else batch.images
        labels = batch.labels.to(device, non_blocking=True)
        out = teacher(images.to(device, non_blocking=True))
        logits = getattr(out, "logits", out)
        valid = (torch.ones_like(labels, dtype=torch.bool) if batch.valid is None
                 else batch.valid.to(device, non_blocking=True))
        counts[0] += valid.sum()
        counts[1] += ((logits.float().argmax(1) == labels) & valid).sum()
        batches += 1
    loader.set_epoch(0)  # the pass was cut short: the next one starts from the beginning
    D.all_reduce_sum(counts, dist)
    n, hits = counts.tolist()
    if n == 0:
        return {"images": 0, "top1": None}
    top1 = hits / n
    backend = getattr(loader, "backend", type(loader).__name__)
    logger.info("%s: teacher check: %s scores %.2f%% top-1 on %d validation images (%d batch(es), %s loader; "
                "chance %.2f%%; mean %s, std %s from %s)", what, name, 100 * top1, n, batches, backend,
                100 / num_classes, _show(view.mean), _show(view.std), view.source)
    if n >= min_images and top1 < near_chance(num_classes):
        raise TeacherCheckError(
            f"the teacher {name} scores {100 * top1:.2f}% top-1 on {n} validation images ({backend} loader), near "
            f"chance ({100 / num_classes:.2f}% for {num_classes} classes): distilling it would teach noise. Usual "
            f"causes: its preprocessing (mean {_show(view.mean)}, std {_show(view.std)} from {view.source}: "
            f"--teacher-mean/--teacher-std), its class order (--teacher-classes, the data's class folders), its "
            f"weights (--teacher-checkpoint/--teacher-pretrained); --no-check-teacher trains anyway")
    return {"images": n, "top1": top1}
