"""The distillation engine: config, teacher sources (the concurrent runner), the training loop, checkpoints.

``fastkd train`` and ``fastkd demo`` are thin front ends over :func:`train` (``fastkd train`` through
:func:`fastkd.recipes.train`)::

    from fastkd.engine import make_config, train
    result = train(make_config(data="/imagenet", teacher="timm:resnet50", teacher_checkpoint="r50.pth",
                               student="timm:resnet18", method="kd", output="runs/r50-r18"))

A config with ``teacher_cache`` runs through :func:`fastkd.recipes.train` (what ``fastkd train`` calls),
which picks the cache's teacher source: the cache builds on the engine, never the other way round.
"""
from .config import ConfigError, TrainConfig, make_config
from .runner import TeacherOutput, TeacherRunner
from .teacher import OnlineTeacher, TeacherSource
from .trainer import Trainer, evaluate, train

__all__ = ["TrainConfig", "ConfigError", "make_config", "train", "Trainer", "evaluate", "TeacherRunner",
           "TeacherOutput", "TeacherSource", "OnlineTeacher"]
