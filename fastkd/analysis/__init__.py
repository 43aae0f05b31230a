"""Capacity-mismatch analysis: dark-knowledge metrics of teachers, plots, ``fastkd analyze``
and the ``fastkd study capacity`` mini-study.

:mod:`fastkd.analysis.metrics` holds the metrics (torch only); plotting needs matplotlib
(a base dependency), imported only when a plot is drawn.
"""
from .metrics import METRICS, PairMeter, SoftLabel, TeacherMeter, wrong_class_spearman, wrong_class_stats

__all__ = ["METRICS", "SoftLabel", "TeacherMeter", "PairMeter", "wrong_class_stats", "wrong_class_spearman"]
