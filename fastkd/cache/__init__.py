"""The teacher-output cache: distil at the student's own speed.

``fastkd cache build`` (:mod:`fastkd.cache.build`) runs a teacher over exactly the teacher views
that ``fastkd train`` draws (augmentation is keyed by seed, epoch and sample position) and stores
its logits per epoch by dataset sample index (:mod:`fastkd.cache.store`); ``fastkd train
--teacher-cache DIR`` reads them back through :class:`fastkd.cache.source.CachedTeacher` instead
of running the teacher.
"""
from .store import CacheMismatchError, CacheReader

__all__ = ["CacheMismatchError", "CacheReader"]
