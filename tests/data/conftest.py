"""Real JPEG files for the data tests, written once per session with PIL.

``image_folder``: 3 classes, 21 images (odd, so 2 shards need padding): 18 of several sizes whose
colour encodes position (R = x / width, G = y / height, B = a per-image tag, also in the file
name), one grayscale JPEG, one CMYK JPEG and one with an EXIF rotation.
``photo_folder``: scikit-learn's two sample photographs at three scales.
"""
from __future__ import annotations

import numpy as np
import pytest

SIZES = [(72, 96), (96, 72), (80, 80), (61, 97), (100, 50), (57, 75), (90, 66)]  # (height, width)


def position_image(height: int, width: int, tag: int) -> np.ndarray:
    """uint8 RGB image: R grows left to right, G top to bottom, B = ``tag`` (identifies the image)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    r = 255.0 * x / (width - 1)
    g = 255.0 * y / (height - 1)
    b = np.full_like(r, float(tag))
    return np.stack([r, g, b], axis=-1).round().astype(np.uint8)


def _params(backend):
    return pytest.param(backend, marks=pytest.mark.dali) if backend == "dali" else backend


@pytest.fixture(params=[_params("torch"), _params("dali")])
def backend(request):
    """Each real backend; the DALI one skips cleanly where nvidia.dali is not installed."""
    if request.param == "dali":
        pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
    return request.param


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("imagefolder")
    classes = ["cat", "dog", "eel"]  # deliberately not in creation order below
    n = 0
    for c, name in enumerate(reversed(classes)):
        folder = root / name
        folder.mkdir()
        for j in range(6):
            h, w = SIZES[(c + j) % len(SIZES)]
            tag = 10 * n + 5
            Image.fromarray(position_image(h, w, tag)).save(folder / f"img_t{tag:03d}.JPEG", quality=90)
            n += 1
    # Colour models and orientation the decoders must handle.
    Image.fromarray(position_image(64, 80, 0)[..., 0]).save(root / "cat" / "gray.JPEG", quality=90)
    Image.fromarray(position_image(70, 60, 200)).convert("CMYK").save(root / "dog" / "cmyk_t200.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: "rotate 90 degrees clockwise to display"
    Image.fromarray(position_image(48, 88, 120)).save(root / "eel" / "rotated_t120.jpeg", quality=90, exif=exif)
    (root / "eel" / "notes.txt").write_text("not an image: ignored (and counted in the log)")
    return root


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory):
    from PIL import Image
    from sklearn.datasets import load_sample_images

    root = tmp_path_factory.mktemp("photos")
    data = load_sample_images()
    for name, img in zip(data.filenames, data.images):
        cls = name.rsplit("/", 1)[-1].split(".")[0]
        (root / cls).mkdir()
        pil = Image.fromarray(img)
        for scale in (1.0, 0.5, 0.3):
            size = (round(pil.width * scale), round(pil.height * scale))
            pil.resize(size, Image.BILINEAR).save(root / cls / f"{cls}_{size[0]}x{size[1]}.jpg", quality=90)
    return root


@pytest.fixture
def corrupt_folder(tmp_path):
    """Two classes of good JPEGs plus a file of garbage bytes and a truncated JPEG."""
    from PIL import Image

    for c, name in enumerate(["a", "b"]):
        (tmp_path / name).mkdir()
        for j in range(4):
            Image.fromarray(position_image(40 + 4 * j, 52, 30 * c + j)).save(tmp_path / name / f"{j}.jpg", quality=90)
    (tmp_path / "a" / "garbage.jpg").write_bytes(b"this is not a JPEG file\n" * 20)
    good = (tmp_path / "b" / "0.jpg").read_bytes()
    (tmp_path / "b" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    return tmp_path
