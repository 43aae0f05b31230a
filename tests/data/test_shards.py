"""Tar shards (the WebDataset layout) read like the image folder they were written from: the same
batches on both backends, rank sharding, exact mid-epoch resume, corrupt members, clear errors."""
import io
import re
import shutil
from pathlib import Path
import tarfile

import numpy as np
import pytest
import torch

from fastkd.data import create_loader
from fastkd.data.base import CorruptImageError
from fastkd.data.index import build_index
from fastkd.data.shards import ShardIndex, index_shards, write_shards


def _loader(root, backend, **kw):
    args = dict(train=True, batch_size=4, image_size=24, backend=backend, device="cpu", num_threads=0, seed=5)
    if backend == "dali":
        args["num_threads"] = 1
    args.update(kw)
    return create_loader(root, **args)


def _batches(loader, epochs=(0,)):
    out = []
    for e in epochs:
        loader.set_epoch(e)
        out += [(b.images.clone(), None if b.teacher_images is None else b.teacher_images.clone(), b.labels.clone(),
                 None if b.valid is None else b.valid.clone(), b.indices.clone()) for b in loader]
    return out


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            assert (u is None) == (v is None)
            if u is not None:
                assert torch.equal(u, v)


@pytest.fixture(scope="module")
def shards(image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "train"
    write_shards(image_folder, out, samples_per_shard=6)
    return out


def test_written_shards_index_as_the_folder(image_folder, shards):
    folder, sharded = build_index(image_folder, train=True), build_index(shards, train=True)
    assert isinstance(sharded, ShardIndex) and len(sharded.tars) == 4  # 21 images, 6 per shard
    assert sharded.classes == folder.classes == ("cat", "dog", "eel")
    assert np.array_equal(sharded.labels, folder.labels)
    for i in range(len(folder)):
        with open(folder.paths[i], "rb") as fh:
            assert sharded.read(i) == fh.read()
    assert re.search(r"/shard-000001\.tar:00000007\.jpe?g$", sharded.paths[7])


@pytest.mark.parametrize("train, num_shards, teacher", [(True, 1, None), (True, 2, 32), (False, 2, None)])
def test_shards_give_the_folders_batches(backend, image_folder, shards, train, num_shards, teacher):
    epochs = (0, 1) if train else (0,)
    seen = []
    for shard_id in range(num_shards):
        kw = dict(train=train, num_shards=num_shards, shard_id=shard_id, teacher_image_size=teacher)
        a = _batches(_loader(image_folder, backend, **kw), epochs)
        b = _batches(_loader(shards, backend, **kw), epochs)
        _same(a, b)
        seen += [i for _, _, _, valid, idx in b[: len(b) // len(epochs)]
                 for i in (idx if valid is None else idx[valid]).tolist()]
    assert sorted(seen) == list(range(21))  # every sample once over the ranks (epoch 0)


def test_cifar_augmentation_from_shards(backend, image_folder, shards):
    _same(_batches(_loader(image_folder, backend, augment="cifar"), (0, 1)),
          _batches(_loader(shards, backend, augment="cifar"), (0, 1)))


def test_mid_epoch_resume_from_shards(backend, shards):
    full = _batches(_loader(shards, backend, num_shards=2, shard_id=1), (1,))
    first = _loader(shards, backend, num_shards=2, shard_id=1)
    first.set_epoch(1)
    it = iter(first)
    head = [next(it) for _ in range(2)]
    state = first.state_dict()
    resumed = _loader(shards, backend, num_shards=2, shard_id=1)
    resumed.load_state_dict(state)
    rest = _batches(resumed, (1,))
    assert len(head) + len(rest) == len(full)
    _same(full[2:], rest)
    assert torch.equal(full[0][0], head[0].images) and torch.equal(full[1][0], head[1].images)


def test_gpu_decode_reads_shard_bytes(image_folder, shards):
    """The torch backend's byte path (GPU decoding) reads members by offset; on CPU it is refused
    earlier, so check the worker's byte reader directly."""
    from fastkd.data.torch_loader import _PlanDataset

    index = build_index(shards, train=True)
    ds = _PlanDataset(index.paths, train=True, seed=0, sizes=(24,), raw_bytes=True, opener=index.open)
    _, _, (data, _), error = ds[(3, 0, 0, 0, False)]
    assert error is None
    with open(build_index(image_folder, train=True).paths[3], "rb") as fh:
        assert data.numpy().tobytes() == fh.read()


def _tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _jpeg():
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (10, 200, 30)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("members, words", [
    ([("a.jpg", "J"), ("a.cls", b"0"), ("b.jpg", "J")], ["s.tar", "'b'", "b.cls is missing"]),
    ([("a.jpg", "J"), ("a.cls", b"one")], ["s.tar", "'a'", "'one'", "not an integer"]),
    ([("a.jpg", "J"), ("a.cls", b"-2")], ["s.tar", "'a'", "negative class index -2"]),
    ([("a.cls", b"1")], ["s.tar", "'a'", "has no image"]),
    ([("a.jpg", "J"), ("a.png", "J"), ("a.cls", b"0")], ["s.tar", "'a'", "two images"]),
])
def test_a_bad_sample_is_a_one_line_error_naming_shard_and_key(tmp_path, members, words):
    _tar(tmp_path / "s.tar", [(n, _jpeg() if d == "J" else d) for n, d in members])
    with pytest.raises(ValueError) as info:
        build_index(tmp_path, train=True)
    message = str(info.value)
    assert "\n" not in message
    for w in words:
        assert w in message


def test_class_names_from_classes_txt(tmp_path):
    (tmp_path / "train").mkdir()
    _tar(tmp_path / "train" / "s.tar", [("a.jpg", _jpeg()), ("a.cls", b"2"), ("b.png", _jpeg()), ("b.cls", b"0")])
    index = index_shards(tmp_path / "train")
    assert index.classes == ("0", "1", "2") and index.labels.tolist() == [2, 0]  # no classes.txt: the indices
    (tmp_path / "classes.txt").write_text("n01\nn02\nn03\nn04\n")  # beside train/ and val/
    assert index_shards(tmp_path / "train").classes == ("n01", "n02", "n03", "n04")
    (tmp_path / "train" / "classes.txt").write_text("x\ny\n")  # beside the shards: wins, and is too short
    with pytest.raises(ValueError, match=r"s\.tar: sample 'a' has class index 2, but classes.txt names 2 classes"):
        index_shards(tmp_path / "train")


def test_shards_and_class_folders_in_one_split_are_refused(tmp_path):
    _tar(tmp_path / "s.tar", [("a.jpg", _jpeg()), ("a.cls", b"0")])
    (tmp_path / "cat").mkdir()
    with pytest.raises(ValueError, match="both .tar shards and folders"):
        build_index(tmp_path, train=True)


def test_a_corrupt_member_behaves_like_a_corrupt_file(backend, image_folder, tmp_path):
    folder, out = tmp_path / "folder", tmp_path / "shards"
    shutil.copytree(image_folder, folder)
    write_shards(folder, out, samples_per_shard=100)
    index, files = build_index(out, train=True), build_index(folder, train=True)
    tar, offset, size = (int(v) for v in index.members[4])
    with open(index.tars[tar], "r+b") as fh:  # the image bytes zeroed in place, in both copies
        fh.seek(offset)
        fh.write(b"\0" * size)
    with open(files.paths[4], "r+b") as fh:
        fh.write(b"\0" * size)
    with pytest.raises(CorruptImageError, match=r"shard-000000\.tar:00000004\.jpeg.*--skip-corrupt"):
        _batches(_loader(out, backend))
    loader = _loader(out, backend, skip_corrupt=True)
    batches = _batches(loader, (0, 1))
    assert loader.skipped_files == [index.paths[4]]
    flags = [bool(valid[idx == 4]) for _, _, _, valid, idx in batches if 4 in idx.tolist()]
    assert flags == [False, False]  # its row stays, flagged, in every epoch
    _same(batches, _batches(_loader(folder, backend, skip_corrupt=True), (0, 1)))  # as the corrupt file


def test_the_index_hash_covers_the_shards(image_folder, tmp_path):
    from fastkd.cache.store import index_sha256

    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write_shards(image_folder, a, samples_per_shard=6)
    write_shards(image_folder, b, samples_per_shard=6)
    write_shards(image_folder, c, samples_per_shard=7)
    hash_a = index_sha256(build_index(a, train=True))
    assert index_sha256(build_index(b, train=True)) == hash_a  # the same shards elsewhere: the same hash
    assert index_sha256(build_index(c, train=True)) != hash_a  # samples in other shards
    (b / "shard-000000.tar").rename(b / "shard-000009.tar")  # shard order changes the sample order
    assert index_sha256(build_index(b, train=True)) != hash_a


def test_write_shards_of_a_split_root(tmp_path, digit_jpegs):
    root = digit_jpegs(tmp_path / "d", {"train": (3, 2), "val": (1, 1)})
    written = write_shards(root, tmp_path / "s", samples_per_shard=2)
    assert [p.relative_to(tmp_path / "s").as_posix() for p in written] == [
        "train/shard-000000.tar", "train/shard-000001.tar", "train/shard-000002.tar", "val/shard-000000.tar"]
    for train in (True, False):
        f, s = build_index(root, train=train), build_index(tmp_path / "s", train=train)
        assert s.classes == f.classes and np.array_equal(s.labels, f.labels)
    again = write_shards(root, tmp_path / "t", samples_per_shard=2)
    assert [p.read_bytes() for p in written] == [p.read_bytes() for p in again]  # reproducible bytes
    with pytest.raises(ValueError, match="samples_per_shard"):
        write_shards(root, tmp_path / "u", samples_per_shard=0)


TRAIN = ["train", "--student", "fastkd:resnet8", "--teacher", "fastkd:resnet8", "--method", "kd", "--epochs", "2",
         "--batch-size", "8", "--image-size", "16", "--device", "cpu", "--workers", "0", "--seed", "3",
         "--log-interval", "3"]


@pytest.fixture(scope="module")
def digits_as_shards(tmp_path_factory, digit_jpegs):
    """Real digit JPEGs (3 classes, 23 train / 6 val) as a folder and as shards of 5 samples."""
    base = tmp_path_factory.mktemp("digits")
    folder = digit_jpegs(base / "folder", {"train": (8, 8, 7), "val": (2, 2, 2)})
    write_shards(folder, base / "shards", samples_per_shard=5)
    torch.manual_seed(11)
    from fastkd.models import create_model

    teacher = base / "teacher.pt"
    torch.save(create_model("fastkd:resnet8", 3).state_dict(), teacher)
    return folder, base / "shards", teacher


def _weights(run):
    return torch.load(run / "last.pt", map_location="cpu", weights_only=True)["model"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", [pytest.param("torch"), pytest.param("dali", marks=pytest.mark.dali)])
def test_shards_train_the_folders_weights_and_resume_exactly(digits_as_shards, tmp_path, backend, one_thread,
                                                              run_fastkd):
    """A KD run from shards trains bit-identical weights to the run from the folder they were
    written from; a run stopped mid-epoch and resumed from its checkpoint ends the same."""
    from fastkd import cli
    from fastkd.engine import checkpoint as ckpt
    from fastkd.engine.metrics import read_metrics

    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    folder, shards, teacher = digits_as_shards
    base = [*TRAIN, "--data-backend", backend, "--teacher-checkpoint", str(teacher)]
    assert cli.main([*base, "--data", str(folder), "--output", str(tmp_path / "f")]) == 0
    assert cli.main([*base, "--data", str(shards), "--output", str(tmp_path / "s")]) == 0
    a, b = _weights(tmp_path / "f"), _weights(tmp_path / "s")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra, rb = (read_metrics(tmp_path / r / "metrics.jsonl", "epoch") for r in ("f", "s"))
    assert [r["train_loss"] for r in ra] == [r["train_loss"] for r in rb]
    assert [r["val_top1"] for r in ra] == [r["val_top1"] for r in rb] and rb[-1]["val_samples"] == 6
    if backend == "dali":
        return
    # mid-epoch resume from shards: killed after step 5 (epoch 1, step 2 of 3), last.pt every step
    kill_run = str(Path(__file__).parents[1] / "engine" / "kill_run.py")
    stop = tmp_path / "stopped"
    args = [*base, "--data", str(shards), "--output", str(stop), "--checkpoint-interval", "1"]
    assert run_fastkd(args, module=(kill_run, "step:5")).returncode != 0
    state = ckpt.load(stop / "last.pt")
    assert state["epoch"] == 1 and 0 < state["step_in_epoch"] < 3
    assert cli.main([*args, "--resume", "auto"]) == 0
    c = _weights(stop)
    for k in a:
        assert torch.equal(a[k], c[k]), k


@pytest.mark.slow
def test_teacher_cache_from_shards(digits_as_shards, tmp_path, one_thread):
    """``fastkd cache build`` on shards, then training from the cache = training with the teacher."""
    import json

    from fastkd import cli

    folder, shards, teacher = digits_as_shards
    cache = tmp_path / "cache"
    assert cli.main(["cache", "build", "--data", str(shards), "--data-backend", "torch", "--teacher",
                     "fastkd:resnet8", "--teacher-checkpoint", str(teacher), "--image-size", "16", "--batch-size",
                     "8", "--workers", "0", "--device", "cpu", "--seed", "3", "--epochs", "2",
                     "--output", str(cache)]) == 0
    manifest = json.loads((cache / "manifest.json").read_text())
    from fastkd.cache.store import index_sha256

    assert manifest["data"]["index_sha256"] == index_sha256(build_index(shards, train=True))
    assert manifest["data"]["classes"] == ["class0", "class1", "class2"]
    base = [*TRAIN[:3], *TRAIN[5:], "--data-backend", "torch", "--data", str(shards)]
    assert cli.main([*base, "--teacher", "fastkd:resnet8", "--teacher-checkpoint", str(teacher),
                     "--output", str(tmp_path / "online")]) == 0
    assert cli.main([*base, "--teacher-cache", str(cache), "--output", str(tmp_path / "cached")]) == 0
    a, b = _weights(tmp_path / "online"), _weights(tmp_path / "cached")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the folder's index is another data set for the cache: refused, naming the field
    assert cli.main([*base[:-1], str(folder), "--teacher-cache", str(cache), "--output", str(tmp_path / "x")]) == 2


def test_the_shard_listing_is_cached_and_renewed_when_a_shard_changes(tmp_path, monkeypatch):
    from fastkd.data import shards as S

    _tar(tmp_path / "s.tar", [("a.jpg", _jpeg()), ("a.cls", b"1"), ("b.jpg", _jpeg()), ("b.cls", b"0")])
    first = index_shards(tmp_path)
    assert (tmp_path / S.INDEX_CACHE / "s.tar.json").is_file()
    scans = []
    real = S._scan_tar
    monkeypatch.setattr(S, "_scan_tar", lambda path: scans.append(path) or real(path))
    again = index_shards(tmp_path)
    assert scans == [] and again.paths == first.paths and np.array_equal(again.members, first.members)
    _tar(tmp_path / "s.tar", [("a.jpg", _jpeg()), ("a.cls", b"2"), ("b.jpg", _jpeg()), ("b.cls", b"0"),
                              ("c.jpg", _jpeg()), ("c.cls", b"1")])
    changed = index_shards(tmp_path)
    assert len(scans) == 1 and changed.labels.tolist() == [2, 0, 1]
