"""A teacher trained on other classes than the data's is refused by train and cache build (as by
analyze), naming the differing classes, before any weights load or any output is written."""
import shutil

import pytest
import torch

from fastkd import cli
from fastkd.engine import checkpoint as ckpt
from fastkd.models import create_model
from fastkd.models.classes import check_teacher_classes, recorded_classes


@pytest.fixture(scope="module")
def shifted(tmp_path_factory, tiny_jpegs):
    """Data with classes c1, c2, zz and a fastkd checkpoint of a teacher trained on c0, c1, c2."""
    base = tmp_path_factory.mktemp("shifted")
    data = base / "data"
    for split in ("train", "val"):
        for k, name in enumerate(("c1", "c2", "zz")):
            shutil.copytree(tiny_jpegs / split / f"class{k}", data / split / name)
    path = base / "teacher.pt"
    ckpt.save_atomic({"model": create_model("fastkd:resnet8", 3).state_dict(), "classes": ["c0", "c1", "c2"],
                      "model_name": "fastkd:resnet8"}, path)
    return data, path


def test_train_refuses_a_teacher_of_other_classes(shifted, tmp_path, caplog):
    data, teacher = shifted
    with caplog.at_level("ERROR", logger="fastkd"):
        assert cli.main(["train", "--data", str(data), "--data-backend", "torch", "--workers", "0", "--image-size",
                         "16", "--batch-size", "8", "--student", "fastkd:resnet8", "--teacher", "fastkd:resnet8",
                         "--teacher-checkpoint", str(teacher), "--method", "kd", "--epochs", "1", "--device", "cpu",
                         "--output", str(tmp_path / "run")]) == 2
    assert "only the teacher's: c0; only the data's: zz" in caplog.text
    assert not (tmp_path / "run" / ckpt.LAST).exists()


def test_cache_build_refuses_a_teacher_of_other_classes(shifted, tmp_path, caplog):
    data, teacher = shifted
    with caplog.at_level("ERROR", logger="fastkd"):
        assert cli.main(["cache", "build", "--data", str(data), "--data-backend", "torch", "--teacher",
                         "fastkd:resnet8", "--teacher-checkpoint", str(teacher), "--image-size", "16", "--batch-size",
                         "8", "--workers", "0", "--device", "cpu", "--epochs", "1",
                         "--output", str(tmp_path / "cache")]) == 2
    assert "only the teacher's: c0; only the data's: zz" in caplog.text
    assert not (tmp_path / "cache").exists()


def test_the_comparison(tmp_path):
    check_teacher_classes(None, ["a"], teacher="t", data="d")  # unknown: nothing to compare
    check_teacher_classes(["a", "b"], ("a", "b"), teacher="t", data="d")
    with pytest.raises(ValueError, match=r"same 2 classes in another order \(label 0: the teacher's 'b'"):
        check_teacher_classes(["b", "a"], ["a", "b"], teacher="t", data="d")
    with pytest.raises(ValueError, match=r"other classes \(2 vs 3; only the data's: c\)"):
        check_teacher_classes(["a", "b"], ["a", "b", "c"], teacher="t", data="d")
    torch.save(create_model("fastkd:resnet8", 2).state_dict(), tmp_path / "bare.pt")
    assert recorded_classes(tmp_path / "bare.pt") is None  # a bare state_dict does not say
