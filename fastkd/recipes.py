"""Whole runs, assembled from the engine and the teacher-output cache: what ``fastkd train`` calls.

The engine (:mod:`fastkd.engine`) runs a student against a teacher source; the cache
(:mod:`fastkd.cache`) builds on the engine and provides the source that reads stored teacher
outputs. This module sits above both and picks the source from the config::

    from fastkd.engine import make_config
    from fastkd.recipes import train
    result = train(make_config(data="/imagenet", teacher="timm:resnet50", teacher_cache="cache/r50",
                               student="timm:resnet18", method="kd", output="runs/r18-from-cache"))

(:func:`fastkd.engine.train` runs the same configs except those with ``teacher_cache``.)
"""
from __future__ import annotations

from .engine import config as C
from .engine.trainer import Trainer

__all__ = ["teacher_source", "trainer", "train"]


def teacher_source(cfg: C.TrainConfig):
    """The teacher source of ``cfg`` for :class:`~fastkd.engine.trainer.Trainer`: the cache's
    (``--teacher-cache DIR``: no teacher model is built), else None (the teacher model, online)."""
    if cfg.teacher_cache is None:
        return None
    from .cache.source import CachedTeacher

    return CachedTeacher.for_trainer


def trainer(cfg: C.TrainConfig) -> Trainer:
    """The :class:`~fastkd.engine.trainer.Trainer` of ``cfg`` with its teacher source."""
    return Trainer(cfg, teacher_source=teacher_source(cfg))


def train(cfg: C.TrainConfig) -> dict:
    """Run ``fastkd train`` with a config (a teacher cache included); returns ``{"output", "epochs":
    [records], "best_top1", ...}`` as :func:`fastkd.engine.train` does."""
    return trainer(cfg).run()
