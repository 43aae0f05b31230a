"""On-disk layout of a teacher-output cache: a JSON manifest and one ``.npy`` file per epoch.

::

    CACHE/manifest.json        what was cached (teacher, data, views, seed, format) and which epochs are done
    CACHE/epoch_0000.npy       epoch 0: one row per dataset sample index (NumPy format, memory-mapped)
    CACHE/epoch_0001.npy       ...

Row formats (``N`` samples, ``C`` classes):

* ``full``: an ``(N, C)`` array of the teacher's logits in ``float32``, ``float16`` or ``bfloat16``
  (NumPy has no bfloat16: its raw 16 bits are stored as ``uint16`` and reinterpreted on load).
* ``topk``: an ``(N,)`` structured array with fields ``values (K,)``, ``indices (K,)`` (int16 when
  ``C <= 32767``, else int32), ``label`` (the label's logit) and ``fill`` (docs/methods.md §10), the
  floats in the chosen dtype.

Integrity: the manifest records each epoch file's SHA-256 (``epoch_sha256``, computed when the
epoch is committed) and every training image's size, modification time and SHA-256 in a side
file ``data_files.npy`` (its own SHA-256 in the manifest). A training run refuses a cache when an
image's size or modification time changed since the build (its cached logits are stale), checks
each top-K epoch's class indices when it opens the epoch, and verifies each epoch's checksum in a
background thread before any checkpoint of that epoch is written; ``fastkd cache verify`` re-hashes
the images and the epoch files.

Crash safety: an epoch is written to ``.epoch_NNNN.npy.tmp``, flushed and fsync'ed, renamed to its
final name, and only then listed in the manifest's ``epochs_done`` (the manifest itself is replaced
atomically). A reader uses only the epochs listed there, so a killed build never hands out a half
written epoch; the next build rewrites every epoch that is not listed.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

FORMAT = "fastkd-cache/1"
MANIFEST = "manifest.json"
FORMATS = ("full", "topk")
DTYPES = ("fp32", "bf16", "fp16")
_NP_STORAGE = {"fp32": np.dtype("<f4"), "fp16": np.dtype("<f2"), "bf16": np.dtype("<u2")}
REQUIRED = ("format", "dtype", "data", "epochs_done")
_TORCH = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class CacheMismatchError(ValueError):
    """A cache that does not fit the run asking for it; the message names the field."""


# --------------------------------------------------------------------------------------------
# File names and atomic writes
# --------------------------------------------------------------------------------------------
def epoch_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}.npy"


def temp_name(epoch: int) -> str:
    return f".{epoch_name(epoch)}.tmp"


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: dict) -> None:
    """Temp file in the same folder, fsync, rename over ``path``, fsync the folder."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a full disk: no temporary file left behind
    fsync_path(path.parent)


def read_manifest(root) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{str(root)!r} is not a teacher cache: it has no {MANIFEST} "
                                "(build one with 'fastkd cache build')")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("version") != FORMAT:
        version = data.get("version") if isinstance(data, dict) else None
        raise ValueError(f"{path}: cache version {version!r}, this fastkd reads {FORMAT!r}")
    missing = [k for k in REQUIRED if k not in data]
    if not isinstance(data.get("data"), dict) or any(k not in data["data"] for k in ("num_classes", "num_samples")):
        missing.append("data.num_classes/num_samples")
    if missing:
        raise ValueError(f"{path}: not a complete cache manifest (missing {', '.join(missing)})")
    ints = lambda v: isinstance(v, list) and all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in v)
    types = {"epochs_done": ints(data["epochs_done"]),
             "epochs": isinstance(data.get("epochs", 0), int),
             "top_k": data.get("top_k") is None or (isinstance(data["top_k"], int) and data["top_k"] >= 1),
             "data.num_classes/num_samples": all(isinstance(data["data"][k], int) for k in ("num_classes", "num_samples")),
             "build": isinstance(data.get("build", {}), dict)}
    bad = [k for k, ok in types.items() if not ok]
    if bad:
        raise ValueError(f"{path}: malformed cache manifest (edited by hand?): bad {', '.join(bad)}")
    return data


def file_sha256(path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def index_sha256(index) -> str:
    """Hash of a :class:`fastkd.data.DatasetIndex`: class names, then every (relative path, label).

    Paths are taken relative to the data root (the folder of a file list), so a data set moved
    to another folder keeps its hash; renaming, adding, removing or relabelling a file changes it.
    """
    root = Path(index.root)
    base = root.parent if root.is_file() else root
    h = hashlib.sha256()
    h.update(json.dumps(list(index.classes)).encode())
    for path, label in zip(index.paths, index.labels.tolist()):
        h.update(os.path.relpath(path, base).replace(os.sep, "/").encode())
        h.update(b"\0")
        h.update(str(int(label)).encode())
        h.update(b"\n")
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Integrity: epoch checksums and the data files' sizes, times and contents
# --------------------------------------------------------------------------------------------
DATA_FILES = "data_files.npy"
FILE_RECORD = np.dtype([("size", "<i8"), ("mtime_ns", "<i8"), ("sha256", "u1", (32,))])


def epoch_sha256(path) -> str:
    """SHA-256 of an epoch file's bytes (header included), as stored in ``epoch_sha256``."""
    return file_sha256(path)


def _thread_count(n: int) -> int:
    return max(1, min(8, os.cpu_count() or 1, n))


def sample_files(data) -> tuple[list, Optional[Callable]]:
    """What to stat for each sample of ``data`` (a data index, or a list of file paths), and how to
    read a sample's bytes when they are not the whole file: in tar shards a sample's size and time
    are its shard file's (any change to the shard shows), and its SHA-256 is that of its member's
    bytes (``index.read(i)``). Image folders and file lists: the file itself (``None``)."""
    tars = getattr(data, "tars", None)
    if tars is not None:
        return [tars[int(m[0])] for m in data.members], data.read
    return list(getattr(data, "paths", data)), None


def data_file_records(data, *, contents: bool = True) -> np.ndarray:
    """Size, modification time (ns) and (``contents``) SHA-256 of every sample's file, in index
    order (``data``: a data index or a list of paths; see :func:`sample_files`)."""
    from concurrent.futures import ThreadPoolExecutor

    paths, read = sample_files(data)
    out = np.zeros(len(paths), dtype=FILE_RECORD)

    def one(i):
        st = os.stat(paths[i])
        out["size"][i], out["mtime_ns"][i] = st.st_size, st.st_mtime_ns
        if contents:
            digest = hashlib.sha256(read(i)).hexdigest() if read is not None else file_sha256(paths[i])
            out["sha256"][i] = np.frombuffer(bytes.fromhex(digest), dtype=np.uint8)

    with ThreadPoolExecutor(_thread_count(len(paths))) as pool:  # hashlib releases the GIL on big reads
        list(pool.map(one, range(len(paths)), chunksize=256))
    return out


def write_data_files(root, records: np.ndarray) -> str:
    """Write ``records`` atomically as ``root/data_files.npy``; returns the file's SHA-256."""
    path = Path(root) / DATA_FILES
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            np.save(fh, records, allow_pickle=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return file_sha256(path)


def read_data_files(root, manifest: dict) -> Optional[np.ndarray]:
    """The build's records of the data files, or None for a cache built before they were kept."""
    want = manifest.get("data_files_sha256")
    if want is None:
        return None
    path = Path(root) / DATA_FILES
    if not path.is_file() or file_sha256(path) != want:
        raise ValueError(f"{path}: missing or damaged (its checksum differs from the manifest's); rebuild the "
                         "cache with 'fastkd cache build'")
    records = np.load(path, allow_pickle=False)
    if records.dtype != FILE_RECORD or records.shape != (int(manifest["data"]["num_samples"]),):
        raise ValueError(f"{path}: holds {records.dtype} {records.shape}, not one record per sample")
    return records


def changed_files(records: np.ndarray, data) -> list[int]:
    """Indices of the samples whose file's size or modification time differ from ``records`` (or
    whose file is gone); ``data`` as in :func:`data_file_records`."""
    paths, _ = sample_files(data)
    now = np.zeros(len(paths), dtype=[("size", "<i8"), ("mtime_ns", "<i8")])
    missing = np.zeros(len(paths), dtype=bool)
    from concurrent.futures import ThreadPoolExecutor

    def one(i):
        try:
            st = os.stat(paths[i])
        except OSError:
            missing[i] = True
            return
        now["size"][i], now["mtime_ns"][i] = st.st_size, st.st_mtime_ns

    with ThreadPoolExecutor(_thread_count(len(paths))) as pool:
        list(pool.map(one, range(len(paths)), chunksize=1024))
    bad = missing | (now["size"] != records["size"]) | (now["mtime_ns"] != records["mtime_ns"])
    return np.flatnonzero(bad).tolist()


def check_topk_rows(arr: np.ndarray, num_classes: int, path) -> None:
    """Refuse a top-K epoch whose class indices fall outside ``[0, num_classes)`` (damage)."""
    if arr.dtype.names is None or "indices" not in arr.dtype.names or not len(arr):
        return
    idx = arr["indices"]
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= num_classes:
        row = int(np.flatnonzero(((idx < 0) | (idx >= num_classes)).any(axis=1))[0])
        bad = idx[row][(idx[row] < 0) | (idx[row] >= num_classes)][0]
        raise ValueError(f"{path}: row {row} holds class index {int(bad)}, outside [0, {num_classes}): the file is "
                         "damaged; rebuild it with 'fastkd cache build'")


# --------------------------------------------------------------------------------------------
# Row formats
# --------------------------------------------------------------------------------------------
def index_dtype(num_classes: int) -> np.dtype:
    return np.dtype("<i2") if num_classes <= np.iinfo(np.int16).max else np.dtype("<i4")


def row_layout(fmt: str, dtype: str, num_classes: int, top_k: Optional[int]) -> tuple[tuple, np.dtype]:
    """(shape per epoch without N, numpy dtype) of an epoch file."""
    if fmt not in FORMATS:
        raise ValueError(f"cache format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if dtype not in DTYPES:
        raise ValueError(f"cache dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    scalar = _NP_STORAGE[dtype]
    if fmt == "full":
        return (num_classes,), scalar
    return (), np.dtype([("values", scalar, (top_k,)), ("indices", index_dtype(num_classes), (top_k,)),
                         ("label", scalar), ("fill", scalar)])


def bytes_per_row(fmt: str, dtype: str, num_classes: int, top_k: Optional[int]) -> int:
    shape, dt = row_layout(fmt, dtype, num_classes, top_k)
    return int(dt.itemsize * int(np.prod(shape, dtype=np.int64)))


def to_storage(t: torch.Tensor, dtype: str) -> np.ndarray:
    """A CPU float tensor rounded to ``dtype`` (round to nearest even), as the stored numpy bits."""
    t = t.to(_TORCH[dtype]).contiguous()
    if dtype == "bf16":
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def from_storage(a: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored numpy bits -> a torch tensor of ``dtype`` (no copy beyond making ``a`` contiguous)."""
    a = np.ascontiguousarray(a)
    if dtype == "bf16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
class CacheReader:
    """Read-only access to a cache: ``rows(epoch, indices)`` gathers the rows of dataset indices."""

    def __init__(self, root):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        m = self.manifest
        self.format, self.dtype, self.top_k = m["format"], m["dtype"], m.get("top_k")
        self.num_classes = int(m["data"]["num_classes"])
        self.num_samples = int(m["data"]["num_samples"])
        self.epochs_done = sorted(int(e) for e in m.get("epochs_done", []))
        self._open: dict[int, np.ndarray] = {}

    def epoch(self, epoch: int) -> np.ndarray:
        """The memory-mapped array of a finished epoch."""
        if epoch not in self._open:
            if epoch not in self.epochs_done:
                raise CacheMismatchError(f"teacher cache {self.root}: epoch {epoch} is not cached (done: "
                                         f"{_ranges(self.epochs_done)})")
            path = self.root / epoch_name(epoch)
            try:
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as exc:  # missing, truncated, not a .npy file
                raise ValueError(f"{path}: not a readable epoch file of this cache ({exc}); rebuild it with "
                                 "'fastkd cache build'") from None
            shape, dt = row_layout(self.format, self.dtype, self.num_classes, self.top_k)
            if arr.dtype != dt or arr.shape != (self.num_samples, *shape):
                raise ValueError(f"{path}: holds {arr.dtype} {arr.shape}, the manifest describes {dt} "
                                 f"{(self.num_samples, *shape)}")
            self._open = {epoch: arr}  # keep one epoch mapped at a time
        return self._open[epoch]

    def rows(self, epoch: int, indices: np.ndarray) -> dict:
        """``{"logits"}`` (full) or ``{"values", "indices", "label", "fill"}`` (topk) CPU tensors."""
        rows = self.epoch(epoch)[np.asarray(indices, dtype=np.int64)]  # a gather: one copy
        if self.format == "full":
            return {"logits": from_storage(rows, self.dtype)}
        return {"values": from_storage(rows["values"], self.dtype),
                "indices": torch.from_numpy(np.ascontiguousarray(rows["indices"]).astype(np.int64)),
                "label": from_storage(rows["label"], self.dtype),
                "fill": from_storage(rows["fill"], self.dtype)}


def _ranges(values) -> str:
    values = sorted(values)
    if not values:
        return "none"
    out, start, prev = [], values[0], values[0]
    for v in values[1:] + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ", ".join(out)
