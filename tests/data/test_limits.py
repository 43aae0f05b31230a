"""Inputs that used to end in an abort or a traceback: an absurd image size, non-UTF-8 file names."""
import os

import numpy as np
import pytest
import torch

from fastkd.data import create_loader

from .conftest import position_image


@pytest.mark.parametrize("field, flag", [("image_size", "--image-size"), ("teacher_image_size", "--teacher-image-size")])
def test_an_image_size_above_the_bound_is_refused_naming_the_flag(image_folder, backend, field, flag):
    # Before: DALI aborted with std::bad_alloc while building 100000 x 100000 buffers.
    from fastkd.data.base import MAX_IMAGE_SIZE

    kw = {"image_size": 16, field: 100_000}
    with pytest.raises(ValueError, match=rf"{field}=100000 \({flag}\) is above the largest supported size, "
                                         rf"{MAX_IMAGE_SIZE} pixels"):
        create_loader(image_folder, train=True, batch_size=4, backend=backend, device="cpu", num_threads=1, **kw)
    # the bound itself is accepted (nothing is read until iterating)
    create_loader(image_folder, train=False, batch_size=4, backend=backend, device="cpu", num_threads=1,
                  image_size=MAX_IMAGE_SIZE)


@pytest.fixture
def latin1_folder(tmp_path):
    """Two classes of JPEGs, one of them named in Latin-1 (b'caf\\xe9.jpg': not valid UTF-8)."""
    root = os.fsencode(tmp_path)
    for c, name in enumerate((b"a", b"b")):
        os.mkdir(os.path.join(root, name))
        for j in range(3):
            path = os.path.join(root, name, b"%d.jpg" % j)
            from PIL import Image

            Image.fromarray(position_image(20, 24, 40 * c + 10 * j)).save(path, quality=95)
    from PIL import Image

    Image.fromarray(position_image(24, 20, 250)).save(os.path.join(root, b"a", b"caf\xe9.jpg"), quality=95)
    return tmp_path


@pytest.mark.dali
def test_dali_reads_a_file_whose_name_is_not_utf8_as_the_torch_loader_does(latin1_folder):
    # Before: DALI stopped with "Unsupported argument type with name files" (a traceback);
    # the torch loader reads such a file.
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
    kw = dict(train=False, batch_size=4, image_size=16, device="cpu")
    torch_batches = list(create_loader(latin1_folder, backend="torch", num_threads=0, **kw))
    dali = create_loader(latin1_folder, backend="dali", num_threads=1, **kw)
    assert any("\udce9" in p for p in dali.index.paths)
    dali_batches = list(dali)
    assert sum(len(b) for b in dali_batches) == 7
    for a, b in zip(dali_batches, torch_batches):
        assert torch.equal(a.labels, b.labels) and torch.equal(a.indices, b.indices)
        assert torch.allclose(a.images, b.images, atol=0.05)  # the same pixels (decoders agree to rounding)
    # the Latin-1 file's own content is in the batch: its tag 250 in the blue channel
    pos = dali.index.paths.index(next(p for p in dali.index.paths if "\udce9" in p))
    row = torch.cat([b.images for b in dali_batches])[pos]
    blue = row[2].mean() * 0.225 + 0.406
    assert abs(float(blue) - 250 / 255) < 0.03
    # a second epoch reads it again (and a training pass, whose pipeline is built the same way)
    assert sum(len(b) for b in dali) == 7
    train = create_loader(latin1_folder, backend="dali", num_threads=1, train=True, batch_size=4, image_size=16,
                          device="cpu")
    assert sum(int(b.valid.sum()) if b.valid is not None else len(b) for b in train) == 7
