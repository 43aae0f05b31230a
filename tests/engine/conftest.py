"""Fixtures of the engine tests: tiny real-JPEG data sets, one math thread, subprocess runs."""
import pytest


@pytest.fixture(autouse=True)
def _one_math_thread(one_thread):
    """Every test here runs with one math thread (the root conftest's ``one_thread``)."""


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory):
    """scikit-learn's digits as 16x16 JPEG files (train/ and val/), via fastkd.data."""
    from fastkd.data import make_digits_imagefolder

    return make_digits_imagefolder(tmp_path_factory.mktemp("digits") / "digits", size=16)


@pytest.fixture(scope="session")
def tiny_jpegs(tmp_path_factory, digit_jpegs):
    """3 classes of real digit images as JPEGs, odd split sizes (31 train, 13 val) so that two
    shards need wrap-around padding."""
    return digit_jpegs(tmp_path_factory.mktemp("tiny") / "tiny", {"train": (11, 10, 10), "val": (5, 4, 4)})
