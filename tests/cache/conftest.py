"""Fixtures of the cache tests: a tiny real-JPEG data set, a teacher checkpoint, subprocess runs."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """One math thread: runs compared bit for bit use the thread count of the subprocess runs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_jpegs(tmp_path_factory):
    """4 classes of real digit images as 16x16 JPEGs: 45 train (odd: 2 shards pad), 12 val."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("tiny") / "tiny"
    digits = load_digits()
    counts = {"train": (12, 11, 11, 11), "val": (3, 3, 3, 3)}
    for cls in range(4):
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


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory):
    """A fastkd:resnet8 teacher (4 classes) with fixed random weights (the cache does not care
    whether the teacher is any good)."""
    from fastkd.models import create_model

    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save(create_model("fastkd:resnet8", 4).state_dict(), path)
    return path


def _run(args, *, module=("-m", "fastkd"), timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, *module, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def run_py():
    return _run
