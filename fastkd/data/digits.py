"""A small real-image data set that needs no download: scikit-learn's digits as JPEG files.

``load_digits()`` holds 1,797 real 8x8 grey images of handwritten digits (values 0..16). They
are scaled to 0..255, upscaled to ``size`` x ``size`` (bicubic), stored as RGB JPEGs (so they go
through the same decoders as real data) in ``root/train/<digit>/`` and ``root/val/<digit>/``
with a stratified split.
"""
from __future__ import annotations

from pathlib import Path

from ._folder import cached_image_folder

_MARKER = ".fastkd_digits.json"
_JPEG_QUALITY = 95


def make_digits_imagefolder(root, *, seed: int = 0, val_fraction: float = 0.2, size: int = 32) -> Path:
    """Write the digits data set under ``root`` (if not already there) and return ``root``.

    Idempotent: a finished folder carries a marker with its parameters and is reused; a folder
    made with other parameters, or a non-empty folder that is not one of ours, is an error (it is
    never overwritten). The folder is built aside and renamed into place, so an interrupted run
    leaves nothing half-written at ``root``.
    """
    root = Path(root).expanduser()
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an integer >= 8 (the digits are 8 x 8), got {size!r}")
    params = {"seed": int(seed), "val_fraction": float(val_fraction), "size": int(size), "quality": _JPEG_QUALITY}

    def write(staging: Path) -> dict:
        import numpy as np
        from PIL import Image
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = np.clip(digits.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
        labels = digits.target.astype(int)
        order = np.arange(len(labels))
        train_idx, val_idx = train_test_split(order, test_size=val_fraction, stratify=labels, random_state=seed)
        counts = {}
        for split, idx in (("train", train_idx), ("val", val_idx)):
            for i in sorted(idx):
                folder = staging / split / str(labels[i])
                folder.mkdir(parents=True, exist_ok=True)
                img = Image.fromarray(images[i]).resize((size, size), Image.BICUBIC).convert("RGB")
                img.save(folder / f"{i:04d}.jpg", quality=_JPEG_QUALITY)
            counts[split] = len(idx)
        return counts

    return cached_image_folder(root, _MARKER, params, "a digits folder", write)
