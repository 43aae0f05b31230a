"""Fixtures of the engine tests: tiny real-JPEG data sets, one math thread, subprocess runs."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """One math thread in every engine test: runs compared bit for bit must use the thread count
    of the subprocess runs (1), and small convolutions gain little from a second thread while an
    oversubscribed CPU (a busy CI machine) slows OpenMP's spinning threads down badly."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory):
    """scikit-learn's digits as 16x16 JPEG files (train/ and val/), via fastkd.data."""
    from fastkd.data import make_digits_imagefolder

    return make_digits_imagefolder(tmp_path_factory.mktemp("digits") / "digits", size=16)


@pytest.fixture(scope="session")
def tiny_jpegs(tmp_path_factory):
    """3 classes of real digit images as JPEGs, odd split sizes (31 train, 13 val) so that two
    shards need wrap-around padding."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("tiny") / "tiny"
    digits = load_digits()
    counts = {"train": (11, 10, 10), "val": (5, 4, 4)}
    for cls in range(3):
        idx = np.flatnonzero(digits.target == cls)
        start = 0
        for split in ("train", "val"):
            n = counts[split][cls]
            folder = root / split / f"class{cls}"
            folder.mkdir(parents=True)
            for i in idx[start:start + n]:
                img = (digits.images[i] * 255 / 16).astype(np.uint8)
                Image.fromarray(img).resize((16, 16)).convert("RGB").save(folder / f"{i}.jpg", quality=95)
            start += n
    return root


def _run_fastkd(args, *, env=None, module=("-m", "fastkd"), timeout=300):
    """Run ``python -m fastkd ARGS`` (or another module) in a subprocess with one math thread."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, *module, *map(str, args)], env=full_env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def run_fastkd():
    return _run_fastkd
