"""Decoding and augmentation geometry shared by the backends: PIL decoding to RGB, the training
crop window drawn per sample, and EXIF orientation for decoders that ignore it.

Augmentation randomness is keyed per sample on ``(seed, epoch, position in the epoch order)`` (a
numpy generator per sample), so it does not depend on the number of workers or shards, and a
resumed run draws exactly the crops an uninterrupted one would.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from .index import TRAIN_RATIO, TRAIN_SCALE, derive_seed

# The EXIF tag that says how a photo must be turned for display; nvJPEG ignores it, so the
# workers read it and the GPU path applies it (:func:`orient`).
EXIF_ORIENTATION_TAG = 0x0112


def crop_window(height: int, width: int, seed: int, epoch: int, key: int) -> tuple[int, int, int, int, bool]:
    """(top, left, h, w, flip) of a training crop, drawn from a generator keyed on the sample.

    The algorithm of torchvision's ``RandomResizedCrop.get_params`` (area 0.08-1 of the image,
    log-uniform aspect ratio 3/4-4/3, 10 attempts, then the largest centred crop with the ratio
    clamped), written against a per-sample numpy generator: torchvision's version draws from the
    global torch RNG, and reseeding that per sample costs milliseconds (tiny torch ops contend
    for intra-op threads), more than decoding a small JPEG.
    """
    rng = np.random.default_rng(derive_seed(seed, epoch, key))
    area = height * width
    log_ratio = (math.log(TRAIN_RATIO[0]), math.log(TRAIN_RATIO[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*TRAIN_SCALE)
        ratio = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * ratio)))
        h = int(round(math.sqrt(target_area / ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            break
    else:  # fallback: central crop
        in_ratio = width / height
        if in_ratio < TRAIN_RATIO[0]:
            w, h = width, int(round(width / TRAIN_RATIO[0]))
        elif in_ratio > TRAIN_RATIO[1]:
            h, w = height, int(round(height * TRAIN_RATIO[1]))
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
    return top, left, h, w, bool(rng.random() < 0.5)


#: Zero padding on each side before the random crop of the "cifar" augmentation.
CIFAR_PAD = 4


def cifar_crops(seed: int, epoch: int, keys) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tops, lefts, flips) of "cifar" training crops for many samples at once (vectorised).

    Each sample's window is an ``image_size`` crop of the image zero-padded by ``CIFAR_PAD`` on
    every side (offsets 0..2*pad, as torchvision's ``RandomCrop(size, padding=pad)``), flipped
    with probability 1/2. The draws are a counter-based hash (SplitMix64's finaliser) of
    ``(seed, epoch, key)``: keyed per sample like :func:`crop_window`, but cheap enough for the
    DALI backend to draw a whole epoch in Python (about 0.1 us a sample).
    """
    offsets = 2 * CIFAR_PAD + 1
    keys = np.asarray(keys, dtype=np.uint64).reshape(-1)
    with np.errstate(over="ignore"):
        z = (np.uint64(derive_seed(seed, epoch)) << np.uint64(32)) ^ keys
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    tops = (z % np.uint64(offsets)).astype(np.int64)
    lefts = ((z >> np.uint64(24)) % np.uint64(offsets)).astype(np.int64)
    flips = ((z >> np.uint64(63)) & np.uint64(1)).astype(bool)
    return tops, lefts, flips


def cifar_crop(seed: int, epoch: int, key: int) -> tuple[int, int, bool]:
    """(top, left, flip) of one sample's "cifar" training crop (see :func:`cifar_crops`)."""
    tops, lefts, flips = cifar_crops(seed, epoch, [key])
    return int(tops[0]), int(lefts[0]), bool(flips[0])


def open_rgb(source):
    """Decode a file (path or file object) with PIL to an oriented 8-bit RGB image; errors propagate.

    Every PIL mode comes out as DALI's decoder gives it (so both backends see the same pixels):
    16-bit grey (``I;16*``, and ``I``, which PIL uses for 16-bit data) is scaled by 255 / 65535
    and rounded, not clipped (PIL's own ``convert`` would turn all but the darkest pixels white);
    float images (``F``) are taken as 0..1 and scaled by 255; an alpha channel is dropped (``LA``,
    ``RGBA``, palettes with transparency); grey, bilevel, palette and CMYK images are expanded.
    """
    from PIL import Image, ImageOps

    with Image.open(source) as im:
        im.load()  # decode now: a truncated or corrupt file fails here, not later
        ImageOps.exif_transpose(im, in_place=True)  # a no-op without an orientation tag
        return to_rgb8(im)


def to_rgb8(im):
    """A PIL image of any mode -> 8-bit RGB (see :func:`open_rgb`)."""
    from PIL import Image

    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I;16") or mode == "I" or mode == "F":
        a = np.asarray(im, dtype=np.float64)
        a = np.clip(a, 0.0, 1.0) * 255.0 if mode == "F" else np.clip(a, 0.0, 65535.0) * (255.0 / 65535.0)
        return Image.fromarray(np.floor(a + 0.5).astype(np.uint8)).convert("RGB")
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # the palette colours; the alpha is then dropped, as DALI does
    return im.convert("RGB")  # L, LA, 1, P, RGBA (alpha dropped), CMYK, YCbCr, ...


def orient(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation (1..8) to a (C, H, W) tensor, as PIL's exif_transpose does."""
    if orientation in (2, 4, 5, 7):  # these include a mirror
        img = img.flip(-1)
    # rotations (counter-clockwise quarter turns) after the mirror, matching PIL's transpose table
    turns = {3: 2, 4: 2, 5: 1, 6: 3, 7: 3, 8: 1}.get(orientation, 0)
    return torch.rot90(img, turns, dims=(-2, -1)) if turns else img


def decode_error(path: str) -> Optional[str]:
    """Why PIL cannot decode ``path``, or None when it can."""
    try:
        open_rgb(path)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None
