"""Atomic, complete checkpoints and ``--resume auto``.

A checkpoint is written to a temporary file in the same directory, flushed and fsync'ed, then
renamed over its final name (``os.replace`` is atomic on POSIX), and the directory entry is
fsync'ed: a crash, ``kill -9`` or power loss leaves either the previous complete file or the new
complete file, plus at worst a torn ``.NAME.tmp.PID`` file that resuming ignores (and removes).

Files in the output directory: ``last.pt`` (every save), ``best.pt`` (best validation top-1 so
far) and, with ``--save-every N``, ``epoch_N.pt``; the extra names are hard links to the
``last.pt`` just written (a copy where links are not supported), so they cost no extra write.

Every file is loadable with ``torch.load(weights_only=True)``: RNG states are stored as tensors
and plain Python lists.

Test hook (used only by the test suite, never set it otherwise): the environment variable
``FASTKD_TEST_KILL`` = ``step:N`` makes the process SIGKILL itself right after optimizer step N,
and ``save:N`` inside its N-th checkpoint write, after half the temporary file is on disk.
"""
from __future__ import annotations

import logging
import os
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Optional

import numpy as np
import torch

logger = logging.getLogger("fastkd")

LAST, BEST = "last.pt", "best.pt"
_EPOCH_RE = re.compile(r"^epoch_(\d+)\.pt$")
_TMP_RE = re.compile(r"^\..+\.tmp\.\d+$")
_saves_done = 0


# --------------------------------------------------------------------------------------------
# Test hook
# --------------------------------------------------------------------------------------------
def _kill_spec() -> Optional[tuple[str, int]]:
    spec = os.environ.get("FASTKD_TEST_KILL")
    if not spec:
        return None
    kind, _, n = spec.partition(":")
    if kind not in ("step", "save") or not n.isdigit():
        raise ValueError(f"FASTKD_TEST_KILL={spec!r}: expected 'step:N' or 'save:N' (a test-only hook)")
    return kind, int(n)


def maybe_kill_after_step(step: int) -> None:
    """Test hook: SIGKILL this process after optimizer step ``step`` if asked to."""
    spec = _kill_spec()
    if spec == ("step", step):
        os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------------------------
# RNG states
# --------------------------------------------------------------------------------------------
def rng_state() -> dict:
    """Every generator the engine draws from: torch (CPU and CUDA), NumPy, Python."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            logger.warning("fastkd: checkpoint holds CUDA RNG states of %d device(s), this machine has %d; "
                           "CUDA generators keep their fresh seeds", len(cuda_states), torch.cuda.device_count())


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp.{os.getpid()}")


def save_atomic(obj, path) -> Path:
    """``torch.save`` to a temporary file, fsync, then rename over ``path``."""
    global _saves_done
    path = Path(path)
    tmp = _tmp_name(path)
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    _saves_done += 1
    spec = _kill_spec()
    if spec == ("save", _saves_done):
        # Simulate a kill in the middle of the write: only half the bytes reached the disk.
        with open(tmp, "r+b") as fh:
            fh.truncate(os.path.getsize(tmp) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def link_atomic(src, dst) -> Path:
    """Make ``dst`` a hard link to (or, where links fail, a copy of) ``src``, atomically."""
    src, dst = Path(src), Path(dst)
    tmp = _tmp_name(dst)
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    _fsync_dir(dst.parent)
    return dst


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
def load(path) -> dict:
    """Load a fastkd checkpoint onto the CPU; a clear error if it is missing, torn or foreign."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"checkpoint {str(path)!r} cannot be read (truncated or not a PyTorch file?): "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
        raise ValueError(f"checkpoint {str(path)!r} is not a fastkd training checkpoint (no 'model'/'epoch' entries)")
    return state


def candidates(output_dir) -> list[Path]:
    """Checkpoint files in ``output_dir``, newest first (temporary files excluded)."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    files = [p for p in d.iterdir() if p.is_file() and (p.name in (LAST, BEST) or _EPOCH_RE.match(p.name))]
    return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name == LAST), reverse=True)


def find_latest(output_dir) -> Optional[tuple[Path, dict]]:
    """The newest checkpoint in ``output_dir`` that loads, with its state; ``None`` if there is none.

    ``last.pt`` is rewritten at every save, so it is the newest; an older ``epoch_N.pt`` or
    ``best.pt`` is used only when a newer file fails to load (skipped with a warning).
    """
    for path in candidates(output_dir):
        try:
            return path, load(path)
        except ValueError as exc:
            logger.warning("fastkd: skipping unreadable checkpoint: %s", exc)
    return None


def remove_stale_temp_files(output_dir) -> list[Path]:
    """Delete ``.NAME.tmp.PID`` leftovers of interrupted writes; returns what was removed."""
    d = Path(output_dir)
    removed = []
    if d.is_dir():
        for p in d.iterdir():
            if p.is_file() and _TMP_RE.match(p.name):
                p.unlink()
                removed.append(p)
    if removed:
        logger.info("fastkd: removed %d torn temporary checkpoint file(s): %s", len(removed),
                    ", ".join(p.name for p in removed))
    return removed
