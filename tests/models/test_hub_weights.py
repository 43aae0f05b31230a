"""Pretrained weights from the hubs (offline: a cache laid out in a temporary HF_HOME / TORCH_HOME),
safetensors checkpoints, and the teacher-to-data class mapping."""
import pytest
import torch

from fastkd.models import create_model, load_weights
from fastkd.models.classes import ClassMap, class_index, map_teacher_classes, teacher_class_names
from fastkd.models.hub import PretrainedNotFound, load_pretrained, preprocessing


def test_timm_pretrained_loads_exactly_the_cached_weights(hub_home):
    model, info = load_pretrained("timm:test_resnet.r160_in1k")
    state = model.state_dict()
    assert set(state) == set(hub_home["state"])
    assert all(torch.equal(state[k], v) for k, v in hub_home["state"].items())
    fresh = create_model("timm:test_resnet", 1000).state_dict()  # not what any random init would give
    assert not torch.equal(fresh["fc.weight"], state["fc.weight"])
    assert info.mean == info.std == (0.5, 0.5, 0.5)  # timm's pretrained_cfg of this tag
    assert info.num_classes == 1000 and info.image_size == 160
    assert info.identity == {"source": "timm", "name": "test_resnet.r160_in1k", "hub": "timm/test_resnet.r160_in1k"}
    assert preprocessing("timm:test_resnet.r160_in1k") == info  # the same without loading anything


def test_timm_pretrained_student_gets_a_new_head_of_the_data_classes(hub_home):
    model, _ = load_pretrained("timm:test_resnet.r160_in1k", 3)
    state = model.state_dict()
    assert state["fc.weight"].shape[0] == 3
    assert all(torch.equal(state[k], v) for k, v in hub_home["state"].items() if not k.startswith("fc."))


def test_timm_offline_without_the_weights_names_the_cache(hub_home):
    with pytest.raises(PretrainedNotFound) as e:
        load_pretrained("timm:resnet18.a1_in1k")
    msg = str(e.value)
    assert "\n" not in msg
    assert str(hub_home["home"] / "hub") in msg and "timm/resnet18.a1_in1k" in msg and "HF_HUB_OFFLINE" in msg


def test_unknown_tag_and_weights_are_refused():
    with pytest.raises(ValueError, match="nope"):
        preprocessing("timm:resnet18.nope")
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):  # the message lists the members
        preprocessing("torchvision:squeezenet1_1", "IMAGENET9K")
    with pytest.raises(ValueError, match="tag"):
        load_pretrained("timm:resnet18", weights="IMAGENET1K_V1")


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home"


def test_torchvision_pretrained_from_torch_home(torch_home):
    import torchvision

    w = torchvision.models.SqueezeNet1_1_Weights.IMAGENET1K_V1
    torch.manual_seed(7)
    state = torchvision.models.squeezenet1_1(num_classes=1000).state_dict()
    path = torch_home / "hub" / "checkpoints" / w.url.rsplit("/", 1)[1]  # squeezenet1_1-b8a52dc0.pth
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    # torch.hub checks the hash prefix in the file name (b8a52dc0) on download only: a file already in
    # the cache is read as it is, so these made-up weights load.
    model, info = load_pretrained("torchvision:squeezenet1_1", weights="IMAGENET1K_V1")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert info.mean == pytest.approx((0.485, 0.456, 0.406)) and info.std == pytest.approx((0.229, 0.224, 0.225))
    assert info.identity["weights"] == "SqueezeNet1_1_Weights.IMAGENET1K_V1" and info.num_classes == 1000
    # a student of 3 classes: every weight but the classifier's
    student, _ = load_pretrained("torchvision:squeezenet1_1", 3)
    s = student.state_dict()
    assert s["classifier.1.weight"].shape[0] == 3
    assert all(torch.equal(s[k], v) for k, v in state.items() if not k.startswith("classifier.1."))


def test_safetensors_checkpoint(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    src = create_model("fastkd:resnet8", 4)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "t.safetensors"))
    dst = load_weights(create_model("fastkd:resnet8", 4), tmp_path / "t.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
    with pytest.raises(ValueError, match="shape mismatches"):
        load_weights(create_model("fastkd:resnet8", 5), tmp_path / "t.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ValueError, match="safetensors"):
        load_weights(create_model("fastkd:resnet8", 4), tmp_path / "bad.safetensors")


def test_imagenet_class_names_come_from_timm():
    names = teacher_class_names("imagenet", 1000)
    assert len(names) == 1000 and names[0] == "n01440764" and names[-1] == "n15075141"
    with pytest.raises(ValueError, match="10 outputs"):
        teacher_class_names("imagenet", 10)


def test_class_map_selects_the_data_classes_by_name(tmp_path):
    data = ["n01484850", "n01440764"]  # not in the teacher's order
    idx = class_index(teacher_class_names("imagenet", 1000), data, spec="imagenet")
    assert idx.tolist() == [2, 0]
    model = torch.nn.Linear(4, 1000)
    x = torch.randn(5, 4)
    full = model(x)
    cmap = ClassMap(model, idx)
    assert torch.equal(model(x), full[:, [2, 0]])
    cmap.remove()
    assert model(x).shape == (5, 1000)
    with pytest.raises(ValueError, match="not among the teacher's classes") as e:
        class_index(teacher_class_names("imagenet", 1000), ["n01440764", "cat", "dog"], spec="imagenet")
    assert "cat, dog" in str(e.value) and "\n" not in str(e.value)
    listing = tmp_path / "names.txt"
    listing.write_text("dog\ncat\neel\n")
    m = torch.nn.Linear(4, 3)
    map_teacher_classes(m, str(listing), ["cat", "eel"], 3)
    assert m(x).shape == (5, 2)
    with pytest.raises(ValueError, match="3 names for a teacher with 4 outputs"):
        teacher_class_names(str(listing), 4)


def test_torchvision_weights_not_cached_and_not_downloadable_is_one_line(torch_home, monkeypatch):
    """No network (simulated: torch.hub's download raises what urllib raises offline): one line
    naming the missing file and the TORCH_HOME folder it was looked for in."""
    import urllib.error

    import torch.hub

    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(PretrainedNotFound) as e:
        load_pretrained("torchvision:squeezenet1_1")
    msg = str(e.value)
    assert "\n" not in msg and "squeezenet1_1-b8a52dc0.pth is not in" in msg
    assert str(torch_home / "hub" / "checkpoints") in msg and "SqueezeNet1_1_Weights.IMAGENET1K_V1" in msg
