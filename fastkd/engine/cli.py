"""``fastkd train``: flags (generated from :class:`fastkd.engine.config.TrainConfig`) -> config -> engine.

Single process::

    fastkd train --data /imagenet --teacher timm:resnet50 --teacher-checkpoint r50.pth \\
        --student timm:resnet18 --method kd --amp bf16 --channels-last --output runs/r50-r18

DDP (one process per GPU, also multi-node)::

    torchrun --nproc_per_node 8 -m fastkd train --config my.yaml
"""
from __future__ import annotations

import argparse
import logging

from . import config as C

logger = logging.getLogger("fastkd")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    C.add_arguments(parser)


def main(args: argparse.Namespace) -> int:
    try:
        cfg = C.from_args(args)
    except C.ConfigError as exc:
        logger.error("fastkd train: %s", exc)
        return 2
    from .trainer import train

    try:
        result = train(cfg)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        # Bad paths, data sets, model names or checkpoints: a clear message, not a traceback.
        logger.error("fastkd train: error: %s", exc)
        return 2
    final = result.get("final")
    if final is not None:
        logger.info("fastkd train: done; best top-1 %.2f%%, outputs in %s", result["best_top1"], result["output"])
    return 0
