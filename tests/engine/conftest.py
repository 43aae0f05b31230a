"""Fixtures of the engine tests: a tiny real-JPEG data set (the digits and one math thread come from
the root conftest)."""
import pytest


@pytest.fixture(scope="session")
def tiny_jpegs(tmp_path_factory, digit_jpegs):
    """3 classes of real digit images as JPEGs, odd split sizes (31 train, 13 val) so that two
    shards need wrap-around padding."""
    return digit_jpegs(tmp_path_factory.mktemp("tiny") / "tiny", {"train": (11, 10, 10), "val": (5, 4, 4)})
