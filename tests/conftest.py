"""Test-wide set-up.

Without CUDA, Triton kernels run in Triton's CPU interpreter; the variable must be set before
``fastkd.kernels`` is imported anywhere, so it is set here, first thing.
"""
import os
import subprocess
import sys

try:
    import torch

    _CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover - torch is a hard dependency
    _CUDA = False

if not _CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


# Tests that run fastkd in a subprocess through these fixtures are slow by construction (each child
# imports torch): they are marked here, so `pytest -m "not slow"` is the quick inner loop without a
# list to keep up to date. Tests that start processes by other means carry @pytest.mark.slow.
_SLOW_FIXTURES = {"run_fastkd", "run_py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    if _CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    """The device tests run on: CUDA when present, else CPU (kernels in the interpreter)."""
    return torch.device("cuda" if _CUDA else "cpu")


@pytest.fixture(autouse=True)
def one_thread():
    """Every test runs with one math thread (restored after): runs compared bit for bit use the
    thread count of the subprocess runs (1), and small convolutions on a busy 2-core machine lose
    far more to two OpenMP threads waiting on each other than they gain."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory):
    """scikit-learn's digits as 16x16 JPEG files (train/ and val/), via fastkd.data, built once
    for the whole run."""
    from fastkd.data import make_digits_imagefolder

    return make_digits_imagefolder(tmp_path_factory.mktemp("digits") / "digits", seed=0, val_fraction=0.2, size=16)


def write_digit_jpegs(root, counts: dict):
    """scikit-learn's real digit images as 16x16 RGB JPEGs in ``root/<split>/class<k>/``;
    ``counts`` maps a split to the number of images of each class, e.g. ``{"train": (11, 10)}``
    (classes 0, 1, ...; the splits take disjoint images). Returns ``root``."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    classes = len(next(iter(counts.values())))
    for cls in range(classes):
        idx = np.flatnonzero(digits.target == cls)
        start = 0
        for split, per_class in counts.items():
            n = per_class[cls]
            folder = root / split / f"class{cls}"
            folder.mkdir(parents=True)
            for i in idx[start:start + n]:
                img = (digits.images[i] * 255 / 16).astype(np.uint8)
                Image.fromarray(img).resize((16, 16)).convert("RGB").save(folder / f"{i}.jpg", quality=95)
            start += n
    return root


@pytest.fixture(scope="session")
def digit_jpegs():
    """:func:`write_digit_jpegs`, for the test folders' own data-set fixtures."""
    return write_digit_jpegs


def _run_fastkd(args, *, env=None, module=("-m", "fastkd"), timeout=300):
    """Run ``python -m fastkd ARGS`` (or another module) in a subprocess with one math thread."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, *module, *map(str, args)], env=full_env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def run_fastkd():
    return _run_fastkd
