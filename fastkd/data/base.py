"""The types every data backend shares: :class:`Batch`, :class:`View`, :class:`LoaderSpec`,
:class:`Normalizer`, :class:`BaseLoader` (epochs, shards, resume, corrupt files) and the errors.

Backends import this module, :mod:`~fastkd.data.decode` and :mod:`~fastkd.data.index`; they never
import the factory (:mod:`~fastkd.data.loader`), which imports them lazily.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from .index import DatasetIndex, ShardPlan, shard_length, shard_plan

logger = logging.getLogger("fastkd")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: The 0..255 value of every pixel of a row that stands in for a skipped corrupt file (flagged
#: ``valid=False``), so a batch keeps its size and every shard its number of batches.
PLACEHOLDER_GREY = 128

#: Training augmentations (``create_loader(augment=...)``):
#: ``"imagenet"``: RandomResizedCrop (area 0.08-1, aspect 3/4-4/3) + flip; validation resizes the
#: shorter side to ``image_size / 0.875`` and centre-crops. ``"cifar"`` (CRD / mdistiller's CIFAR
#: setting): the image at ``image_size`` (as it is when it already has that size; else shorter
#: side resized to it and centre-cropped), zero-padded by 4 pixels, a random ``image_size`` crop
#: + flip; validation uses the image at ``image_size`` with no other resize.
AUGMENTATIONS = ("imagenet", "cifar")

#: The largest square input side (pixels) a loader accepts: one 4096 x 4096 fp32 RGB image is
#: already 200 MB, and larger sizes end in an out-of-memory abort (std::bad_alloc in DALI) rather
#: than an error. Classification models train at 32 to about 800 pixels.
MAX_IMAGE_SIZE = 4096


def check_image_size(name: str, value: int, flag: str) -> None:
    """Refuse an input side above :data:`MAX_IMAGE_SIZE` (ValueError naming ``name`` and ``flag``)."""
    if value > MAX_IMAGE_SIZE:
        gib = 3 * 4 * value * value / 2**30
        raise ValueError(f"{name}={value} ({flag}) is above the largest supported size, {MAX_IMAGE_SIZE} pixels "
                         f"(one {value} x {value} fp32 RGB image alone would take {gib:,.1f} GiB)")


# What a state_dict must match to be resumed by a loader: anything else would read other samples.
_FINGERPRINT_FIELDS = ("train", "num_samples_total", "num_shards", "shard_id", "seed", "batch_size")


class CorruptImageError(OSError):
    """An image file that cannot be read or decoded; the message names the file."""


@dataclass
class Batch:
    """One batch, already on the loader's device.

    images: (N, 3, H, W) normalised student view (channels_last memory format when asked for).
    labels: (N,) int64.
    teacher_images: (N, 3, Ht, Wt) teacher view cut from the same crop window and flip, or None
        when no teacher view was asked for (the same tensor as ``images`` when the teacher asked
        for exactly the student's size and normalisation).
    valid: (N,) bool, False for wrap-around padding of a shard and for rows standing in for
        corrupt files skipped with ``skip_corrupt`` (a uniform grey image, ``PLACEHOLDER_GREY``);
        None when the batch holds none.
    indices: (N,) int64 dataset index of every sample (on the CPU); None for synthetic data.
    """

    images: torch.Tensor
    labels: torch.Tensor
    teacher_images: Optional[torch.Tensor] = None
    valid: Optional[torch.Tensor] = None
    indices: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.labels.shape[0]


@dataclass(frozen=True)
class View:
    """One model input: square side in pixels and normalisation in [0, 1] pixel units."""

    size: int
    mean: tuple
    std: tuple


@dataclass(frozen=True)
class LoaderSpec:
    """Validated settings shared by all backends (see :func:`create_loader`)."""

    train: bool
    batch_size: int
    student: View
    teacher: Optional[View]  # None: no teacher view
    shard_id: int
    num_shards: int
    seed: int
    num_threads: int
    device: torch.device
    dtype: torch.dtype
    channels_last: bool
    skip_corrupt: bool
    augment: str = "imagenet"  # one of AUGMENTATIONS

    @property
    def teacher_is_student(self) -> bool:
        return self.teacher == self.student


class Normalizer:
    """uint8 images -> normalised ``dtype`` tensors on the target device (one fused pass)."""

    def __init__(self, view: View, spec: LoaderSpec):
        self.device, self.dtype, self.channels_last = spec.device, spec.dtype, spec.channels_last
        self.mean = torch.tensor([255.0 * m for m in view.mean], device=spec.device).view(1, 3, 1, 1)
        self.std = torch.tensor([255.0 * s for s in view.std], device=spec.device).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor, layout: str) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True)
        if layout == "NHWC":
            x = x.permute(0, 3, 1, 2)  # a channels_last-strided NCHW view, no copy
        # Normalise in fp32 whatever the output dtype, as DALI's crop_mirror_normalize does.
        x = x.to(torch.float32).sub_(self.mean).div_(self.std).to(self.dtype)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=fmt)

    def sample(self, hwc: torch.Tensor) -> torch.Tensor:
        """One (H, W, 3) image of 0..255 values (uint8 or float32) -> normalised (3, H, W): the
        arithmetic of ``__call__`` sample by sample, which stays in cache on a CPU target;
        stored HWC for channels_last, else CHW. The input is left as it was."""
        x = hwc.permute(2, 0, 1)
        fmt = torch.preserve_format if self.channels_last else torch.contiguous_format
        x = x.to(torch.float32, memory_format=fmt, copy=True).sub_(self.mean[0]).div_(self.std[0])
        return x.to(self.dtype)

    @staticmethod
    def stack(samples: list, channels_last: bool) -> torch.Tensor:
        """Stack :meth:`sample` outputs into an (N, 3, H, W) batch (one copy)."""
        if channels_last:  # stack the HWC storage, then view it as NCHW: channels_last strides
            return torch.stack([s.permute(1, 2, 0) for s in samples]).permute(0, 3, 1, 2)
        return torch.stack(samples)


class BaseLoader:
    """Epochs, shards and resume; subclasses implement :meth:`_run`.

    Epochs: iterating runs the current epoch; a completed pass moves on to the next epoch by
    itself, and :meth:`set_epoch` chooses one explicitly (the usual ``DistributedSampler``
    habit). A pass abandoned half-way is restarted from its first batch by the next ``iter``.

    Resume: :meth:`state_dict` records the epoch, the batches already yielded and the entry of
    the shard plan where reading continues; :meth:`load_state_dict` makes the next pass start
    there, so a resumed run reads exactly the remaining samples.
    """

    backend = "base"
    #: What decodes the images (``"PIL"``, ``"libjpeg-turbo"``, ``"nvJPEG"``...). Decoders and
    #: resize implementations differ slightly, so accuracies measured through different loaders
    #: may differ in the last few tenths of a percent: every reported accuracy names both.
    decoder = "none"

    @property
    def description(self) -> str:
        """``"BACKEND loader, DECODER"``, printed beside accuracies (e.g. ``"dali loader, libjpeg-turbo"``)."""
        return f"{self.backend} loader, {self.decoder}"

    def __init__(self, index: Optional[DatasetIndex], spec: LoaderSpec, *, num_samples_total: int,
                 classes: Sequence[str]):
        self.index = index
        self.spec = spec
        self._num_total = num_samples_total
        self._classes = list(classes)
        self._shard_len = shard_length(num_samples_total, spec.num_shards)
        # Positions shard_id, shard_id + num_shards, ... of the padded order; those < N are real.
        self._num_valid = len(range(spec.shard_id, min(num_samples_total, self._shard_len * spec.num_shards),
                                    spec.num_shards))
        self._epoch = 0
        self._resume: Optional[dict] = None  # pending start point set by load_state_dict
        self._live: Optional[dict] = None  # progress of the pass being iterated
        self._skipped: dict[int, str] = {}  # dataset index -> why it was skipped
        self._epoch_skipped: set[int] = set()  # files stood in for in the pass being read (or the last)
        # The distinct model inputs a decoding backend produces: the student view, then the
        # teacher's unless it is the same. One resize per distinct size (a teacher may share the
        # student's pixels and differ only in normalisation): view i is resized to
        # ``sizes[view_of[i]]``.
        self._views = [spec.student]
        if spec.teacher is not None and not spec.teacher_is_student:
            self._views.append(spec.teacher)
        self._sizes = tuple(dict.fromkeys(v.size for v in self._views))
        self._view_of = [self._sizes.index(v.size) for v in self._views]

    # ---- the public surface ------------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        """Class names in label order."""
        return list(self._classes)

    @property
    def num_samples(self) -> int:
        """Samples in this shard, padding excluded."""
        return self._num_valid

    @property
    def batch_size(self) -> int:
        return self.spec.batch_size

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def skipped(self) -> int:
        """Number of distinct corrupt files skipped so far (``skip_corrupt=True``)."""
        return len(self._skipped)

    @property
    def skipped_files(self) -> list[str]:
        """Paths of the distinct corrupt files skipped so far, in every epoch."""
        return [self.index.paths[i] for i in self._skipped] if self.index is not None else []

    @property
    def skipped_in_epoch(self) -> int:
        """Distinct corrupt files skipped in the epoch being read, or in the last one read (a file
        known to be corrupt is skipped again, and counted, in every epoch that reads it)."""
        return len(self._epoch_skipped)

    @property
    def skipped_files_in_epoch(self) -> list[str]:
        """Paths of the files counted by :attr:`skipped_in_epoch`."""
        return [self.index.paths[i] for i in sorted(self._epoch_skipped)] if self.index is not None else []

    def __len__(self) -> int:
        """Batches per epoch of this shard (the last one may be partial)."""
        return math.ceil(self._shard_len / self.spec.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Read ``epoch`` next. A pending resume point of the same epoch is kept."""
        epoch = int(epoch)
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if self._resume is not None and self._resume["epoch"] != epoch:
            logger.info("fastkd.data: set_epoch(%d) replaces the resume point in epoch %d", epoch,
                        self._resume["epoch"])
            self._resume = None
        self._live = None
        self._epoch = epoch

    def state_dict(self) -> dict:
        """Where reading stands: ``{"epoch", "batch", "position", ...}`` (JSON-serialisable)."""
        if self._live is not None:
            epoch, batch, position = self._live["epoch"], self._live["batch"], self._live["position"]
            extra, in_epoch = self._extra_state(), sorted(self._epoch_skipped)
        elif self._resume is not None:
            epoch, batch, position = self._resume["epoch"], self._resume["batch"], self._resume["position"]
            extra, in_epoch = dict(self._resume.get("extra") or {}), list(self._resume.get("epoch_skipped", []))
        else:
            epoch, batch, position, extra, in_epoch = self._epoch, 0, 0, {}, []
        state = {"epoch": epoch, "batch": batch, "position": position, "backend": self.backend,
                 "skipped_indices": sorted(self._skipped), "epoch_skipped_indices": in_epoch,
                 **self._fingerprint()}
        state.update(extra)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state["batch"]`` of ``state["epoch"]`` (from :meth:`state_dict`).

        ``{"epoch": e, "batch": b}`` alone is accepted too (entry ``b * batch_size``). A state
        taken with another data set size, sharding, seed or batch size is refused.
        """
        for key in ("epoch", "batch"):
            if key not in state:
                raise KeyError(f"loader state has no {key!r} entry (got keys {sorted(state)})")
        mine = self._fingerprint()
        for key in _FINGERPRINT_FIELDS:
            if key in state and state[key] != mine[key]:
                raise ValueError(f"loader state was taken with {key}={state[key]!r}, this loader has "
                                 f"{key}={mine[key]!r}; it cannot resume at the same samples")
        epoch, batch = int(state["epoch"]), int(state["batch"])
        position = int(state.get("position", batch * self.spec.batch_size))
        if epoch < 0 or not 0 <= batch <= len(self) or not 0 <= position <= self._shard_len:
            raise ValueError(f"loader state out of range: epoch={epoch}, batch={batch}, position={position} "
                             f"(this shard has {len(self)} batches, {self._shard_len} entries)")
        for i in state.get("skipped_indices", ()):
            self._skipped.setdefault(int(i), "skipped before the resume")
        extra = {k: v for k, v in state.items() if k.startswith(self.backend + "_")}
        self._epoch = epoch
        self._live = None
        self._resume = {"epoch": epoch, "batch": batch, "position": position, "extra": extra,
                        "epoch_skipped": [int(i) for i in state.get("epoch_skipped_indices", ())]}

    def __iter__(self) -> Iterator[Batch]:
        epoch = self._epoch
        resume, self._resume = self._resume, None
        if resume is not None and resume["epoch"] != epoch:
            resume = None
        start = resume["position"] if resume else 0
        live = {"epoch": epoch, "batch": resume["batch"] if resume else 0, "position": start}
        self._epoch_skipped = set(resume["epoch_skipped"]) if resume else set()
        self._live = live
        plan = self._plan(epoch)
        for batch, position in self._run(plan, start, resume.get("extra") if resume else None):
            # Count the batch before handing it out: a state_dict() taken while the caller holds
            # it says "this batch is done", which is what a checkpoint after the step means.
            live["batch"] += 1
            live["position"] = position
            yield batch
        if self._live is live:  # a newer pass (or set_epoch) has not taken over
            self._live = None
            self._epoch = epoch + 1

    # ---- helpers for backends ------------------------------------------------------------------
    def _plan(self, epoch: int) -> ShardPlan:
        return shard_plan(self._num_total, shuffle=self.spec.train, seed=self.spec.seed, epoch=epoch,
                          shard_id=self.spec.shard_id, num_shards=self.spec.num_shards)

    def _fingerprint(self) -> dict:
        s = self.spec
        return {"train": s.train, "num_samples_total": self._num_total, "num_shards": s.num_shards,
                "shard_id": s.shard_id, "seed": s.seed, "batch_size": s.batch_size}

    def _skip_or_raise(self, index: int, error: str) -> None:
        """A file failed to decode: raise naming it, or (skip_corrupt) count it and warn once."""
        path = self.index.paths[index]
        if not self.spec.skip_corrupt:
            raise CorruptImageError(f"cannot decode image file {path!r}: {error} "
                                    "(skip such files with skip_corrupt=True; fastkd train: --skip-corrupt)")
        if index not in self._skipped:
            self._skipped[index] = error
            logger.warning("fastkd.data: skipped corrupt image file %r (%s); %d file(s) skipped so far",
                           path, error, len(self._skipped))

    def _labels_valid_indices(self, plan: ShardPlan, entries: np.ndarray):
        """(labels int64, valid bool or None, indices int64) CPU tensors for plan entries.

        Rows of files known to be corrupt (their pixels are the placeholder) are not valid, and
        are counted in :attr:`skipped_in_epoch`.
        """
        idx = plan.indices[entries]
        labels = torch.from_numpy(self.index.labels[idx])
        valid = plan.valid[entries]
        if self._skipped:
            bad = np.isin(idx, np.fromiter(self._skipped, dtype=np.int64))
            if bad.any():
                valid = valid & ~bad
                self._epoch_skipped.update(int(i) for i in idx[bad])
        return labels, (None if valid.all() else torch.from_numpy(valid)), torch.from_numpy(idx)

    def _batch(self, images: list, labels, valid, indices) -> Batch:
        """A :class:`Batch` from one tensor per view (in ``self._views`` order) and the CPU
        label / validity / index tensors of :meth:`_labels_valid_indices`."""
        teacher = None
        if self.spec.teacher is not None:
            teacher = images[0] if self.spec.teacher_is_student else images[1]
        return Batch(images=images[0], labels=self._to_device(labels), teacher_images=teacher,
                     valid=self._to_device(valid), indices=indices)

    def _to_device(self, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if t is None:
            return None
        if self.spec.device.type == "cuda":
            return t.pin_memory().to(self.spec.device, non_blocking=True)
        return t

    def close(self) -> None:
        """Release what the loader runs in the background (worker processes, pipelines) now; the
        loader can still be iterated afterwards (it starts them again). A training run calls this
        when it ends, so that nothing is left for the garbage collector to stop at some later
        moment, inside another run."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- what a backend implements ---------------------------------------------------------
    def _run(self, plan: ShardPlan, start: int, resume_extra: Optional[dict]) -> Iterator[tuple[Batch, int]]:
        """Yield ``(batch, next_entry)`` for entries ``start..`` of ``plan``."""
        raise NotImplementedError

    def _extra_state(self) -> dict:
        """Backend state of the running pass, keys prefixed with ``<backend>_``."""
        return {}
