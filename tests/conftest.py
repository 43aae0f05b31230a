"""Test-wide set-up.

Without CUDA, Triton kernels run in Triton's CPU interpreter; the variable must be set before
``fastkd.kernels`` is imported anywhere, so it is set here, first thing.
"""
import os

try:
    import torch

    _CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover - torch is a hard dependency
    _CUDA = False

if not _CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
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
