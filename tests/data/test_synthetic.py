"""The synthetic backend: random batches with the real backends' shapes, shards and resume."""
import pytest
import torch

from fastkd.data import create_loader


def make(**kw):
    opts = dict(root=None, train=True, batch_size=8, image_size=12, backend="synthetic", device="cpu",
                synthetic_samples=30, synthetic_classes=5)
    opts.update(kw)
    return create_loader(opts.pop("root"), **opts)


def batches(loader):
    return [(b.images.clone(), b.labels.clone(), b.valid) for b in loader]


def test_shapes_dtype_layout_and_labels():
    loader = make(teacher_image_size=20, dtype=torch.bfloat16, channels_last=True)
    assert len(loader) == 4 and loader.num_samples == 30 and loader.classes == [str(i) for i in range(5)]
    out = list(loader)
    assert [len(b) for b in out] == [8, 8, 8, 6]
    for b in out:
        assert b.images.dtype == torch.bfloat16 and b.images.shape[1:] == (3, 12, 12)
        assert b.images.is_contiguous(memory_format=torch.channels_last)
        assert b.teacher_images.shape[1:] == (3, 20, 20)
        assert b.labels.dtype == torch.int64 and 0 <= b.labels.min() and b.labels.max() < 5
        assert b.valid is None
    x = torch.cat([b.images.float() for b in out])
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05  # standard normal


def test_reproducible_per_epoch_and_resumable():
    a, b = make(seed=1), make(seed=1)
    first = batches(a)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(first, batches(b)))
    second = batches(a)  # the next epoch draws new data
    assert not torch.equal(first[0][0], second[0][0])
    c = make(seed=1)
    it = iter(c)
    next(it)
    state = c.state_dict()
    d = make(seed=1)
    d.load_state_dict(state)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(batches(d), first[1:]))


def test_shards_are_padded_and_flagged():
    lengths, pads = set(), 0
    for shard in range(4):
        loader = make(train=False, shard_id=shard, num_shards=4, batch_size=3)
        out = list(loader)
        lengths.add(sum(len(b) for b in out))
        pads += sum(int((~b.valid).sum()) for b in out if b.valid is not None)
        assert loader.num_samples == (8 if shard < 2 else 7)
    assert lengths == {8} and pads == 2  # 30 samples in 4 shards of 8


def test_root_fixes_classes_and_size(image_folder):
    loader = create_loader(image_folder, train=True, batch_size=4, image_size=8, backend="synthetic", device="cpu")
    assert loader.classes == ["cat", "dog", "eel"] and loader.num_samples == 21
    with pytest.raises(ValueError, match="backend='synthetic' only"):
        create_loader(image_folder, train=True, batch_size=4, image_size=8, backend="torch", synthetic_samples=3)
