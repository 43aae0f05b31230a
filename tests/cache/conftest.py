"""Fixtures of the cache tests: a tiny real-JPEG data set, a teacher checkpoint, subprocess runs."""
import pytest
import torch


@pytest.fixture(scope="session")
def tiny_jpegs(tmp_path_factory, digit_jpegs):
    """4 classes of real digit images as 16x16 JPEGs: 45 train (odd: 2 shards pad), 12 val."""
    return digit_jpegs(tmp_path_factory.mktemp("tiny") / "tiny", {"train": (12, 11, 11, 11), "val": (3, 3, 3, 3)})


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory):
    """A fastkd:resnet8 teacher (4 classes) with fixed random weights (the cache does not care
    whether the teacher is any good)."""
    from fastkd.models import create_model

    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save(create_model("fastkd:resnet8", 4).state_dict(), path)
    return path


@pytest.fixture
def run_py(run_fastkd):
    return run_fastkd
