"""One writer per folder: the lock that keeps two fastkd processes out of one run or cache folder.

``fastkd train --output DIR`` and ``fastkd cache build --output DIR`` hold an exclusive
``flock`` on ``DIR/.fastkd.lock`` while they run; the file holds the holder's PID (for the
message only). A second process on the same folder is refused at once with one line naming
that PID. The operating system drops the lock when its process ends, however it ends (kill -9
included), so a lock can never outlive its holder: a lock file whose lock is free but that still
names a PID was left by a process that died without cleaning up, and is taken over with a
warning. A clean exit removes the file.

Under DDP only global rank 0 writes the run or cache bookkeeping, so only rank 0 takes the lock
(on a filesystem shared by several nodes a per-node lock would refuse the run's own other nodes);
its answer is broadcast, so every rank stops together on a refusal and none waits on a
collective. ``flock`` works across the machines of an NFSv4 mount (Linux emulates it with
byte-range locks there); on a filesystem without working locks the lock cannot protect the folder.

The folder kinds are told apart by what each writes: a teacher cache holds ``manifest.json``
(version ``fastkd-cache/1``); a training run ``config.yaml``, ``metrics.jsonl`` or checkpoints
(``last.pt``). Each refuses the other's folder as its ``--output``.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
from pathlib import Path
from typing import Optional

logger = logging.getLogger("fastkd")

LOCK_NAME = ".fastkd.lock"
CACHE_MARKER = "manifest.json"
CACHE_VERSION_PREFIX = "fastkd-cache/"
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "last.pt", "best.pt")


class FolderBusyError(OSError):
    """Another live process holds the folder's lock; the message names its PID."""


def _read_pid(fd: int) -> Optional[int]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 64).decode("ascii", "replace").strip()
        return int(text.split()[0]) if text else None
    except (OSError, ValueError, IndexError):
        return None


def is_cache_folder(folder) -> bool:
    """Whether ``folder`` holds a fastkd teacher cache (its manifest names a cache version)."""
    path = Path(folder) / CACHE_MARKER
    if not path.is_file():
        return False
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and str(data.get("version", "")).startswith(CACHE_VERSION_PREFIX)


def run_folder_files(folder) -> list[str]:
    """The files of a training run found in ``folder`` (empty: not a run folder)."""
    folder = Path(folder)
    found = [name for name in RUN_MARKERS if (folder / name).exists()]
    return found + sorted(p.name for p in folder.glob("epoch_*.pt"))[:1]


class FolderLock:
    """An exclusive lock on ``folder`` (created if missing) held until :meth:`release` or process exit.

    ``what`` names the folder in messages (``"run folder"``, ``"cache folder"``).
    """

    def __init__(self, folder, what: str = "folder"):
        self.folder = Path(folder)
        self.what = what
        self.path = self.folder / LOCK_NAME
        self._fd: Optional[int] = None

    def acquire(self) -> "FolderLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read_pid(fd)
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise OSError(f"cannot lock the {self.what} {self.folder}: {exc.strerror}") from None
                who = f"PID {holder}" if holder is not None else "a process whose PID is not written yet"
                raise FolderBusyError(f"the {self.what} {self.folder} is in use by another fastkd "
                                                   f"process ({who}): wait for it to end, or choose another --output")
            # The file may have been removed by its previous holder between our open and flock:
            # then we locked an orphan; start again on the file that is there now.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        stale = _read_pid(fd)
        if stale is not None and stale != os.getpid():
            logger.warning("fastkd: %s %s: took over the lock left by PID %d, which ended without releasing "
                           "it (killed?)", self.what, self.folder, stale)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.unlink(self.path)  # while still holding it: a waiting opener then retries on a new file
        except OSError:
            pass
        os.close(fd)  # drops the flock

    def __del__(self):  # a holder dropped without release() (e.g. a Trainer only set up)
        try:
            self.release()
        except Exception:
            pass

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _check_run_output(folder: Path) -> None:
    if is_cache_folder(folder):
        raise ValueError(f"--output {folder} is a teacher cache (it holds {CACHE_MARKER}): a training run there would "
                         f"mix its files with the cache's; choose another --output (read the cache with "
                         f"--teacher-cache {folder})")


def _check_cache_output(folder: Path) -> None:
    found = run_folder_files(folder)
    if found and not (folder / CACHE_MARKER).exists():
        raise ValueError(f"--output {folder} is a training run's folder (it holds {', '.join(found)}): choose another "
                         f"--output for the cache")


_CHECKS = {"run": ("run folder", _check_run_output), "cache": ("cache folder", _check_cache_output)}


def lock_output(folder, kind: str, dist=None) -> Optional[FolderLock]:
    """Check that ``folder`` may be this ``kind`` ("run" or "cache") of output and lock it.

    Under DDP (``dist``: a :class:`fastkd.engine.distributed.DistInfo`) rank 0 checks and locks and
    broadcasts the outcome: every rank raises the same refusal; ranks other than 0 get None.
    """
    what, check = _CHECKS[kind]
    folder = Path(folder)
    main = dist is None or dist.is_main
    lock, error = None, None
    if main:
        try:
            check(folder)
            lock = FolderLock(folder, what).acquire()
        except (OSError, ValueError) as exc:
            error = exc
    if dist is not None and dist.distributed:
        from . import distributed as D

        error = D.broadcast_object(error, dist)
    if error is not None:
        if lock is not None:
            lock.release()
        raise error
    return lock


__all__ = ["FolderBusyError", "FolderLock", "LOCK_NAME", "is_cache_folder", "lock_output", "run_folder_files"]
