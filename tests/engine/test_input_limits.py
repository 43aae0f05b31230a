"""One line instead of a traceback: a model with a fixed input size, an absurd --image-size,
``bench data`` with no images."""
import pytest
import torch

from fastkd import cli
from fastkd.models import create_model


def test_fixed_input_size_is_read_from_timm_models():
    pytest.importorskip("timm")
    from fastkd.models import check_input_size, fixed_input_size

    vit = create_model("timm:vit_tiny_patch16_224", num_classes=3)
    assert fixed_input_size(vit) == (224, 224)
    check_input_size(vit, "timm:vit_tiny_patch16_224", 224)
    with pytest.raises(ValueError, match=r"timm:vit_tiny_patch16_224 has a fixed input size of 224 x 224 pixels, "
                                         r"but --image-size is 16: use --image-size 224"):
        check_input_size(vit, "timm:vit_tiny_patch16_224", 16)
    # the same model built for another size, or with dynamic_img_size, takes what it was built for
    small = create_model("timm:vit_tiny_patch16_224", num_classes=3, img_size=32)
    assert fixed_input_size(small) == (32, 32)
    with torch.no_grad():
        assert small.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 3)
    dynamic = create_model("timm:vit_tiny_patch16_224", num_classes=3, dynamic_img_size=True)
    assert fixed_input_size(dynamic) is None
    with torch.no_grad():
        assert dynamic.eval()(torch.zeros(1, 3, 48, 48)).shape == (1, 3)
    # models that take any size are left alone
    assert fixed_input_size(create_model("timm:resnet18", num_classes=3)) is None
    assert fixed_input_size(create_model("fastkd:resnet8", num_classes=3)) is None


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_train_refuses_a_fixed_size_model_at_another_size_in_one_line(role, tiny_jpegs, tmp_path, capsys, caplog):
    # Before: the first forward failed with timm's AssertionError traceback.
    pytest.importorskip("timm")
    models = {"student": "timm:vit_tiny_patch16_224", "teacher": "fastkd:resnet8"}
    if role == "teacher":
        models = {"student": "fastkd:resnet8", "teacher": "timm:vit_tiny_patch16_224"}
    rc = cli.main(["train", "--data", str(tiny_jpegs), "--student", models["student"], "--teacher", models["teacher"],
                   "--method", "kd", "--random-teacher", "--image-size", "16", "--epochs", "1", "--batch-size", "8", "--workers", "0",
                   "--device", "cpu", "--data-backend", "torch", "--output", str(tmp_path / "run")])
    assert rc == 2
    err = capsys.readouterr().err + caplog.text
    assert "Traceback" not in err
    assert "timm:vit_tiny_patch16_224 has a fixed input size of 224 x 224 pixels, but --image-size is 16" in err


def test_train_refuses_an_absurd_image_size_naming_the_flag(tiny_jpegs, tmp_path, capsys, caplog):
    rc = cli.main(["train", "--data", str(tiny_jpegs), "--student", "fastkd:resnet8", "--method", "ce",
                   "--image-size", "100000", "--device", "cpu", "--output", str(tmp_path / "run")])
    assert rc == 2
    assert "--image-size must be <= 4096 pixels, got 100000" in capsys.readouterr().err + caplog.text


@pytest.mark.parametrize("flag, value", [("--num-images", "0"), ("--num-images", "-3"), ("--epoch-images", "0"),
                                         ("--batch-size", "0"), ("--image-size", "100000")])
def test_bench_data_refuses_counts_below_one_and_absurd_sizes(flag, value, tmp_path, capsys, caplog):
    # Before: --num-images 0 ended in a ZeroDivisionError traceback.
    rc = cli.main(["bench", "data", flag, value, "--data-dir", str(tmp_path / "jpegs"), "--backends", "synthetic",
                   "--device", "cpu", "--no-step"])
    assert rc == 2
    err = capsys.readouterr().err + caplog.text
    assert "Traceback" not in err and f"fastkd bench data: error: {flag} must be" in err
    assert not (tmp_path / "jpegs").exists()


def test_cache_build_refuses_a_fixed_size_teacher_at_another_size(tiny_jpegs, tmp_path, capsys, caplog):
    pytest.importorskip("timm")
    ckpt = tmp_path / "vit.pt"
    torch.save(create_model("timm:vit_tiny_patch16_224", num_classes=3).state_dict(), ckpt)
    rc = cli.main(["cache", "build", "--data", str(tiny_jpegs), "--data-backend", "torch", "--teacher",
                   "timm:vit_tiny_patch16_224", "--teacher-checkpoint", str(ckpt), "--image-size", "16",
                   "--batch-size", "8", "--workers", "0", "--device", "cpu", "--epochs", "1",
                   "--output", str(tmp_path / "cache")])
    assert rc == 2
    err = capsys.readouterr().err + caplog.text
    assert "Traceback" not in err
    assert "timm:vit_tiny_patch16_224 has a fixed input size of 224 x 224 pixels, but --image-size is 16" in err
