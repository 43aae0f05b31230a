"""make_digits_imagefolder: scikit-learn's digits as real JPEG files, and a tiny training run on them."""
import json
import os

import numpy as np
import pytest
import torch

from fastkd.data import build_index, create_loader, make_digits_imagefolder


def test_split_is_stratified_and_complete(digits_root):
    from sklearn.datasets import load_digits

    target = load_digits().target
    train, val = build_index(digits_root, train=True), build_index(digits_root, train=False)
    assert train.classes == val.classes == tuple(str(d) for d in range(10))
    assert len(train) + len(val) == len(target) == 1797
    for c in range(10):
        n_c = int((target == c).sum())
        assert abs(int((val.labels == c).sum()) - 0.2 * n_c) <= 1  # stratified
    names = {os.path.basename(p) for p in train.paths} | {os.path.basename(p) for p in val.paths}
    assert len(names) == 1797  # every digit once, in one split


def test_files_are_real_jpegs_of_the_digits(digits_root):
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    index = build_index(digits_root, train=False)
    for path, label in list(zip(index.paths, index.labels))[::40]:
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (16, 16)
            small = np.asarray(im.convert("L").resize((8, 8), Image.BOX), dtype=np.float64)
        i = int(os.path.basename(path).split(".")[0])  # files are named by their index in load_digits()
        assert digits.target[i] == label
        assert np.corrcoef(small.ravel(), digits.images[i].ravel())[0, 1] > 0.9


def test_idempotent_and_refuses_other_parameters(digits_root, tmp_path):
    marker = digits_root / ".fastkd_digits.json"
    before = os.stat(marker).st_mtime_ns, len(list(digits_root.rglob("*.jpg")))
    assert make_digits_imagefolder(digits_root, seed=0, val_fraction=0.2, size=16) == digits_root
    assert (os.stat(marker).st_mtime_ns, len(list(digits_root.rglob("*.jpg")))) == before
    assert json.loads(marker.read_text())["counts"] == {"train": 1437, "val": 360}
    with pytest.raises(FileExistsError, match="made with"):
        make_digits_imagefolder(digits_root, seed=1, val_fraction=0.2, size=16)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        make_digits_imagefolder(tmp_path / "other")


def test_tiny_training_run_learns_the_digits(digits_root, backend):
    """Labels and pixels must line up through the whole pipeline for a classifier to learn."""
    torch.manual_seed(0)
    kw = dict(batch_size=64, image_size=12, backend=backend, device="cpu", mean=(0.5,) * 3, std=(0.5,) * 3,
              num_threads=1 if backend == "dali" else 2)
    train = create_loader(digits_root, train=True, **kw)
    val = create_loader(digits_root, train=False, **kw)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 12 * 12, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(3):
        for b in train:
            loss = torch.nn.functional.cross_entropy(model(b.images), b.labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
    correct = total = 0
    with torch.no_grad():
        for b in val:
            correct += int((model(b.images).argmax(1) == b.labels).sum())
            total += len(b)
    assert total == 360
    # A linear model on heavily cropped 12 px digits reaches about 0.65 after 3 epochs; chance is 0.1.
    assert correct / total > 0.45
