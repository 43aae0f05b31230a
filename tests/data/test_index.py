"""Indexing (ImageFolder, file lists), the shard plan, and the errors for bad data sets."""
import logging
from pathlib import Path

import numpy as np
import pytest

from fastkd.data import build_index, create_loader, shard_plan
from fastkd.data.index import center_crop_offset, shorter_side_size, val_resize_size


def test_image_folder_index_labels_follow_sorted_folders(image_folder, caplog):
    with caplog.at_level(logging.WARNING, logger="fastkd"):
        index = build_index(image_folder, train=False)
    assert index.classes == ("cat", "dog", "eel")
    assert len(index) == 21  # 18 position images + gray + cmyk + rotated
    for path, label in zip(index.paths, index.labels):
        assert Path(path).parent.name == index.classes[label]
    assert list(index.labels) == sorted(index.labels)
    assert "ignored 1 files" in caplog.text  # notes.txt is not silently dropped


def test_split_root_is_resolved(tmp_path, image_folder):
    (tmp_path / "train").symlink_to(image_folder)
    (tmp_path / "val").symlink_to(image_folder)
    index = build_index(tmp_path, train=True)
    assert index.classes == ("cat", "dog", "eel") and len(index) == 21


def test_file_list(tmp_path, image_folder):
    index = build_index(image_folder, train=False)
    rel = [Path(p).relative_to(image_folder) for p in index.paths[:5]]
    (tmp_path / "data").symlink_to(image_folder)
    lines = ["# comment", ""] + [f"data/{p} {7 - i}" for i, p in enumerate(rel)]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    listed = build_index(tmp_path / "list.txt", train=True)
    assert [Path(p).name for p in listed.paths] == [p.name for p in rel]
    assert listed.labels.tolist() == [7, 6, 5, 4, 3]
    assert listed.classes == tuple(str(i) for i in range(8))


@pytest.mark.parametrize("content, match", [
    ("data/missing.jpg 0\n", "missing files: .*missing.jpg"),
    ("just_one_field\n", r"list.txt:1: expected 'path label'"),
    ("a.jpg cat\n", "label 'cat' is not an integer"),
    ("a.jpg -1\n", "negative"),
    ("\n# nothing\n", "names no files"),
])
def test_file_list_errors(tmp_path, content, match):
    (tmp_path / "list.txt").write_text(content)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        build_index(tmp_path / "list.txt", train=True)


def test_missing_root_and_empty_class_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_loader(tmp_path / "nope", train=True, batch_size=2, image_size=8, backend="torch")
    with pytest.raises(FileNotFoundError, match="no class folders"):
        build_index(tmp_path, train=True)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"class folder '.*/b' holds no images"):
        build_index(tmp_path, train=True)


def test_argument_errors(image_folder):
    kw = dict(train=False, batch_size=4, image_size=16, backend="torch", device="cpu", num_threads=0)
    with pytest.raises(ValueError, match="backend"):
        create_loader(image_folder, **{**kw, "backend": "ffcv"})
    with pytest.raises(ValueError, match=r"\[0, 1\] pixel units"):
        create_loader(image_folder, **kw, mean=(123.7, 116.3, 103.5))
    with pytest.raises(ValueError, match="shard_id"):
        create_loader(image_folder, **kw, shard_id=2, num_shards=2)
    with pytest.raises(ValueError, match="batch_size"):
        create_loader(image_folder, **{**kw, "batch_size": 0})
    with pytest.raises(ValueError, match="cannot fill"):
        create_loader(image_folder, **kw, num_shards=22)


@pytest.mark.parametrize("n, shards", [(23, 2), (24, 4), (10, 3), (5, 5)])
def test_shard_plan_covers_every_sample_once(n, shards):
    plans = [shard_plan(n, shuffle=True, seed=3, epoch=1, shard_id=k, num_shards=shards) for k in range(shards)]
    assert len({len(p) for p in plans}) == 1  # equal lengths: DDP ranks step together
    real = np.concatenate([p.indices[p.valid] for p in plans])
    assert sorted(real.tolist()) == list(range(n))
    pads = np.concatenate([p.indices[~p.valid] for p in plans])
    assert len(pads) == len(plans[0]) * shards - n
    keys = np.concatenate([p.keys for p in plans])
    assert sorted(keys.tolist()) == list(range(len(keys)))


def test_shard_plan_order_fixed_by_seed_and_epoch():
    def order(seed, epoch, shuffle=True):
        return shard_plan(50, shuffle=shuffle, seed=seed, epoch=epoch, shard_id=0, num_shards=1).indices.tolist()

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    assert order(0, 0, shuffle=False) == order(0, 5, shuffle=False) == list(range(50))


def test_resize_geometry_helpers():
    assert val_resize_size(224) == 256 and val_resize_size(32) == 36
    assert shorter_side_size(375, 500, 256) == (256, 341)  # 341.33 -> 341
    assert shorter_side_size(120, 64, 36) == (68, 36)  # 67.5 rounds up, as DALI does
    assert center_crop_offset(41, 24) == 9 and center_crop_offset(40, 24) == 8


def _jpeg(path, tag=0):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), tag, dtype=np.uint8)).save(path, quality=90)


def test_symlink_loop_is_indexed_once_and_warned_about(tmp_path, caplog):
    for c in ("a", "b"):
        for j in range(2):
            _jpeg(tmp_path / c / f"{j}.jpg", j)
    _jpeg(tmp_path / "b" / "sub" / "2.jpg")
    (tmp_path / "b" / "loop").symlink_to(tmp_path / "b")  # ln -s . b/loop (absolute target)
    (tmp_path / "b" / "sub" / "up").symlink_to("..")  # a relative loop one level down
    (tmp_path / "b" / "again").symlink_to(tmp_path / "b" / "sub")  # a second way into sub/
    (tmp_path / "loop").symlink_to(".")  # a "class folder" that is the root itself
    with caplog.at_level(logging.WARNING, logger="fastkd"):
        index = build_index(tmp_path, train=True)
    names = [str(Path(p).relative_to(tmp_path)) for p in index.paths]
    assert names == ["a/0.jpg", "a/1.jpg", "b/0.jpg", "b/1.jpg", "b/sub/2.jpg"]  # each file once
    assert index.classes == ("a", "b")
    assert "skipped 4 symbolic links" in caplog.text and "loop" in caplog.text


def test_hidden_entries_and_images_at_the_root_are_counted(tmp_path, caplog):
    _jpeg(tmp_path / "a" / "0.jpg")
    _jpeg(tmp_path / "a" / ".hidden.jpg")
    _jpeg(tmp_path / "a" / ".cache" / "1.jpg")  # a hidden folder: counted once, not entered
    _jpeg(tmp_path / ".trash" / "2.jpg")  # a hidden folder at the root is no class either
    _jpeg(tmp_path / "stray.jpg")
    _jpeg(tmp_path / "stray2.png")
    (tmp_path / "README.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING, logger="fastkd"):
        index = build_index(tmp_path, train=True)
    assert index.classes == ("a",) and len(index) == 1
    assert "ignored 3 hidden files or folders" in caplog.text
    assert "ignored 2 images directly under" in caplog.text
    assert "ignored 1 files" in caplog.text  # README.txt


def test_a_link_to_the_root_or_another_class_reads_no_image_twice(tmp_path, caplog):
    """"Read once" holds for the whole index: a link inside a class folder to the data root (or a
    folder above it) is a loop, and a link to another class's folder is a second way in; neither
    relabels that class's images."""
    data = tmp_path / "data"
    for c in ("a", "b", "c"):
        for j in range(2):
            _jpeg(data / c / f"{j}.jpg", j)
    _jpeg(data / "c" / "deep" / "5.jpg")
    _jpeg(tmp_path / "outside" / "9.jpg")
    (data / "b" / "root").symlink_to(data)  # the data root
    (data / "b" / "above").symlink_to(tmp_path)  # a folder above the data root
    (data / "a" / "peer").symlink_to(data / "c")  # another class's folder
    (data / "a" / "deep").symlink_to(data / "c" / "deep")  # a folder inside another class
    (data / "a" / "ext").symlink_to(tmp_path / "outside")  # outside the root: read once, here
    (data / "c" / "ext").symlink_to(tmp_path / "outside")  # ... and not again under c
    (data / "c" / "deep" / "up").symlink_to("../..")  # a relative link to the root
    with caplog.at_level(logging.WARNING, logger="fastkd"):
        index = build_index(data, train=True)
    got = sorted((str(Path(p).relative_to(data)), index.classes[k]) for p, k in zip(index.paths, index.labels))
    assert got == [("a/0.jpg", "a"), ("a/1.jpg", "a"), ("a/ext/9.jpg", "a"), ("b/0.jpg", "b"), ("b/1.jpg", "b"),
                   ("c/0.jpg", "c"), ("c/1.jpg", "c"), ("c/deep/5.jpg", "c")]
    assert "skipped 6 symbolic links" in caplog.text and "b/above" in caplog.text


def test_two_class_folders_that_are_one_folder_are_an_error(tmp_path):
    _jpeg(tmp_path / "a" / "0.jpg")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(ValueError, match="class folders 'a' and 'b' .* are the same folder"):
        build_index(tmp_path, train=True)


def test_a_stray_folder_beside_train_and_val_is_named_and_never_a_class(tmp_path, image_folder, caplog):
    (tmp_path / "train").symlink_to(image_folder)
    (tmp_path / "val").symlink_to(image_folder)
    _jpeg(tmp_path / "plots" / "loss.png")
    with caplog.at_level(logging.WARNING, logger="fastkd"):
        for train in (True, False):
            index = build_index(tmp_path, train=train)
            assert index.classes == ("cat", "dog", "eel") and len(index) == 21
    assert "other folders are no classes and are not read: plots" in caplog.text
    (tmp_path / "val").unlink()
    with pytest.raises(FileNotFoundError, match="holds train/ but no val/"):
        build_index(tmp_path, train=False)
