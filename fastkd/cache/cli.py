"""``fastkd cache build``: store a teacher's logits for the views ``fastkd train`` will draw.

::

    fastkd cache build --data /imagenet --teacher timm:resnet50 --teacher-checkpoint r50.pth \\
        --epochs 90 --batch-size 256 --format topk --top-k 10 --dtype fp16 --output cache/r50-k10
    fastkd train --data /imagenet --student timm:resnet18 --method kd --epochs 90 \\
        --batch-size 256 --teacher-cache cache/r50-k10 --output runs/r18-from-cache

The data, augmentation and view flags are those of ``fastkd train`` (same names, same
defaults); a training run must use the same values (the cache refuses otherwise, naming the
field). A hub teacher: ``--teacher timm:resnet50.a1_in1k --teacher-pretrained`` (its normalisation
comes with it; ``--teacher-classes imagenet`` for a subset of ImageNet's classes); the manifest
records the weights' identity. Before the first epoch the teacher is checked on the validation split. Several processes: ``torchrun --nproc_per_node N -m fastkd cache build ...``.
A killed build continues where it stopped when run again with the same command.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging

from ..engine import config as C
from . import store

logger = logging.getLogger("fastkd")

#: TrainConfig fields that decide the teacher views or how the teacher runs.
TRAIN_FIELDS = ("data", "data_backend", "augment", "batch_size", "image_size", "teacher_image_size", "workers",
                "seed", "teacher", "teacher_checkpoint", "device", "amp", "channels_last", "compile", "skip_corrupt",
                "teacher_pretrained", "teacher_weights", "teacher_mean", "teacher_std", "teacher_classes",
                "check_teacher")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data, views and teacher (the flags of 'fastkd train')")
    for name in TRAIN_FIELDS:
        f = C.FIELDS[name]
        kind, _ = C._KINDS[name]
        default = f.default
        help_ = f.metadata["help"] + (f" (default: {default})" if default is not None and kind != "bool" else "")
        kw = dict(default=argparse.SUPPRESS, help=help_, dest=name)
        if "metavar" in f.metadata:
            kw["metavar"] = f.metadata["metavar"]
        if kind == "bool":
            g.add_argument(C.flag(name), action=argparse.BooleanOptionalAction, **kw)
        elif kind.endswith("_list"):
            g.add_argument(C.flag(name), nargs="+", type=float if kind == "float_list" else str, **kw)
        else:
            g.add_argument(C.flag(name), type={"int": int, "float": float, "str": str}[kind],
                           choices=f.metadata.get("choices"), **kw)
    c = parser.add_argument_group("cache")
    c.add_argument("--epochs", type=int, required=True, help="cache epochs 0..E-1 (the training run's --epochs)")
    c.add_argument("--output", required=True, metavar="CACHE", help="cache folder (created; a partly built one "
                   "with the same settings is continued)")
    c.add_argument("--format", choices=store.FORMATS, default="full",
                   help="full: every logit (exact with fp32); topk: the K largest logits, the label's logit and "
                        "one fill value per row")
    c.add_argument("--dtype", choices=store.DTYPES, default="fp32", help="storage dtype of the logits")
    c.add_argument("--top-k", type=int, default=None, metavar="K", help="--format topk: logits kept per row")


def config_from_args(args: argparse.Namespace) -> C.TrainConfig:
    values = {name: getattr(args, name) for name in TRAIN_FIELDS if hasattr(args, name)}
    cfg = dataclasses.replace(C.TrainConfig(), epochs=args.epochs, **values)
    for name in ("batch_size", "image_size"):
        if getattr(cfg, name) < 1:
            raise C.ConfigError(f"{C.flag(name)} must be >= 1, got {getattr(cfg, name)}")
    if cfg.teacher_image_size is not None and cfg.teacher_image_size < 1:
        raise C.ConfigError(f"--teacher-image-size must be >= 1, got {cfg.teacher_image_size}")

    def need(cond, msg):
        if not cond:
            raise C.ConfigError(msg)

    C._validate_pretrained(cfg, need)  # hub weights, the teacher's normalisation and classes
    return cfg


class BuildInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM during a build (raised in the main thread by the handler below)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum, frame):
    raise BuildInterrupted(signum)


def _drop_quietly(exc: BaseException) -> None:
    """Free the interrupted build's frames now (its data loader among them). The loader's worker
    processes got the signal too (Ctrl-C and ``kill -TERM -PGID`` reach the whole process group);
    PyTorch's SIGCHLD handler would report their deaths as a traceback while the loader shuts
    down, so it is off while the frames go."""
    import gc
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        exc.__traceback__ = None
        exc.__context__ = None
        gc.collect()
    finally:
        signal.signal(signal.SIGCHLD, previous)


def main(args: argparse.Namespace) -> int:
    import signal
    import threading

    from .build import CacheSpec, build_cache, epochs_text

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        cfg = config_from_args(args)
        spec = CacheSpec(args.format, args.dtype, args.top_k)
        spec.validate()
        summary = build_cache(cfg, args.output, spec)
    except (C.ConfigError, FileNotFoundError, ValueError, ImportError, OSError) as exc:
        logger.error("fastkd cache build: error: %s", exc)
        return 2
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        _drop_quietly(exc)
        logger.error("fastkd cache build: error: interrupted by %s: the epoch being built is discarded, the finished "
                     "ones are kept; run the same command to continue", signal.Signals(signum).name)
        return 128 + int(signum)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    logger.info("fastkd cache build: done; %s holds %s", summary["output"], epochs_text(range(cfg.epochs)))
    return 0
