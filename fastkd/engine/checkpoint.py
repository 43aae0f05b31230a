"""Atomic, complete checkpoints and ``--resume auto``.

A checkpoint is written to a temporary file in the same directory, flushed and fsync'ed, then
renamed over its final name (``os.replace`` is atomic on POSIX), and the directory entry is
fsync'ed: a crash, ``kill -9`` or power loss leaves either the previous complete file or the new
complete file, plus at worst a torn ``.NAME.tmp.PID`` file that resuming ignores (and removes).

Files in the output directory: ``last.pt`` (every save), ``best.pt`` (best validation top-1 so
far) and, with ``--save-every N``, ``epoch_N.pt``; the extra names are hard links to the
``last.pt`` just written (a copy where links are not supported), so they cost no extra write.

Every file is loadable with ``torch.load(weights_only=True)``: RNG states are stored as tensors
and plain Python lists. Every file carries a SHA-256 ``checksum`` of its payload (each tensor's
bytes, dtype and shape and every other value, walked in key order), verified on load: a file whose
bytes changed on disk is refused by name, and ``--resume auto`` moves on to the next good file.

A full disk during a write raises ``OSError(ENOSPC, "no space left on device while writing
PATH ...")`` and removes the temporary file; the previous checkpoint stays intact.

The library has no fault-injection points: the tests kill a run at an exact step or in the
middle of a write by patching functions the engine already calls (``tests/engine/kill_run.py``).
"""
from __future__ import annotations

import errno
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

# Checksums live in fastkd._checksum (shared with fastkd.models.load_weights); re-exported here.
from .._checksum import CHECKSUM_KEY, payload_checksum, verify  # noqa: F401

logger = logging.getLogger("fastkd")

LAST, BEST = "last.pt", "best.pt"
_EPOCH_RE = re.compile(r"^epoch_(\d+)\.pt$")
_TMP_RE = re.compile(r"^\..+\.tmp\.\d+$")


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


def _is_disk_full(exc: BaseException, directory: Path) -> bool:
    """True when ``exc`` (or an exception it wraps) is ENOSPC/EDQUOT, or the disk has no room left.

    ``torch.save`` may turn the OSError of a failed write into a RuntimeError of its own
    ("unexpected pos ..."), so the chain is searched and, failing that, the free space checked.
    """
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(directory).free < (1 << 20)
    except OSError:
        return False


def save_atomic(obj, path) -> Path:
    """``torch.save`` to a temporary file, fsync, then rename over ``path``.

    A dict ``obj`` gets its payload checksum stored under ``"checksum"`` (see :func:`verify`).
    On failure the temporary file is removed and ``path`` is left as it was; a full disk raises
    ``OSError(ENOSPC)`` with a message naming ``path``.
    """
    path = Path(path)
    if isinstance(obj, dict):
        obj = {**obj, CHECKSUM_KEY: payload_checksum(obj)}
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(exc, Exception) and _is_disk_full(exc, path.parent):
            raise OSError(errno.ENOSPC, f"no space left on device while writing {path} (the previous checkpoint, "
                                        f"if any, is intact; free some space or choose another --output)") from exc
        raise
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
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, Exception) and _is_disk_full(exc, dst.parent):
            raise OSError(errno.ENOSPC, f"no space left on device while writing {dst}") from exc
        raise
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
    verify(state, path)
    return state


def candidates(output_dir) -> list[Path]:
    """Checkpoint files in ``output_dir``: ``last.pt`` first, then ``epoch_N.pt`` (highest N first),
    then ``best.pt`` (temporary files excluded). Names, not modification times, give the order:
    a copied run folder (``cp -r``) has fresh times in copy order."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    files = [p for p in d.iterdir() if p.is_file() and (p.name in (LAST, BEST) or _EPOCH_RE.match(p.name))]

    def rank(p: Path):
        if p.name == LAST:
            return (0, 0)
        m = _EPOCH_RE.match(p.name)
        return (1, -int(m.group(1))) if m else (2, 0)

    return sorted(files, key=rank)


def _progress(state: dict) -> tuple:
    return (int(state.get("global_step", 0)), int(state.get("epoch", 0)), int(state.get("step_in_epoch", 0)))


def find_latest(output_dir) -> Optional[tuple[Path, dict]]:
    """The newest checkpoint in ``output_dir`` that loads, with its state; ``None`` if there is none.

    ``last.pt`` is rewritten at every save, so it is the newest. Only when it is missing, fails
    to load or fails its checksum (skipped with a warning naming it) are the others read, and the
    one furthest into training (global step) is used: ``epoch_N.pt`` or ``best.pt``. When
    checkpoint files exist but none of them loads, a ``ValueError`` says so and what to do
    (never a silent fresh start over a damaged run).
    """
    problems, good = [], []
    for path in candidates(output_dir):
        try:
            state = load(path)
        except ValueError as exc:
            logger.warning("fastkd: skipping checkpoint %s: %s", path.name, exc)
            problems.append(f"{path.name}: {exc}")
            continue
        if path.name == LAST:
            return path, state
        good.append((path, state))
    if good:
        path, state = max(good, key=lambda ps: _progress(ps[1]))
        if problems:
            logger.warning("fastkd: resuming from %s (global step %d) instead", path.name, _progress(state)[0])
        return path, state
    if problems:
        raise ValueError(f"--resume auto: {output_dir} holds checkpoint file(s) but none can be used ("
                         + "; ".join(problems) + "). Resume from a good copy with --resume PATH, or move the "
                         "damaged file(s) away to start this --output afresh")
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
