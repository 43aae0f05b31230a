"""``fastkd analyze``: dark-knowledge metrics of one or more teachers on a labelled image folder.

For each teacher: accuracy and, per temperature (and under ATS), the wrong-class metrics of
docs/methods.md §9; for each pair of teachers: the wrong-class rank agreement (mean
per-sample Spearman), top-1 agreement and KL both ways. The data set is streamed once, every
teacher sees the same batch, and only running sums are kept. Writes ``metrics.json``,
``metrics.csv``, ``pairs.csv``, ``report.md`` and PNG plots to ``--output`` and prints the report.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from . import metrics as M
from .report import analyze, format_report, write_outputs

logger = logging.getLogger("fastkd")

__all__ = ["TeacherSpec", "parse_teacher", "add_arguments", "main"]


@dataclass(frozen=True)
class TeacherSpec:
    label: str
    model: str  # a fastkd.models name, e.g. fastkd:resnet8, timm:resnet50
    checkpoint: Optional[Path]  # None: the model's pretrained hub weights
    weights: Optional[str] = None  # with hub weights: a torchvision enum member (default DEFAULT)

    @property
    def pretrained(self) -> bool:
        return self.checkpoint is None

    @property
    def source(self) -> str:
        return "pretrained" + (f"={self.weights}" if self.weights else "") if self.pretrained else str(self.checkpoint)


def parse_teacher(spec: str) -> TeacherSpec:
    """``[LABEL=]SOURCE:ARCH:CHECKPOINT`` -> :class:`TeacherSpec` (the label defaults to ARCH).

    The model name itself holds one colon (``fastkd:resnet8``), so the checkpoint is everything
    after the second colon and may contain colons of its own. ``pretrained`` in its place takes the
    model's hub weights (``timm:resnet50.a1_in1k:pretrained``; ``torchvision:resnet50:pretrained=IMAGENET1K_V2``).
    """
    label = None
    text = spec
    head, sep, tail = spec.partition("=")
    if sep and ":" not in head:
        label, text = head.strip(), tail
        if not label:
            raise ValueError(f"--teacher {spec!r}: empty label before '='")
    parts = text.split(":", 2)
    if len(parts) != 3 or not all(p.strip() for p in parts):
        raise ValueError(f"--teacher {spec!r}: expected [LABEL=]NAME:CHECKPOINT with NAME like fastkd:resnet8, "
                         f"timm:resnet50 or torchvision:resnet18 (e.g. fastkd:resnet8:runs/t/last.pt)")
    source, arch, checkpoint = parts
    if checkpoint == "pretrained" or checkpoint.startswith("pretrained="):
        weights = checkpoint.partition("=")[2] or None
        if weights is not None and source != "torchvision":
            raise ValueError(f"--teacher {spec!r}: pretrained=WEIGHTS names a torchvision weights enum member; a timm "
                             f"model takes its weights from the tag in its name (timm:NAME.TAG:pretrained)")
        return TeacherSpec(label or arch, f"{source}:{arch}", None, weights)
    return TeacherSpec(label or arch, f"{source}:{arch}", Path(checkpoint))


def _unique_labels(specs: Sequence[TeacherSpec]) -> list[TeacherSpec]:
    """Same-architecture teachers without explicit labels get their checkpoint's name appended."""
    counts = {}
    for s in specs:
        counts[s.label] = counts.get(s.label, 0) + 1
    out = [TeacherSpec(f"{s.label}@{s.checkpoint.stem if s.checkpoint else 'pretrained'}", s.model, s.checkpoint,
                       s.weights) if counts[s.label] > 1 else s for s in specs]
    labels = [s.label for s in out]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ValueError(f"teacher label(s) {dup} are ambiguous; name them: --teacher LABEL=NAME:CHECKPOINT")
    return out


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------
def add_arguments(parser) -> None:
    parser.add_argument("--data", required=True, metavar="DIR",
                        help="labelled images: an ImageNet-layout root (its val/ is used), a folder of class "
                             "folders, or a file of 'path label' lines")
    parser.add_argument("--teacher", action="append", required=True, metavar="[LABEL=]NAME:CHECKPOINT",
                        help="a teacher to analyse, e.g. fastkd:resnet8:runs/t8/last.pt or "
                             "big=timm:resnet50:r50.pth (a state_dict or safetensors file), or with its pretrained "
                             "hub weights timm:resnet50.a1_in1k:pretrained, "
                             "torchvision:resnet50:pretrained=IMAGENET1K_V2 (repeat for several)")
    parser.add_argument("--teacher-classes", default=None, metavar="imagenet|FILE",
                        help="map each teacher's outputs to the data's class folders by name: 'imagenet' (ImageNet "
                             "teachers, folders named by WordNet id such as n01440764) or FILE (one name per output)")
    parser.add_argument("--temperatures", default="1,2,4,8", help="comma-separated temperatures")
    parser.add_argument("--ats", default="4,2", metavar="TAU_TARGET,TAU_OTHER",
                        help="also report the metrics under ATS with these temperatures; 'none' to skip")
    parser.add_argument("--ats-grid", default="1,2,3,4,5,6:1,2,3,4,5", metavar="TAU1S:TAU2S",
                        help="the ATS regime diagnostic over this grid of tau1 (label) x tau2 (other classes): the "
                             "fraction of rows whose ATS soft label keeps the label on top; 'none' to skip")
    parser.add_argument("--kl-temperature", type=float, default=1.0,
                        help="temperature of the pairwise KL between teachers")
    parser.add_argument("--output", default="runs/analyze", metavar="DIR", help="where the reports go")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=None,
                        help="evaluation image size (centre crop); default: the size recorded in the fastkd "
                             "checkpoint's config (224 for a bare state_dict); a value that disagrees is warned about")
    parser.add_argument("--mean", default=None,
                        help="normalisation mean, comma-separated (default: the checkpoint's, else the loader's)")
    parser.add_argument("--std", default=None,
                        help="normalisation std, comma-separated (default: the checkpoint's, else the loader's)")
    parser.add_argument("--data-backend", default="auto", choices=("auto", "dali", "torch"),
                        help="data loader backend")
    parser.add_argument("--workers", type=int, default=None,
                        help="decoding threads / DataLoader workers (default: the loader's)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cuda, cuda:N or cpu")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")


def _device(name: str) -> torch.device:
    from .._device import resolve_device

    return resolve_device(name)


def _floats(text: Optional[str], name: str) -> Optional[tuple]:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{name} takes comma-separated numbers, got {text!r}") from None


def read_checkpoint_settings(path: Path) -> dict:
    """What a fastkd training checkpoint records about its inputs: ``{"image_size", "mean", "std",
    "classes", "model_name"}`` (keys absent when the file does not say; ``{}`` for a bare state_dict)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return {}  # load_weights reports unreadable files with a clear error later
    if not isinstance(obj, dict) or not isinstance(obj.get("config"), dict):
        return {}
    # The checkpoint's "input" record (the student's normalisation; fastkd.engine.trainer), else its config.
    cfg = {**obj["config"], **(obj["input"] if isinstance(obj.get("input"), dict) else {})}
    out = {}
    if cfg.get("image_size"):
        out["image_size"] = int(cfg["image_size"])
    for key in ("mean", "std"):
        if cfg.get(key) is not None:
            out[key] = tuple(float(v) for v in cfg[key])
    if obj.get("classes") is not None:
        out["classes"] = list(obj["classes"])
    if obj.get("model_name"):
        out["model_name"] = str(obj["model_name"])
    return out


def _pretrained_settings(spec: TeacherSpec) -> dict:
    """What a teacher's hub weights expect (its pretrained config): image size, mean, std."""
    from ..models.hub import preprocessing

    info = preprocessing(spec.model, spec.weights)
    out = {"mean": info.mean, "std": info.std}
    if info.image_size:
        out["image_size"] = info.image_size
    return out


def _build(spec: TeacherSpec, classes: list, teacher_classes: Optional[str]) -> nn.Module:
    """The teacher with its weights, its logits those of the data's ``classes``."""
    from ..models import create_model, load_weights
    from ..models.classes import map_teacher_classes, teacher_class_names

    n_data = len(classes)
    if spec.pretrained:
        from ..models.hub import load_pretrained

        model, info = load_pretrained(spec.model, None, weights=spec.weights)
        n_out = getattr(model, "num_classes", None) or info.num_classes
    else:
        n_out = n_data if teacher_classes is None else len(teacher_class_names(teacher_classes, None))
        model = create_model(spec.model, num_classes=n_out)
        try:
            load_weights(model, spec.checkpoint)
        except ValueError as e:
            raise ValueError(f"teacher {spec.label!r} ({spec.model}, {n_out} classes): {e}") from None
    if teacher_classes is not None:
        model.fastkd_class_map = map_teacher_classes(model, teacher_classes, classes, n_out)
    elif n_out != n_data:
        raise ValueError(f"teacher {spec.label!r} ({spec.model}) has {n_out} outputs and --data {n_data} classes: "
                         f"give --teacher-classes imagenet (class folders named by WordNet id) or FILE")
    return model


def _settle(name: str, flag: Optional[tuple], recorded: dict, specs) -> Optional[tuple]:
    """One value for ``name`` (image_size, mean, std): the flag wins (with a warning where a
    checkpoint recorded another value); else the checkpoints' value, which must agree."""
    values = {s.label: recorded[s.label][name] for s in specs if name in recorded[s.label]}
    option = "--" + name.replace("_", "-")
    if flag is not None:
        for label, v in values.items():
            if v != flag:
                logger.warning(f"fastkd analyze: {option} {_show(flag)} differs from the {_show(v)} that teacher "
                               f"{label!r} was trained with (its checkpoint's config); its numbers may be wrong")
        return flag
    distinct = set(values.values())
    if len(distinct) > 1:
        raise ValueError(f"the teachers were trained with different {name} ("
                         + ", ".join(f"{k}: {_show(v)}" for k, v in values.items())
                         + f"); analyse them in separate runs, or pass {option} for all of them")
    return distinct.pop() if distinct else None


def _show(v) -> str:
    return ",".join(f"{x:g}" for x in v) if isinstance(v, tuple) else str(v)


def main(args) -> int:
    soft_labels = [M.SoftLabel(temperature=t) for t in M.parse_temperatures(args.temperatures)]
    ats = M.parse_ats(args.ats)
    if ats is not None:
        soft_labels.append(ats)
    ats_grid = M.parse_ats_grid(args.ats_grid)
    if not (math.isfinite(args.kl_temperature) and args.kl_temperature > 0):
        raise ValueError(f"--kl-temperature must be positive, got {args.kl_temperature}")
    if args.batch_size < 1 or (args.image_size is not None and args.image_size < 1):
        raise ValueError("--batch-size and --image-size must be positive")
    if args.workers is not None and args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    specs = _unique_labels([parse_teacher(s) for s in args.teacher])
    for s in specs:
        if s.checkpoint is not None and not s.checkpoint.is_file():
            raise FileNotFoundError(f"teacher {s.label!r}: checkpoint {s.checkpoint} does not exist")
    data_root = Path(args.data).expanduser()
    if not data_root.exists():
        raise FileNotFoundError(f"--data {args.data}: no such file or folder")
    if not args.no_plots:
        from .plots import require_matplotlib

        require_matplotlib()  # fail before the long pass over the data, not after
    device = _device(args.device)

    from ..data import create_loader
    from ..data.index import resolve_split_root

    recorded = {s.label: _pretrained_settings(s) if s.pretrained else read_checkpoint_settings(s.checkpoint)
                for s in specs}
    for s in specs:
        name = recorded[s.label].get("model_name")
        if name is not None and name != s.model:
            logger.warning(f"fastkd analyze: teacher {s.label!r} is given as {s.model} but its checkpoint was "
                           f"trained as {name}")
    image_size = _settle("image_size", args.image_size, recorded, specs)
    if image_size is None:
        image_size = 224
        logger.info("fastkd analyze: no checkpoint records its image size; evaluating at 224 (--image-size to set)")
    mean = _settle("mean", _floats(args.mean, "--mean"), recorded, specs)
    std = _settle("std", _floats(args.std, "--std"), recorded, specs)

    data_dir = resolve_split_root(data_root, train=False)
    loader_kw = {}
    if mean is not None:
        loader_kw["mean"] = mean
    if std is not None:
        loader_kw["std"] = std
    loader = create_loader(data_dir, train=False, batch_size=args.batch_size, image_size=image_size,
                           backend=args.data_backend, device=str(device), num_threads=args.workers, **loader_kw)
    num_classes = len(loader.classes)
    for s in specs:
        classes = recorded[s.label].get("classes") if args.teacher_classes is None else None  # mapped by name
        if classes is not None and len(classes) != num_classes:
            raise ValueError(f"teacher {s.label!r} was trained on {len(classes)} classes, --data {data_dir} holds "
                             f"{num_classes}: point --data at the data set it was trained on")
        if classes is not None and list(classes) != list(loader.classes):
            first = next((a, b) for a, b in zip(classes, loader.classes) if a != b)
            raise ValueError(f"teacher {s.label!r} was trained on other class names than the folders of --data "
                             f"{data_dir} (first difference: {first}): labels would not match")
    from ..models import check_input_size

    models = {}
    for s in specs:
        model = _build(s, loader.classes, args.teacher_classes)
        check_input_size(model, s.model, image_size)
        models[s.label] = model.to(device)
    logger.info(f"analysing {len(models)} teacher(s) on {data_dir} ({loader.num_samples} images, "
                f"{num_classes} classes, {image_size} px, {loader.description}) on {device}")

    start = time.perf_counter()
    from tqdm import tqdm

    batches = tqdm(loader, total=len(loader), desc="analyze", unit="batch", disable=None)  # bar on a TTY only
    results = analyze(models, batches, soft_labels, device=device, kl_temperature=args.kl_temperature,
                      ats_grid=ats_grid)
    results = {"config": {"data": str(data_dir), "num_classes": num_classes, "image_size": image_size,
                          "loader": loader.backend, "decoder": loader.decoder,
                          "device": str(device), "seconds": round(time.perf_counter() - start, 2),
                          "teachers": [{"label": s.label, "model": s.model, "checkpoint": s.source}
                                       for s in specs],
                          "soft_labels": [s.name for s in soft_labels]},
               **results}
    written = write_outputs(results, args.output, plots=not args.no_plots)
    print(format_report(results))
    print(f"wrote {len(written)} files to {args.output}: " + ", ".join(p.name for p in written))
    return 0
