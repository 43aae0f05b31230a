"""Teacher sources: where the training loop gets each batch's teacher output.

The loop (see :mod:`fastkd.engine.pipeline`) talks to a :class:`TeacherSource` only::

    source.set_epoch(epoch)              # once, before the epoch's first submit
    handle(i+1) = source.submit(batch(i+1))   # one batch ahead, with the loader's Batch
    out(i)      = source.result(handle(i))    # a TeacherOutput, usable on the current stream

``submit`` is always called with the batch that ``result`` will be asked about next, in loader
order, one batch ahead; ``result`` is called exactly once per handle, in submission order.

Two implementations:

* :class:`OnlineTeacher` runs the frozen teacher model (:class:`~fastkd.engine.runner.TeacherRunner`:
  its own CUDA stream one batch ahead, or in order on CPU / ``--sequential``, the oracle). It can
  also run on any batch synchronously (``source(images)``), which validation uses for the
  teacher's metrics, and it returns features for DPK when asked.
* a cached source (the teacher-output cache) reads the logits stored for this epoch
  by sample index (``batch.indices``). It holds no model: ``has_model`` is False, so the engine
  builds no teacher, and validation reports no teacher metrics.

``TeacherOutput.logits`` is a dense ``(N, C)`` tensor, or a compressed top-k teacher
(``fastkd.losses.compressed.TopKTeacher``) that the losses read directly.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from .runner import TeacherOutput, TeacherRunner
from .timing import StepTimer

__all__ = ["TeacherSource", "OnlineTeacher", "TeacherOutput", "teacher_input"]


def teacher_input(batch) -> Tensor:
    """The teacher's view of a loader Batch (its own view when the loader made one)."""
    return batch.teacher_images if batch.teacher_images is not None else batch.images


class TeacherSource:
    """Where the teacher outputs come from. Subclasses implement :meth:`submit` and :meth:`result`.

    Flags (class or instance attributes):
        has_model: the source runs a teacher model and can be called on any batch
            (``source(images) -> TeacherOutput``, used by validation). False for a cache: the
            engine then builds no teacher and skips the teacher's validation metrics.
        provides_features: ``result(...).features`` holds the teacher's stage outputs (DPK).
        concurrent: the teacher runs on its own CUDA stream, overlapping the student.
    """

    has_model: bool = False
    provides_features: bool = False
    concurrent: bool = False

    def set_epoch(self, epoch: int) -> None:
        """Called before the first :meth:`submit` of every epoch (a resumed epoch included)."""

    def submit(self, batch) -> Any:
        """Start getting the teacher output of ``batch`` (a loader Batch); returns a handle."""
        raise NotImplementedError

    def result(self, handle) -> TeacherOutput:
        """The teacher output of a submitted batch, ready for use on the current stream."""
        raise NotImplementedError

    def __call__(self, images: Tensor) -> TeacherOutput:
        """Synchronous forward on any images (validation); only when ``has_model``."""
        raise TypeError(f"{type(self).__name__} holds no teacher model: it cannot run on arbitrary images")

    def close(self) -> None:
        """Release hooks, files or streams."""


class OnlineTeacher(TeacherSource):
    """The frozen teacher model, run one batch ahead on its own CUDA stream (or in order).

    Wraps a :class:`~fastkd.engine.runner.TeacherRunner`; build one with :meth:`from_model` or
    pass a runner.
    """

    has_model = True

    def __init__(self, runner: TeacherRunner):
        self.runner = runner

    @classmethod
    def from_model(cls, model: nn.Module, device: torch.device, *, amp_dtype: Optional[torch.dtype] = None,
                   channels_last: bool = False, concurrent: bool = True, cuda_graph: bool = False,
                   compile: bool = False, feature_layers: Optional[Sequence[str]] = None,
                   timer: Optional[StepTimer] = None) -> "OnlineTeacher":
        return cls(TeacherRunner(model, device, amp_dtype=amp_dtype, channels_last=channels_last,
                                 concurrent=concurrent, cuda_graph=cuda_graph, compile=compile,
                                 feature_layers=feature_layers, timer=timer))

    @property
    def provides_features(self) -> bool:  # type: ignore[override]
        return self.runner.hooks is not None

    @property
    def concurrent(self) -> bool:  # type: ignore[override]
        return self.runner.concurrent

    @property
    def model(self) -> nn.Module:
        return self.runner.model

    def submit(self, batch):
        return self.runner.submit(teacher_input(batch))

    def result(self, handle) -> TeacherOutput:
        return self.runner.result(handle)

    def __call__(self, images: Tensor) -> TeacherOutput:
        return self.runner(images)

    def close(self) -> None:
        self.runner.close()
