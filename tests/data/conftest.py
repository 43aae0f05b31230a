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


def write_png16_rgb(path, rgb16: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one), written by hand."""
    import struct
    import zlib

    h, w, _ = rgb16.shape
    raw = b"".join(b"\x00" + rgb16[i].astype(">u2").tobytes() for i in range(h))

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


@pytest.fixture(scope="session")
def modes_folder(tmp_path_factory):
    """One 16 x 16 file per PIL mode / bit depth, with the 8-bit RGB each should decode to.

    Returns (root, {file name: expected (16, 16, 3) uint8}); one class folder per file, so the
    validation order is the sorted file names. The expectations are DALI's decoder's (16-bit
    scaled by 255 / 65535 and rounded, float 0..1 scaled by 255, alpha dropped).
    """
    from PIL import Image

    root = tmp_path_factory.mktemp("modes")
    y, x = np.mgrid[0:16, 0:16]
    g16 = (x * 4000 + y * 150).astype(np.uint16)  # up to 62,250: a real 16-bit range
    g8 = (x * 15 + y).astype(np.uint8)
    expected, images = {}, {}
    scaled = np.floor(g16 * (255.0 / 65535.0) + 0.5).astype(np.uint8)
    images["a_i16.png"] = (Image.fromarray(g16), np.repeat(scaled[..., None], 3, -1))
    images["b_i16.tif"] = (Image.fromarray(g16), np.repeat(scaled[..., None], 3, -1))
    f = (g16 / 65535.0).astype(np.float32)
    images["c_float.tif"] = (Image.fromarray(f), np.repeat(np.floor(f * 255.0 + 0.5).astype(np.uint8)[..., None], 3, -1))
    images["d_la.png"] = (Image.fromarray(np.stack([g8, 255 - g8], -1)), np.repeat(g8[..., None], 3, -1))
    pal = Image.fromarray(g8).convert("P")
    images["e_palette_transparent.png"] = (pal, np.repeat(g8[..., None], 3, -1))
    bits = ((x + y) % 2 * 255).astype(np.uint8)
    images["f_bilevel.png"] = (Image.fromarray(bits).convert("1"), np.repeat(bits[..., None], 3, -1))
    rgba = np.stack([g8, 255 - g8, g8 // 2, (x * 16).astype(np.uint8)], -1)
    images["g_rgba.png"] = (Image.fromarray(rgba), rgba[..., :3])
    for name, (img, want) in images.items():
        (root / name.split(".")[0]).mkdir()
        kw = {"transparency": 0} if "transparent" in name else {}
        img.save(root / name.split(".")[0] / name, **kw)
        expected[name] = want
    rgb16 = np.stack([g16, g16[::-1], g16 // 2], -1)
    (root / "h_rgb16").mkdir()
    write_png16_rgb(root / "h_rgb16" / "h_rgb16.png", rgb16)
    expected["h_rgb16.png"] = np.floor(rgb16 * (255.0 / 65535.0) + 0.5).astype(np.uint8)
    return root, expected


@pytest.fixture(scope="session")
def cifar_folder(tmp_path_factory):
    """2 classes x 5 real 32 x 32 JPEGs (position images: R = x, G = y, B = tag)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("cifar")
    for c in range(2):
        (root / f"c{c}").mkdir()
        for j in range(5):
            tag = 20 * (5 * c + j) + 10
            Image.fromarray(position_image(32, 32, tag)).save(root / f"c{c}" / f"{j}_t{tag:03d}.jpg", quality=95)
    return root
