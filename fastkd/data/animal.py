"""Animal-MNIST: 10,000 real 28 x 28 animal silhouettes in 10 classes (1,000 each).

The images come from the MIT-licensed ``animal-mnist`` 0.4 wheel (its licence is
``assets/LICENSE-animal-mnist.txt``). That wheel declares TensorFlow as a dependency and its loader
imports it, so fastkd ships the arrays themselves, re-encoded as ``assets/animal_mnist.npz``
(``images`` uint8 (10000, 28, 28), ``labels`` int64; the same values as the wheel's two gzip
pickles, checked when the file was made): no TensorFlow, no pickle.

:func:`make_animal_task` splits the images, per class, into disjoint train / val / test sets (the
validation split is carved from the training images) and returns the same container as the digit
pairs task (:class:`fastkd.data.mnist.DigitPairs`), so the capacity study can run on either.
"""
from __future__ import annotations

import importlib.resources

import torch
import torch.nn.functional as F
from torch import Tensor

from .mnist import DigitPairs, split_per_class

__all__ = ["load_animal_mnist", "make_animal_task", "make_animal_imagefolder", "ANIMAL_CLASSES"]

ANIMAL_CLASSES = 10


def load_animal_mnist() -> tuple[Tensor, Tensor]:
    """``(images uint8 (10000, 28, 28), labels int64 (10000,))``, shipped with fastkd."""
    import numpy as np

    path = importlib.resources.files("fastkd.data") / "assets" / "animal_mnist.npz"
    with path.open("rb") as fh, np.load(fh, allow_pickle=False) as z:
        x, y = z["images"], z["labels"]
    if x.shape != (len(y), 28, 28) or x.dtype != np.uint8:
        raise ValueError(f"{path}: expected (N, 28, 28) uint8 images and N labels, got {x.shape} {x.dtype}")
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.int64))


def make_animal_task(train_per_class: int, val_per_class: int, test_per_class: int, *, image_size: int = 28,
                     seed: int = 0) -> DigitPairs:
    """Per class, ``*_per_class`` disjoint train / val / test images (seeded), area-resized to
    ``image_size``, normalised by the training mean and std."""
    for name, n in (("train_per_class", train_per_class), ("val_per_class", val_per_class),
                    ("test_per_class", test_per_class), ("image_size", image_size)):
        if int(n) < 1:
            raise ValueError(f"{name} must be a positive integer, got {n!r}")
    images, labels = load_animal_mnist()
    need = train_per_class + val_per_class + test_per_class
    counts = torch.bincount(labels, minlength=ANIMAL_CLASSES)
    if int(counts.min()) < need:
        raise ValueError(f"Animal-MNIST has {int(counts.min())} images in its smallest class; "
                         f"{train_per_class}+{val_per_class}+{test_per_class} per class do not fit")
    x = images.float()[:, None] / 255.0
    if image_size != 28:
        x = F.interpolate(x, size=(image_size, image_size), mode="area")
    desc = (f"Animal-MNIST (10 classes of 28x28 silhouettes, shipped with fastkd), {image_size}x{image_size} px; "
            f"images per class {train_per_class}/{val_per_class}/{test_per_class} train/val/test, disjoint "
            f"(seed {seed}); val is carved from the training images")
    return split_per_class(x, labels, ANIMAL_CLASSES, train_per_class, val_per_class, test_per_class, seed=seed,
                           image_size=image_size, description=desc)


_MARKER = ".fastkd_animal_mnist.json"
_JPEG_QUALITY = 95


def make_animal_imagefolder(root, *, train_per_class: int = 250, test_per_class: int = 250, size: int = 28,
                            seed: int = 0):
    """Animal-MNIST as JPEG files in ``root/train/<class>/`` and ``root/val/<class>/`` (disjoint,
    ``*_per_class`` images of each of the 10 classes, seeded), for the engine's image-folder
    loaders. Idempotent like :func:`fastkd.data.make_digits_imagefolder`: a finished folder
    carries a marker with its parameters and is reused; other parameters, or a non-empty foreign
    folder, are an error; the folder is built aside and renamed into place."""
    from pathlib import Path

    from ._folder import cached_image_folder

    root = Path(root).expanduser()
    for name, n in (("train_per_class", train_per_class), ("test_per_class", test_per_class)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be a positive integer, got {n!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an integer >= 8, got {size!r}")
    params = {"train_per_class": train_per_class, "test_per_class": test_per_class, "size": size, "seed": int(seed),
              "quality": _JPEG_QUALITY}

    def write(staging: Path) -> dict:
        from PIL import Image

        images, labels = load_animal_mnist()
        if int(torch.bincount(labels, minlength=ANIMAL_CLASSES).min()) < train_per_class + test_per_class:
            raise ValueError(f"Animal-MNIST has 1,000 images per class; {train_per_class} + {test_per_class} "
                             "do not fit")

        g = torch.Generator().manual_seed(seed)
        for c in range(ANIMAL_CLASSES):
            idx = (labels == c).nonzero()[:, 0]
            idx = idx[torch.randperm(len(idx), generator=g)]
            for split, part in (("train", idx[:train_per_class]),
                                ("val", idx[train_per_class:train_per_class + test_per_class])):
                folder = staging / split / str(c)
                folder.mkdir(parents=True, exist_ok=True)
                for i in part.tolist():
                    img = Image.fromarray(images[i].numpy())
                    if size != 28:
                        img = img.resize((size, size), Image.BICUBIC)
                    img.convert("RGB").save(folder / f"{i:05d}.jpg", quality=_JPEG_QUALITY)
        return {"train": train_per_class * ANIMAL_CLASSES, "val": test_per_class * ANIMAL_CLASSES}

    return cached_image_folder(root, _MARKER, params, "an Animal-MNIST folder", write)
