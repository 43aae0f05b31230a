"""Data sets in tar shards (the WebDataset layout): indexing, reading one sample, writing shards.

Layout: a split folder (``DIR/train``, ``DIR/val``) holds ``*.tar`` files (uncompressed), read in
name order. Each sample is a group of members with the same *key* (the member name up to the
first dot of its last path component, the WebDataset convention): one image (``KEY.jpg``,
``KEY.jpeg``, ``KEY.png``, or another extension both decoders read) and ``KEY.cls``, the class
index as ASCII text (``"417"``). Other members (``KEY.json``, ``KEY.txt``, ...) are ignored and
counted in the log. The samples' order is the shards' name order, then the order inside each
shard; that is the data set index that fastkd's (seed, epoch, sample) keying, rank sharding,
resume and teacher cache use, exactly as the sorted file order of an image folder.

Class names: shards carry class indices only. An optional ``classes.txt`` (one name per line,
line ``i`` naming class ``i``) beside the shards, or in the folder above them (the one holding
``train/`` and ``val/``), names the classes and fixes their count; without it the classes are
``"0" .. str(max index)`` (as for a ``path label`` file list).

Random access: fastkd reads samples in an order drawn per epoch (and resumes mid-epoch), so it
needs sample ``i`` by number, not a stream. The index records each sample's shard, byte offset
and size inside it, found once by listing the shard with Python's ``tarfile`` (headers only, no
image is decoded); reading a sample is then one seek and one read. (The ``webdataset`` library's
``WebDataset`` is a sequential ``IterableDataset``: its order is the shards' order with buffered
shuffling, so it cannot follow the per-epoch order nor resume at a sample. DALI's
``fn.readers.webdataset`` is sequential the same way, so the DALI backend is handed the bytes of
the planned samples and runs its usual decoding graph on them.)

:func:`write_shards` writes shards from an image folder (or a ``path label`` file list).
"""
from __future__ import annotations

import io
import logging
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .index import IMAGE_EXTENSIONS, DatasetIndex

logger = logging.getLogger("fastkd")

#: The name of the optional class-name file (one name per line, line i naming class i).
CLASSES_FILE = "classes.txt"

#: Member extensions read as the sample's image (lower case, no dot).
SHARD_IMAGE_EXTENSIONS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)


@dataclass(frozen=True)
class ShardIndex(DatasetIndex):
    """A :class:`DatasetIndex` over tar shards.

    ``paths[i]`` names sample ``i`` as ``SHARD.tar:MEMBER`` (in messages, the skip list and the
    teacher cache's index hash); ``tars`` are the shard files and ``members[i]`` is
    ``(shard number, byte offset of the image data, size in bytes)``.
    """

    tars: tuple[str, ...]
    members: np.ndarray  # (N, 3) int64

    def read(self, i: int) -> bytes:
        """The encoded image bytes of sample ``i``."""
        tar, offset, size = (int(v) for v in self.members[i])
        with open(self.tars[tar], "rb") as fh:
            fh.seek(offset)
            data = fh.read(size)
        if len(data) != size:
            raise OSError(f"{self.paths[i]}: the shard ends before the member's {size} bytes (truncated shard?)")
        return data

    def open(self, i: int) -> io.BytesIO:
        """Sample ``i``'s image as a file object (what PIL opens)."""
        return io.BytesIO(self.read(i))


def has_shards(root: Path) -> bool:
    """True when the folder ``root`` holds ``*.tar`` files directly."""
    return root.is_dir() and any(e.is_file() and e.name.lower().endswith(".tar") and not e.name.startswith(".")
                                 for e in os.scandir(root))


def _split_member(name: str) -> tuple[str, str]:
    """WebDataset's (key, extension): the extension starts at the first dot of the last component."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{folder}/{stem}" if folder else stem
    return key, ext.lower() if dot else ""


def _read_classes(root: Path) -> Optional[tuple[str, ...]]:
    for folder in (root, root.parent):
        path = folder / CLASSES_FILE
        if path.is_file():
            names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
            while names and not names[-1]:
                names.pop()
            if not names or any(not n for n in names):
                raise ValueError(f"{path}: expected one class name per line (line i naming class i), "
                                 "with no blank lines")
            if len(set(names)) != len(names):
                dup = sorted({n for n in names if names.count(n) > 1})[:3]
                raise ValueError(f"{path}: class names must be distinct, repeated: {', '.join(dup)}")
            return tuple(names)
    return None


def _scan_tar(tar_path: str) -> tuple[list, int]:
    """The samples of one shard, ``[(image member name, data offset, size, label)]``, and the
    count of ignored members (read from the tar headers and the ``.cls`` members)."""
    ignored = 0
    samples: dict[str, dict] = {}  # key -> {"image": (member, offset, size), "cls": label}
    try:
        tf = tarfile.open(tar_path, "r:")
    except (tarfile.TarError, OSError) as exc:
        raise ValueError(f"shard {tar_path!r} is not a readable uncompressed tar file: {exc}") from None
    with tf:
        try:
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = _split_member(m.name)
                if key.rpartition("/")[2].startswith(".") or not key:
                    ignored += 1
                    continue
                sample = samples.setdefault(key, {})
                if ext in SHARD_IMAGE_EXTENSIONS:
                    if "image" in sample:
                        raise ValueError(f"shard {tar_path!r}: sample {key!r} has two images "
                                         f"({sample['image'][0]!r} and {m.name!r})")
                    sample["image"] = (m.name, m.offset_data, m.size)
                elif ext == "cls":
                    text = tf.extractfile(m).read().decode("ascii", "replace").strip()
                    try:
                        label = int(text)
                    except ValueError:
                        raise ValueError(f"shard {tar_path!r}: sample {key!r} has class index {text[:20]!r} in "
                                         f"{m.name!r}, not an integer") from None
                    if label < 0:
                        raise ValueError(f"shard {tar_path!r}: sample {key!r} has a negative class index {label}")
                    sample["cls"] = label
                else:
                    ignored += 1
        except tarfile.TarError as exc:
            raise ValueError(f"shard {tar_path!r} is damaged: {exc}") from None
    found = []
    for key, sample in samples.items():
        if "image" not in sample:
            if "cls" in sample:
                raise ValueError(f"shard {tar_path!r}: sample {key!r} has no image "
                                 f"(expected {key}.jpg, .jpeg or .png beside {key}.cls)")
            continue  # only ignored components (counted above)
        if "cls" not in sample:
            raise ValueError(f"shard {tar_path!r}: sample {key!r} has no class index ({key}.cls is missing)")
        found.append([*sample["image"], sample["cls"]])
    return found, ignored


#: Hidden folder beside the shards holding each shard's index (``SHARD.tar.json``), so a shard is
#: listed once, not at every start (Python's tarfile lists a few thousand samples a second).
INDEX_CACHE = ".fastkd-index"
_INDEX_VERSION = 1


def _shard_samples(tar_path: str) -> tuple[list, int]:
    """:func:`_scan_tar`, through the cache beside the shard (rebuilt when the shard's size, inode or
    modification time changes; written atomically; a read-only folder is indexed every time)."""
    import json

    st = os.stat(tar_path)
    stamp = {"version": _INDEX_VERSION, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
    cache = os.path.join(os.path.dirname(tar_path), INDEX_CACHE, os.path.basename(tar_path) + ".json")
    try:
        with open(cache, encoding="utf-8") as fh:
            stored = json.load(fh)
        if all(stored.get(k) == v for k, v in stamp.items()):
            return stored["samples"], int(stored["ignored"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # no cache yet, or an unreadable one: list the shard
    found, ignored = _scan_tar(tar_path)
    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        tmp = f"{cache}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump({**stamp, "ignored": ignored, "samples": found}, fh)
        os.replace(tmp, cache)
    except OSError as exc:
        from .._compat import log_once

        log_once(f"fastkd.data: cannot keep the shard index beside {os.path.dirname(tar_path)} ({exc}); "
                 "the shards are listed again at every start", logging.WARNING)
    return found, ignored


def index_shards(root) -> ShardIndex:
    """Index the ``*.tar`` shards directly in ``root`` (see the module docstring)."""
    root = Path(root)
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    tars = [os.path.abspath(e.path) for e in entries
            if e.is_file() and e.name.lower().endswith(".tar") and not e.name.startswith(".")]
    if not tars:
        raise FileNotFoundError(f"data root {str(root)!r} holds no .tar shards")
    folders = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    if folders:
        raise ValueError(f"data root {str(root)!r} holds both .tar shards and folders ({', '.join(folders[:3])}); "
                         "a split is either shards or class folders")
    others = [e.name for e in entries if e.is_file() and not e.name.startswith(".")
              and not e.name.lower().endswith(".tar") and e.name != CLASSES_FILE]
    if others:
        logger.warning("fastkd.data: ignored %d files under %s that are not .tar shards (e.g. %s)", len(others),
                       root, others[0])
    rows: list = []
    paths: list = []
    labels: list = []
    ignored = 0
    for number, tar in enumerate(tars):
        found, skipped = _shard_samples(tar)
        if not found:
            raise ValueError(f"shard {tar!r} holds no samples (expected KEY.jpg / KEY.png with KEY.cls)")
        ignored += skipped
        for name, offset, size, label in found:
            rows.append((number, offset, size))
            paths.append(f"{tar}:{name}")
            labels.append(label)
    if ignored:
        logger.warning("fastkd.data: ignored %d tar members under %s that are neither a sample's image nor "
                       "its .cls", ignored, root)
    classes = _read_classes(root)
    top = max(labels)
    if classes is None:
        classes = tuple(str(i) for i in range(top + 1))
    elif top >= len(classes):
        where = paths[labels.index(top)]
        raise ValueError(f"{where.rsplit(':', 1)[0]}: sample {_split_member(where.rsplit(':', 1)[1])[0]!r} has "
                         f"class index {top}, but {CLASSES_FILE} names {len(classes)} classes")
    return ShardIndex(root=root, paths=tuple(paths), labels=np.asarray(labels, dtype=np.int64), classes=classes,
                      tars=tuple(tars), members=np.asarray(rows, dtype=np.int64).reshape(-1, 3))


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0  # reproducible shards: the same folder writes the same bytes
    tf.addfile(info, io.BytesIO(data))


def write_shards(folder, out, *, samples_per_shard: int = 1000, prefix: str = "shard") -> list[Path]:
    """Write an image folder as tar shards that fastkd (and DALI / webdataset) read.

    ``folder``: an ImageFolder tree (``folder/<class>/<image>``) or a ``path label`` file list,
    written to ``out/PREFIX-000000.tar``, ... with ``samples_per_shard`` samples each, in the
    folder's index order (so the shards are the same data set, sample for sample), plus
    ``out/classes.txt``. A folder holding ``train/`` and ``val/`` writes both, to ``out/train``
    and ``out/val``. Sample ``i`` is stored as ``{i:08d}.EXT`` (the file's own bytes; ``.JPEG``
    becomes ``.jpeg``) and ``{i:08d}.cls``. Returns the shard paths.
    """
    from .index import build_index, resolve_split_root

    if isinstance(samples_per_shard, bool) or not isinstance(samples_per_shard, int) or samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be a positive integer, got {samples_per_shard!r}")
    folder, out = Path(folder), Path(out)
    if folder.is_dir() and resolve_split_root(folder, True) != folder:
        written = []
        for split in ("train", "val"):
            if (folder / split).is_dir():
                written += write_shards(folder / split, out / split, samples_per_shard=samples_per_shard,
                                        prefix=prefix)
        return written
    index = build_index(folder, train=True)
    if isinstance(index, ShardIndex):
        raise ValueError(f"{str(folder)!r} already holds tar shards")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for start in range(0, len(index), samples_per_shard):
        path = out / f"{prefix}-{start // samples_per_shard:06d}.tar"
        tmp = path.with_name(path.name + ".partial")
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
            for i in range(start, min(start + samples_per_shard, len(index))):
                src = index.paths[i]
                ext = os.path.splitext(src)[1].lower().lstrip(".")
                with open(src, "rb") as fh:
                    _add(tf, f"{i:08d}.{ext}", fh.read())
                _add(tf, f"{i:08d}.cls", str(int(index.labels[i])).encode("ascii"))
        os.replace(tmp, path)
        written.append(path)
    (out / CLASSES_FILE).write_text("".join(f"{c}\n" for c in index.classes), encoding="utf-8")
    return written
