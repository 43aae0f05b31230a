"""``create_loader``: one interface over the DALI, torch and synthetic input pipelines.

Every loader is an iterable of :class:`~fastkd.data.base.Batch` with the epoch, sharding and
resume logic of :class:`~fastkd.data.base.BaseLoader`; a backend only supplies ``_run`` (the
batches of one pass over a shard plan, from a given entry on). This module is the factory: it
validates the arguments and imports the chosen backend inside :func:`create_loader`, so importing
``fastkd.data`` loads neither DALI nor torchvision. Backends never import this module.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .. import _compat
# Re-exported: these names have always been importable from here.
from .base import (  # noqa: F401
    AUGMENTATIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Batch,
    BaseLoader,
    CorruptImageError,
    MAX_IMAGE_SIZE,
    LoaderSpec,
    Normalizer,
    View,
    check_image_size,
)
from .index import build_index

BACKENDS = ("auto", "dali", "torch", "synthetic")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
def _check_norm(name: str, values) -> tuple:
    try:
        values = tuple(float(v) for v in values)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of 3 numbers, got {values!r}") from None
    if len(values) != 3:
        raise ValueError(f"{name} must have 3 values (R, G, B), got {len(values)}")
    if any(not 0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"{name}={values} is outside [0, 1]: mean and std are in [0, 1] pixel units "
                         "(ImageNet: mean 0.485, 0.456, 0.406); divide 0..255 values by 255")
    if name.endswith("std") and any(v == 0.0 for v in values):
        raise ValueError(f"{name}={values} has a zero entry")
    return values


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def default_num_threads() -> int:
    """CPU threads per process: the cores this process may use, split between local DDP ranks."""
    import os

    from .._device import cpu_cores

    cores = cpu_cores()
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cores // max(1, local_ranks))


def resolve_device(device) -> torch.device:
    """``auto``/``cpu``/``cuda``/``cuda:N`` or a torch.device -> a concrete device (fastkd._device)."""
    from .._device import resolve_device as _resolve

    return _resolve(device, flag="device")


def create_loader(root, *, train: bool, batch_size: int, image_size: int, backend: str = "auto",
                  teacher_image_size: Optional[int] = None, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                  teacher_mean=None, teacher_std=None, shard_id: int = 0, num_shards: int = 1, seed: int = 0,
                  num_threads: Optional[int] = None, device="auto", dtype: torch.dtype = torch.float32,
                  channels_last: bool = False, skip_corrupt: bool = False, gpu_decode: Optional[bool] = None,
                  augment: str = "imagenet",
                  synthetic_samples: Optional[int] = None, synthetic_classes: Optional[int] = None) -> BaseLoader:
    """Build the input pipeline of one process (one DDP rank reads shard ``shard_id``).

    Args:
        root: an ImageFolder tree (``root/<class>/<image>``, classes sorted by name), a folder
            of ``.tar`` shards (WebDataset layout, :mod:`fastkd.data.shards`), a folder holding
            ``train/`` and ``val/`` such trees or shard folders, or a text file of ``path label`` lines.
            May be None for ``backend="synthetic"``.
        train: augmented views (see ``augment``), order reshuffled every epoch; else the
            validation view, indexed order.
        backend: ``"dali"`` (NVIDIA DALI; CPU-only pipeline on a CPU device), ``"torch"``
            (DataLoader workers + PIL, or GPU JPEG decoding), ``"synthetic"`` (random tensors
            made on the device), or ``"auto"`` (DALI when installed, else torch; logged).
        teacher_image_size, teacher_mean, teacher_std: any of them asks for a teacher view cut
            from the same crop window and flip as the student view (defaults: the student's).
        mean, std: normalisation in [0, 1] pixel units.
        shard_id, num_shards: this rank's shard; shards are padded to equal length and the
            padding is flagged in ``Batch.valid``.
        seed: fixes the order of every epoch and the augmentation.
        num_threads: decoding threads (DALI) or DataLoader workers (torch); default: the cores
            of this process divided by ``LOCAL_WORLD_SIZE``. 0 decodes in the main process (torch).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        dtype: float32, float16 or bfloat16 output. channels_last: NHWC memory format.
        skip_corrupt: skip undecodable files (counted in ``loader.skipped`` and warned about)
            instead of failing with an error naming the file.
        gpu_decode: decode JPEGs on the GPU. Default: yes for DALI on a CUDA device (nvJPEG and
            the hardware JPEG engine), no for the torch backend (its nvJPEG path, through
            torchvision, decodes the Huffman stream on the main process's CPU, so the workers'
            PIL decoding is usually as fast).
        augment: ``"imagenet"`` (default): training random-resized crop (area 0.08-1, aspect
            3/4-4/3) + horizontal flip; validation: shorter side to ``image_size / 0.875`` + centre
            crop. ``"cifar"`` (the CRD / mdistiller CIFAR setting): the image at ``image_size``
            (unchanged when it has that size, else shorter side resized and centre-cropped); for
            training zero-padded by 4 pixels, a random ``image_size`` crop and a horizontal flip.
            A teacher view of another size is the student's crop resized. Both keyed per sample
            on (seed, epoch, position), so resumed runs draw the same crops.
        synthetic_samples, synthetic_classes: size of a synthetic data set without ``root``
            (default: ImageNet-1k's, 1,281,167 / 50,000 samples and 1000 classes).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    batch_size = _positive_int("batch_size", batch_size)
    image_size = _positive_int("image_size", image_size)
    check_image_size("image_size", image_size, "--image-size")
    num_shards = _positive_int("num_shards", num_shards)
    if not isinstance(shard_id, (int, np.integer)) or not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id must be an integer in [0, num_shards={num_shards}), got {shard_id!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if num_threads is None:
        num_threads = default_num_threads()
    elif isinstance(num_threads, bool) or not isinstance(num_threads, (int, np.integer)) or num_threads < 0:
        raise ValueError(f"num_threads must be a non-negative integer, got {num_threads!r}")
    student = View(image_size, _check_norm("mean", mean), _check_norm("std", std))
    teacher = None
    if teacher_image_size is not None or teacher_mean is not None or teacher_std is not None:
        teacher = View(
            student.size if teacher_image_size is None else _positive_int("teacher_image_size", teacher_image_size),
            student.mean if teacher_mean is None else _check_norm("teacher_mean", teacher_mean),
            student.std if teacher_std is None else _check_norm("teacher_std", teacher_std))
    if teacher is not None:
        check_image_size("teacher_image_size", teacher.size, "--teacher-image-size")
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
    dev = resolve_device(device)
    if gpu_decode and dev.type != "cuda":
        raise ValueError("gpu_decode=True needs a CUDA device")
    spec = LoaderSpec(train=bool(train), batch_size=batch_size, student=student, teacher=teacher,
                      shard_id=int(shard_id), num_shards=num_shards, seed=int(seed), num_threads=int(num_threads),
                      device=dev, dtype=dtype, channels_last=bool(channels_last), skip_corrupt=bool(skip_corrupt),
                      augment=augment)

    if backend != "synthetic" and (synthetic_samples is not None or synthetic_classes is not None):
        raise ValueError("synthetic_samples / synthetic_classes apply to backend='synthetic' only")
    if backend == "synthetic":
        from .synthetic import SyntheticLoader

        index = None if root is None else build_index(root, train=train)
        return SyntheticLoader(spec, index=index, num_samples=synthetic_samples, num_classes=synthetic_classes)
    if root is None:
        raise ValueError("root is None: give an ImageFolder root or a file list (or use backend='synthetic')")
    if backend == "auto":
        if _compat.has_dali():
            backend = "dali"
            _compat.log_once("fastkd.data: backend 'auto' -> NVIDIA DALI")
        else:
            backend = "torch"
            _compat.log_once("fastkd.data: backend 'auto' -> torch DataLoader (NVIDIA DALI is not installed; "
                             "pip install 'fastkd[dali]' for the faster DALI pipeline)")
    elif backend == "dali" and not _compat.has_dali():
        raise ImportError("backend='dali' needs NVIDIA DALI: pip install 'fastkd[dali]' (nvidia-dali-cuda130; "
                          "'fastkd[dali-cu12]' for CUDA 12)")
    index = build_index(root, train=train)
    if len(index) < num_shards:
        raise ValueError(f"{len(index)} samples under {str(index.root)!r} cannot fill {num_shards} shards")
    if backend == "dali":
        from .dali import DaliLoader

        return DaliLoader(index, spec, gpu_decode=gpu_decode)
    from .torch_loader import TorchLoader

    return TorchLoader(index, spec, gpu_decode=gpu_decode)
