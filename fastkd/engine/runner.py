"""The frozen teacher, run one batch ahead on its own CUDA stream.

Timeline on a GPU, with ``T(i)`` the teacher forward of batch ``i`` and ``S(i)`` the student's
forward, backward and optimizer step on batch ``i``::

    teacher stream   | T(i+1) ..........|  T(i+2) ..........|
    student stream   | S(i) .............. | S(i+1) ...........|
                          ^ waits on T(i)'s event    ^ waits on T(i+1)'s event

The step pipeline (:mod:`fastkd.engine.pipeline`, through the
:class:`~fastkd.engine.teacher.OnlineTeacher` source) calls :meth:`TeacherRunner.result` for batch ``i`` (the student stream waits on the
event recorded after ``T(i)``; no device-wide sync), then :meth:`TeacherRunner.submit` for batch
``i+1`` (queued on the teacher stream, which first waits for the student stream so the input
batch is ready), then queues ``S(i)``. The two streams overlap, so the GPU fills the gaps that
either model alone leaves idle (small kernels, launch latency, the optimizer's memory-bound
tail).

Memory across streams: a tensor allocated on one stream and used on another is recorded on the
consumer (``Tensor.record_stream``), so the caching allocator does not hand its memory out
again before the consumer's queued work has run: the input batch (allocated on the student
stream) is recorded on the teacher stream, and the teacher's outputs on the student stream.

Without CUDA, or with ``concurrent=False`` (``--sequential``), the same object computes the
teacher forward in order, on the current stream, when the result is asked for: the correctness
oracle. Both paths compute identical numbers.

The teacher runs in eval mode under ``torch.inference_mode`` and autocast, optionally in
channels_last, compiled, or captured as a CUDA graph (static batch shape; a smaller final batch
is padded into the static buffer: the teacher is in eval mode, so rows do not interact). Its
outputs are cloned outside inference mode into ordinary tensors: inference tensors cannot be
saved for backward, and a loss term such as DPK's projection of teacher features saves its input.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .. import _compat
from .timing import StepTimer


@dataclass
class TeacherOutput:
    logits: Tensor  # (N, C); a cached source may give a compressed top-k teacher instead
    features: Optional[list[Tensor]] = None  # stage outputs for feature-level methods (DPK)

    def tensors(self) -> list[Tensor]:
        return [self.logits] + list(self.features or [])


@dataclass
class Pending:
    """A submitted teacher forward: computed (concurrent) or still to compute (sequential)."""
    images: Optional[Tensor] = None
    output: Optional[TeacherOutput] = None
    done: Optional["torch.cuda.Event"] = None


def autocast_context(device: torch.device, amp_dtype: Optional[torch.dtype], cache_enabled: bool = True):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype, cache_enabled=cache_enabled)


class TeacherRunner:
    """Runs a frozen teacher; ``submit(images)`` then ``result(pending)`` -> :class:`TeacherOutput`.

    Args:
        model: the teacher; it is put in eval mode, frozen and moved to ``device`` here.
        device: where it runs.
        amp_dtype: autocast dtype (``None``: full precision).
        channels_last: run in channels_last memory format.
        concurrent: use a separate CUDA stream, one batch ahead (ignored without CUDA).
        cuda_graph: capture the forward as a CUDA graph at the first batch (CUDA only).
        compile: ``torch.compile`` the forward.
        feature_layers: names of modules whose outputs are returned as ``features``.
        timer: where the ``teacher`` / ``teacher_wait`` sections are recorded.
    """

    def __init__(self, model: nn.Module, device: torch.device, *, amp_dtype: Optional[torch.dtype] = None,
                 channels_last: bool = False, concurrent: bool = True, cuda_graph: bool = False,
                 compile: bool = False, feature_layers: Optional[Sequence[str]] = None,
                 timer: Optional[StepTimer] = None):
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"a CUDA-graph teacher needs a CUDA device, got {device}")
        self.device = device
        self.amp_dtype = amp_dtype
        self.channels_last = channels_last
        model.eval()
        model.requires_grad_(False)
        model.to(device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.hooks = None
        if feature_layers:
            from ..losses.dpk import FeatureHooks

            self.hooks = FeatureHooks(model, list(feature_layers))
        self.forward_fn = torch.compile(model) if compile else model
        self.concurrent = concurrent and device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.concurrent else None
        self.use_graph = cuda_graph
        self._graph = None
        self._static_in: Optional[Tensor] = None
        self._static_out: Optional[TeacherOutput] = None
        self.timer = timer or StepTimer(device, enabled=False)

    # ---- the forward itself ---------------------------------------------------------------
    def _prepare(self, images: Tensor) -> Tensor:
        if images.device != self.device:
            images = images.to(self.device, non_blocking=True)
        if self.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def _raw_forward(self, images: Tensor) -> TeacherOutput:
        """Eval-mode forward on the current stream; outputs are inference tensors."""
        # Autocast's weight cache is off: it must not be filled during CUDA-graph capture, and
        # frozen (requires_grad=False) weights never use it anyway.
        with torch.inference_mode(), autocast_context(self.device, self.amp_dtype, cache_enabled=False):
            if self.hooks is not None:
                self.hooks.clear()
            logits = self.forward_fn(images)
            feats = self.hooks.features if self.hooks is not None else None
        if not isinstance(logits, Tensor):
            raise TypeError(f"the teacher returned {type(logits).__name__}; fastkd needs a logits tensor (N, C)")
        return TeacherOutput(logits, feats)

    @staticmethod
    def _own(out: TeacherOutput, rows: Optional[int] = None) -> TeacherOutput:
        """Clone into ordinary tensors (outside inference mode), optionally the first ``rows`` only."""
        cut = (lambda t: t) if rows is None else (lambda t: t[:rows])
        feats = [cut(f).clone() for f in out.features] if out.features is not None else None
        return TeacherOutput(cut(out.logits).clone(), feats)

    def _capture(self, images: Tensor) -> None:
        """Record the forward of a static input buffer shaped like ``images`` as a CUDA graph."""
        self._static_in = images.clone()
        side = self.stream if self.stream is not None else torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up: cuDNN autotuning, lazy initialisation, compilation
                self._raw_forward(self._static_in)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            self._static_out = self._raw_forward(self._static_in)
        self._graph = graph
        _compat.log_once(f"fastkd: teacher captured as a CUDA graph for input {tuple(images.shape)} "
                         f"{images.dtype}; smaller batches are padded into it")

    def _forward(self, images: Tensor) -> TeacherOutput:
        """Forward on the current stream, returning ordinary (cloned) tensors."""
        if not self.use_graph:
            return self._own(self._raw_forward(images))
        if self._graph is None:
            self._capture(images)
        static = self._static_in
        n = images.shape[0]
        if images.shape[1:] != static.shape[1:] or n > static.shape[0] or images.dtype != static.dtype:
            _compat.log_once(f"fastkd: teacher input {tuple(images.shape)} {images.dtype} does not fit the CUDA "
                             f"graph's {tuple(static.shape)} {static.dtype}; running it eagerly (speed only)")
            return self._own(self._raw_forward(images))
        static[:n].copy_(images)
        self._graph.replay()
        return self._own(self._static_out, rows=n)

    # ---- scheduling -----------------------------------------------------------------------
    def submit(self, images: Tensor) -> Pending:
        """Start the teacher forward of ``images`` (queued on the teacher stream when concurrent)."""
        images = self._prepare(images)
        if not self.concurrent:
            return Pending(images=images)
        main = torch.cuda.current_stream(self.device)
        # The batch was produced on the student stream (loader copy, normalisation): wait for it.
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            images.record_stream(self.stream)
            with self.timer.section("teacher"):
                out = self._forward(images)
            done = torch.cuda.Event()
            done.record(self.stream)
        return Pending(output=out, done=done)

    def result(self, pending: Pending) -> TeacherOutput:
        """The teacher output of a submitted batch, usable on the current stream."""
        if pending.output is None:  # sequential: compute now, in order, on this stream
            with self.timer.section("teacher"):
                return self._forward(pending.images)
        main = torch.cuda.current_stream(self.device)
        with self.timer.section("teacher_wait"):
            main.wait_event(pending.done)
        for t in pending.output.tensors():
            t.record_stream(main)
        return pending.output

    def __call__(self, images: Tensor) -> TeacherOutput:
        """Synchronous forward on the current stream (validation)."""
        return self._forward(self._prepare(images))

    def close(self) -> None:
        if self.hooks is not None:
            self.hooks.remove()
            self.hooks = None
