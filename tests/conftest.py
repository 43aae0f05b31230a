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


HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def write_hub_teacher(hf_home, name: str = "test_resnet.r160_in1k", seed: int = 1234) -> dict:
    """Lay out a Hugging Face hub cache under ``hf_home`` holding timm's ``timm/NAME`` weights that
    this function makes (a randomly initialised timm model, saved with safetensors): what
    ``timm.create_model(NAME, pretrained=True)`` finds offline. Returns the saved state_dict."""
    from pathlib import Path

    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model(name.split(".")[0], pretrained=False)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    repo = Path(hf_home) / "hub" / f"models--timm--{name}"
    snapshot = repo / "snapshots" / HUB_COMMIT
    snapshot.mkdir(parents=True)
    save_file(state, str(snapshot / "model.safetensors"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HUB_COMMIT)
    return state


@pytest.fixture
def hub_home(tmp_path, monkeypatch):
    """An offline Hugging Face cache in a temporary HF_HOME (holding the weights of
    :func:`write_hub_teacher`), for this process (huggingface_hub reads its settings once, at
    import: they are set on its constants) and for subprocesses (the environment)."""
    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    home.mkdir()
    state = write_hub_teacher(home)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return {"home": home, "state": state, "name": "test_resnet.r160_in1k"}


def write_wnid_jpegs(root, counts: dict, wnids=("n01440764", "n01443537", "n01484850")):
    """:func:`write_digit_jpegs` with class folders named by ImageNet WordNet ids (an Imagenette-style subset)."""
    write_digit_jpegs(root, counts)
    for split in counts:
        for k, wnid in enumerate(wnids[:len(next(iter(counts.values())))]):
            (root / split / f"class{k}").rename(root / split / wnid)
    return root


@pytest.fixture(scope="session")
def wnid_jpegs():
    """:func:`write_wnid_jpegs`, for the test folders' own data-set fixtures."""
    return write_wnid_jpegs
