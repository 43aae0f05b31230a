"""One epoch of training input: each batch paired with its own teacher output.

:func:`steps` owns the read-ahead that lets the teacher run one batch ahead of the student::

    out(i)      = source.result(handle(i))   # the student stream waits on T(i) (online source)
    state(i)    = loader.state_dict()        # where a checkpoint after step i resumes: taken
                                             # BEFORE batch i+1 is read ahead for the teacher
    batch(i+1)  = next(loader)               # host time: "data"
    handle(i+1) = source.submit(batch(i+1))  # T(i+1) queued on the teacher stream
    yield Step(batch(i), out(i), state(i))   # the caller runs the student step S(i)

so the student step of batch ``i`` is queued after the teacher forward of batch ``i+1`` and the
two overlap on a GPU. Without a teacher source (CE-only runs, ESKD's later epochs) the steps
carry ``teacher=None`` and nothing is submitted.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

from .teacher import TeacherOutput, TeacherSource
from .timing import StepTimer

__all__ = ["Step", "steps"]


@dataclass
class Step:
    """One training step's input.

    batch: the loader's Batch (``images``, ``labels``, ``teacher_images``, ``valid``, ``indices``).
    teacher: this batch's teacher output, or None when the epoch runs without a teacher.
    loader_state_after: the loader state that resumes at the batch after this one (what a
        checkpoint written after this step must save), or None where ``want_state`` said no.
    index: the batch's position in the epoch (0-based; a resumed epoch starts past 0).
    """

    batch: Any
    teacher: Optional[TeacherOutput]
    loader_state_after: Optional[dict]
    index: int


def steps(loader, source: Optional[TeacherSource], epoch: int, *, start: int = 0,
          want_state: Optional[Callable[[int], bool]] = None, timer: Optional[StepTimer] = None) -> Iterator[Step]:
    """Yield the :class:`Step` s of ``epoch``, the teacher output submitted one batch ahead.

    Args:
        loader: a fastkd loader (``set_epoch``, ``state_dict``, iteration); a resume point loaded
            into it for this epoch is kept, and ``start`` is then the index of its first batch.
        source: where teacher outputs come from, or None (no teacher this epoch).
        epoch: the epoch to read.
        start: index of the first batch yielded (for :attr:`Step.index`).
        want_state: ``want_state(index)`` says whether step ``index`` needs
            ``loader_state_after`` (taking it costs host time); default: every step.
        timer: records the host time blocked on the loader as ``data``.
    """
    loader.set_epoch(epoch)
    if source is not None:
        source.set_epoch(epoch)
    it = iter(loader)

    def read():
        t0 = time.perf_counter()
        batch = next(it, None)
        if timer is not None:
            timer.add_host("data", time.perf_counter() - t0)
        return batch

    index = start
    batch = read()
    handle = source.submit(batch) if source is not None and batch is not None else None
    while batch is not None:
        out = source.result(handle) if source is not None else None
        state = loader.state_dict() if want_state is None or want_state(index) else None
        nxt = read()
        handle = source.submit(nxt) if source is not None and nxt is not None else None
        yield Step(batch, out, state, index)
        batch, index = nxt, index + 1
