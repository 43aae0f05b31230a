"""What a data set holds and in which order each shard reads it; shared by every backend.

Both real backends (DALI and torch) take their sample order from :func:`shard_plan`, so for the
same ``seed``, ``epoch`` and shard they read the same files in the same order, and a checkpoint
taken with one can be resumed with the other.

Order and sharding (our choice, written down so it can be checked):

* Training: a full permutation of the data set, drawn from ``numpy.random.SeedSequence([seed,
  epoch])``, so it is fixed by seed and epoch and changes every epoch. Validation keeps the
  indexed order (classes sorted by name, files sorted by path).
* Shards are interleaved, as in ``torch.utils.data.DistributedSampler``: the order is padded by
  wrapping around to ``ceil(N / num_shards) * num_shards`` entries and shard ``k`` takes every
  ``num_shards``-th entry starting at ``k``. Every shard therefore has the same length (so DDP
  ranks run the same number of steps), every sample appears in exactly one shard, and the
  wrapped-around duplicates are flagged ``valid=False`` so metrics can leave them out.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._compat import log_once

logger = logging.getLogger("fastkd")

#: File name endings read from class folders (case-insensitive): what both PIL and DALI decode.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

#: Validation resizes the shorter side to ``floor(image_size / CROP_PCT)`` and centre-crops
#: ``image_size`` (224 -> 256 -> 224, the ImageNet convention; timm rounds down the same way).
CROP_PCT = 0.875

#: RandomResizedCrop's defaults (Szegedy et al.): crop area 8% to 100%, aspect ratio 3/4 to 4/3.
TRAIN_SCALE = (0.08, 1.0)
TRAIN_RATIO = (3.0 / 4.0, 4.0 / 3.0)


@dataclass(frozen=True)
class DatasetIndex:
    """Every sample of a data set: absolute file paths, int64 labels and the class names."""

    root: Path
    paths: tuple[str, ...]
    labels: np.ndarray  # (N,) int64, index into ``classes``
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def resolve_split_root(root, train: bool) -> Path:
    """``root`` itself, or ``root/train`` / ``root/val`` when ``root`` holds the split folders.

    The engine is given a data set root holding ``train/`` and ``val/`` (the ImageNet layout);
    a class-folder root is used as it is. The choice is logged, never made silently. A root
    holding ``train/`` is the split layout: its other folders (``plots/``, ...) are named in a
    warning and never read as classes, and a missing ``val/`` is an error.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data root {str(root)!r} does not exist")
    if root.is_dir():
        subdirs = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
        split = "train" if train else "val"
        if "train" in subdirs:
            others = sorted(subdirs - {"train", "val", "test"})
            if others:
                log_once(f"fastkd.data: {root} holds split folders (train/); its other folders are no classes and "
                         f"are not read: {', '.join(others)}", logging.WARNING)
            if split not in subdirs:
                raise FileNotFoundError(f"data root {str(root)!r} holds train/ but no {split}/ folder (the split "
                                        f"layout root/train/<class>/<image>, root/val/<class>/<image>)")
            log_once(f"fastkd.data: {root} holds split folders; reading {root / split}")
            return root / split
        if split in subdirs and subdirs <= {"train", "val", "test"}:
            log_once(f"fastkd.data: {root} holds split folders; reading {root / split}")
            return root / split
    return root


def index_image_folder(root: Path) -> DatasetIndex:
    """Index ``root/<class>/**/<image>`` (torchvision's ImageFolder layout, classes sorted by name).

    Raises a clear error for a missing root, a root without class folders, or an empty class
    folder. Nothing is dropped without a count in the log: files that are not images (by
    extension), hidden files and folders (names starting with ``.``), and images directly under
    the root (not in a class folder). Symbolic links are followed, but every real folder is read
    once in the whole index: a link to a folder read elsewhere (in this class or another, or a
    class folder), or to the data root or a folder above the one holding the link (a loop such as
    ``ln -s . loop`` or ``ln -s ../.. up``), is skipped with a warning naming it. Two class
    folders that are the same real folder are an error.
    """
    if not root.is_dir():
        raise NotADirectoryError(f"data root {str(root)!r} is not a directory (nor a file list)")
    classes, hidden, at_root, not_images = [], 0, 0, 0
    revisits: list[tuple[str, str]] = []  # (link, the real folder it leads back to)
    real_root = os.path.realpath(root)
    for e in os.scandir(root):
        if e.name.startswith("."):
            hidden += 1
        elif e.is_dir():
            real = os.path.realpath(e.path)
            if real == real_root or real_root.startswith(real.rstrip(os.sep) + os.sep):
                revisits.append((e.path, real))  # a link to the root or above it: a loop, no class
            else:
                classes.append(e.name)
        elif _is_image(e.name):
            at_root += 1
        else:
            not_images += 1
    classes.sort()
    if not classes:
        raise FileNotFoundError(
            f"data root {str(root)!r} has no class folders; expected root/<class>/<image> "
            "(ImageFolder layout) or a file list with 'path label' lines"
        )
    paths: list[str] = []
    labels: list[int] = []
    # Every real folder is read once in the whole index. The folders really inside the class
    # folders are read where they are: a link to one of them (from any class) is a second way in;
    # a link to the root, or to a folder above the one holding it, is a loop.
    class_reals: dict[str, str] = {}
    for name in classes:
        real = os.path.realpath(root / name)
        if real in class_reals:
            raise ValueError(f"class folders {class_reals[real]!r} and {name!r} under {str(root)!r} are the same "
                             f"folder ({real}): its images cannot have two labels")
        class_reals[real] = name
    inside = {os.path.realpath(p) for name in classes for p, _, _ in os.walk(root / name)}
    seen = {real_root, *class_reals}

    def above(real: str, path: str) -> bool:  # ``real`` is ``path`` or a folder above it
        return path == real or path.startswith(real.rstrip(os.sep) + os.sep)

    for label, name in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            keep = []
            here = os.path.realpath(dirpath)
            for d in dirnames:
                if d.startswith("."):
                    hidden += 1
                    continue
                link = os.path.join(dirpath, d)
                real = os.path.realpath(link)
                if (real in seen or (os.path.islink(link) and real in inside) or above(real, here)
                        or above(real, real_root)):
                    revisits.append((os.path.join(dirpath, d), real))
                    continue
                seen.add(real)
                keep.append(d)
            dirnames[:] = keep
            for f in filenames:
                if f.startswith("."):
                    hidden += 1
                elif _is_image(f):
                    found.append(os.path.join(dirpath, f))
                else:
                    not_images += 1
        if not found:
            raise FileNotFoundError(
                f"class folder {str(root / name)!r} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)})"
            )
        found.sort()
        paths += found
        labels += [label] * len(found)
    if not_images:
        logger.warning("fastkd.data: ignored %d files under %s that are not images (by extension)", not_images, root)
    if hidden:
        logger.warning("fastkd.data: ignored %d hidden files or folders under %s (names starting with '.')",
                       hidden, root)
    if at_root:
        logger.warning("fastkd.data: ignored %d images directly under %s: they are in no class folder "
                       "(expected root/<class>/<image>)", at_root, root)
    if revisits:
        shown = "; ".join(f"{link} -> {real}" for link, real in revisits[:3])
        more = f" and {len(revisits) - 3} more" if len(revisits) > 3 else ""
        logger.warning("fastkd.data: skipped %d symbolic links under %s to folders indexed elsewhere or above "
                       "them (each real folder is read once in the whole index; a link to the data root or a "
                       "folder above it is a loop): %s%s", len(revisits), root, shown, more)
    return DatasetIndex(root=root, paths=tuple(os.path.abspath(p) for p in paths),
                        labels=np.asarray(labels, dtype=np.int64), classes=tuple(classes))


def index_file_list(list_file: Path) -> DatasetIndex:
    """Index a text file of ``path label`` lines (paths relative to the list file's folder).

    Blank lines and lines starting with ``#`` are skipped. Labels are non-negative integers; the
    class names are their decimal strings, ``"0" .. str(max_label)``. A malformed line or a listed
    file that does not exist is an error naming it.
    """
    base = list_file.parent
    paths: list[str] = []
    labels: list[int] = []
    try:
        with open(list_file, encoding="utf-8") as fh:
            lines = fh.readlines()
    except UnicodeDecodeError:
        raise ValueError(f"data root {str(list_file)!r} is a file but not a text file list "
                         "('path label' lines)") from None
    for lineno, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        parts = text.rsplit(None, 1)  # the path may contain spaces; the label is the last field
        if len(parts) != 2:
            raise ValueError(f"{list_file}:{lineno}: expected 'path label', got {text!r}")
        try:
            label = int(parts[1])
        except ValueError:
            raise ValueError(f"{list_file}:{lineno}: label {parts[1]!r} is not an integer") from None
        if label < 0:
            raise ValueError(f"{list_file}:{lineno}: label {label} is negative")
        path = Path(parts[0]).expanduser()
        paths.append(str(path if path.is_absolute() else base / path))
        labels.append(label)
    if not paths:
        raise ValueError(f"file list {str(list_file)!r} names no files")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        shown = ", ".join(repr(p) for p in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise FileNotFoundError(f"file list {str(list_file)!r} names {len(missing)} missing files: {shown}{more}")
    num_classes = max(labels) + 1
    return DatasetIndex(root=list_file, paths=tuple(os.path.abspath(p) for p in paths),
                        labels=np.asarray(labels, dtype=np.int64),
                        classes=tuple(str(i) for i in range(num_classes)))


def build_index(root, *, train: bool) -> DatasetIndex:
    """Index an ImageFolder tree, a ``path label`` file list or a folder of tar shards
    (:mod:`fastkd.data.shards`); see :func:`resolve_split_root`."""
    root = resolve_split_root(root, train)
    if root.is_file():
        return index_file_list(root)
    from . import shards  # a folder of *.tar files: the WebDataset layout

    if shards.has_shards(root):
        return shards.index_shards(root)
    return index_image_folder(root)


@dataclass(frozen=True)
class ShardPlan:
    """One shard's reading order for one epoch.

    Entry ``k`` of the shard reads dataset sample ``indices[k]``; ``valid[k]`` is False for the
    wrap-around padding; ``keys[k]`` is the entry's position in the padded global order, unique
    per epoch, which keys per-sample augmentation randomness independently of sharding and workers.
    """

    epoch: int
    indices: np.ndarray  # (L,) int64 dataset indices
    valid: np.ndarray  # (L,) bool
    keys: np.ndarray  # (L,) int64 positions in the padded global order

    def __len__(self) -> int:
        return len(self.indices)


def shard_length(num_samples: int, num_shards: int) -> int:
    """Entries per shard (padding included): ``ceil(num_samples / num_shards)``."""
    return math.ceil(num_samples / num_shards)


def shard_plan(num_samples: int, *, shuffle: bool, seed: int, epoch: int, shard_id: int,
               num_shards: int) -> ShardPlan:
    """The entries shard ``shard_id`` reads in ``epoch`` (see the module docstring for the scheme)."""
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id must be in [0, num_shards={num_shards}), got {shard_id}")
    if num_samples < num_shards:
        raise ValueError(f"{num_samples} samples cannot fill {num_shards} shards (each needs at least one sample)")
    if shuffle:
        order = np.random.default_rng(np.random.SeedSequence([seed, epoch])).permutation(num_samples)
    else:
        order = np.arange(num_samples)
    total = shard_length(num_samples, num_shards) * num_shards
    padded = np.resize(order, total)  # np.resize repeats the array: wrap-around padding
    keys = np.arange(shard_id, total, num_shards, dtype=np.int64)
    return ShardPlan(epoch=epoch, indices=padded[keys].astype(np.int64), valid=keys < num_samples, keys=keys)


def derive_seed(*words: int) -> int:
    """A 31-bit seed mixed from integers (``SeedSequence``), for per-epoch / per-sample generators."""
    return int(np.random.SeedSequence([int(w) for w in words]).generate_state(1, np.uint32)[0] >> 1)


def val_resize_size(image_size: int) -> int:
    """Shorter-side size before the validation centre crop: ``floor(image_size / CROP_PCT)``."""
    return int(math.floor(image_size / CROP_PCT))


def shorter_side_size(height: int, width: int, shorter: int) -> tuple[int, int]:
    """(h, w) after resizing the shorter side to ``shorter``, the longer side rounded half up.

    This is the rounding DALI's ``fn.resize(resize_shorter=...)`` applies (torchvision truncates
    instead); the torch backend uses it too so both backends resample to the same grid.
    """
    if height <= width:
        return shorter, int(math.floor(width * shorter / height + 0.5))
    return int(math.floor(height * shorter / width + 0.5)), shorter


def center_crop_offset(length: int, crop: int) -> int:
    """Start of a centred crop, half rounded up (DALI's ``crop_pos=0.5``; torchvision rounds to even)."""
    return int(math.floor((length - crop) / 2 + 0.5))
