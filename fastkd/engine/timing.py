"""Step-time breakdown without extra device syncs on the hot path.

On CUDA each section records a pair of timing events on the stream its work is queued on
(the teacher's on the teacher stream); the pairs are resolved only in :meth:`StepTimer.flush`,
which the loop calls at logging boundaries where it synchronises anyway. On CPU the work is
synchronous, so ``time.perf_counter`` around a section measures it exactly.

Sections used by the engine: ``data`` (host time blocked on the loader), ``teacher`` (teacher
forward, overlapping the student when concurrent), ``teacher_wait`` (the student stream stalled
on the teacher), ``forward``, ``loss``, ``backward``, ``optimizer``.
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch


class StepTimer:
    def __init__(self, device: torch.device, enabled: bool = True):
        self.cuda = device.type == "cuda"
        self.enabled = enabled
        self.totals: dict[str, float] = defaultdict(float)  # seconds
        self._pending: list = []  # (name, start event, end event), CUDA only

    @contextmanager
    def section(self, name: str):
        """Time the work queued (CUDA) or done (CPU) inside the block, on the current stream."""
        if not self.enabled:
            yield
            return
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._pending.append((name, start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.totals[name] += time.perf_counter() - t0

    def add_host(self, name: str, seconds: float) -> None:
        """Host-side time (e.g. waiting for the loader), measured by the caller."""
        if self.enabled:
            self.totals[name] += seconds

    def flush(self) -> None:
        """Resolve the recorded CUDA events (waits for the last of them)."""
        for name, start, end in self._pending:
            end.synchronize()
            self.totals[name] += start.elapsed_time(end) / 1000.0
        self._pending.clear()

    def reset(self) -> None:
        self.flush()
        self.totals.clear()

    def per_step_ms(self, steps: int) -> dict[str, float]:
        self.flush()
        steps = max(steps, 1)
        return {k: round(v * 1000.0 / steps, 3) for k, v in sorted(self.totals.items())}

    def state_dict(self) -> dict:
        self.flush()
        return dict(self.totals)

    def load_state_dict(self, state: dict) -> None:
        self.totals = defaultdict(float, state)
