"""fastkd.models: the CIFAR-style ResNets, the factory, and loading weights from files."""
import pytest
import torch

from fastkd.models import FASTKD_MODELS, create_model, load_weights


def _expected_params(depth, widths, num_classes, in_chans=3):
    """Parameter count of the CRD/mdistiller CIFAR ResNet, by hand from its definition."""
    n = (depth - 2) // 6
    bn = lambda c: 2 * c
    total = 9 * in_chans * widths[0] + bn(widths[0])  # stem conv + BN
    cin = widths[0]
    for i, c in enumerate(widths[1:]):
        for b in range(n):
            src = cin if b == 0 else c
            total += 9 * src * c + bn(c) + 9 * c * c + bn(c)
            if b == 0 and (i > 0 or cin != c):  # 1x1 projection shortcut when the shape changes
                total += src * c + bn(c)
        cin = c
    return total + cin * num_classes + num_classes


@pytest.mark.parametrize("name", sorted(FASTKD_MODELS))
def test_cifar_resnets_match_their_definition(name):
    depth, widths = FASTKD_MODELS[name]
    model = create_model(f"fastkd:{name}", num_classes=37)
    assert sum(p.numel() for p in model.parameters()) == _expected_params(depth, widths, 37)
    blocks = [m for m in model.modules() if type(m).__name__ == "BasicBlock"]
    assert len(blocks) == 3 * ((depth - 2) // 6)


@pytest.mark.parametrize("size", [1, 9, 32, 45])
def test_any_input_size_and_class_count(size):
    model = create_model("fastkd:resnet8", num_classes=3).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 3) and torch.isfinite(out).all()


def test_factory_errors_are_clear():
    with pytest.raises(ValueError, match="needs a source prefix"):
        create_model("resnet8", 10)
    with pytest.raises(ValueError, match="unknown fastkd model 'resnet9'"):
        create_model("fastkd:resnet9", 10)
    with pytest.raises(ValueError, match="prefix must be one of"):
        create_model("hub:resnet8", 10)
    with pytest.raises(ValueError, match="num_classes"):
        create_model("fastkd:resnet8", 0)


def test_torchvision_and_timm_models_build_offline():
    pytest.importorskip("torchvision")
    tv = create_model("torchvision:resnet18", num_classes=7)
    assert tv.fc.out_features == 7
    with pytest.raises(ValueError, match="torchvision has no classification model named 'resnet19'"):
        create_model("torchvision:resnet19", 7)
    pytest.importorskip("timm")
    tm = create_model("timm:resnet18", num_classes=5)
    assert tm.get_classifier().out_features == 5
    with pytest.raises(ValueError, match="timm has no model named"):
        create_model("timm:not_a_model", 5)


def test_load_weights_formats_and_mismatches(tmp_path):
    src = create_model("fastkd:resnet8", 10)
    dst = create_model("fastkd:resnet8", 10)
    ref = {k: v.clone() for k, v in src.state_dict().items()}

    torch.save({"model": src.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")  # fastkd checkpoint
    load_weights(dst, tmp_path / "ckpt.pt")
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in ref.items())

    dst = create_model("fastkd:resnet8", 10)
    torch.save(src.state_dict(), tmp_path / "bare.pt")
    load_weights(dst, tmp_path / "bare.pt")
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in ref.items())

    dst = create_model("fastkd:resnet8", 10)
    torch.save({f"module.{k}": v for k, v in src.state_dict().items()}, tmp_path / "ddp.pt")
    load_weights(dst, tmp_path / "ddp.pt")
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in ref.items())

    wrong = create_model("fastkd:resnet8", 11)  # other class count: the classifier shapes differ
    with pytest.raises(ValueError, match=r"bare\.pt.*shape mismatches: fc\.weight"):
        load_weights(wrong, tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="missing keys"):
        load_weights(create_model("fastkd:resnet20", 10), tmp_path / "bare.pt")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_weights(dst, tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_weights(dst, tmp_path / "junk.pt")
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a model checkpoint"):
        load_weights(dst, tmp_path / "other.pt")
