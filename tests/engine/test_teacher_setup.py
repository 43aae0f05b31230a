"""A pretrained teacher as a run gets it: its own normalisation (both loaders, real JPEGs), its logits
mapped to the data's classes, the teacher check before epoch 0, the cache manifest's record."""
import json
import logging

import pytest
import torch

from fastkd import cli
from fastkd.data import IMAGENET_MEAN, IMAGENET_STD
from fastkd.engine import config as C
from fastkd.engine import teacher_setup as TS
from fastkd.engine.trainer import train

TEACHER = "timm:test_resnet.r160_in1k"  # timm's pretrained_cfg: mean = std = 0.5


@pytest.fixture(scope="module")
def wnid_data(tmp_path_factory, wnid_jpegs):
    """3 ImageNet classes (WordNet-id folders) of real digit JPEGs: 9 train, 6 val images."""
    return wnid_jpegs(tmp_path_factory.mktemp("wnid") / "data", {"train": (3, 3, 3), "val": (2, 2, 2)})


def _capture(monkeypatch):
    """Record every input the student and the teacher get (forward pre-hooks on the models the trainer builds)."""
    seen = {"student": [], "teacher": []}

    def wrap(fn, who):
        def build(*args, **kwargs):
            model = fn(*args, **kwargs)
            model.register_forward_pre_hook(lambda m, a: seen[who].append(a[0].detach().clone()))
            return model
        return build

    monkeypatch.setattr(TS, "build_student", wrap(TS.build_student, "student"))
    monkeypatch.setattr(TS, "build_teacher", wrap(TS.build_teacher, "teacher"))
    return seen


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=pytest.mark.dali)])
def test_teacher_gets_its_own_normalisation_of_the_students_crop(backend, hub_home, wnid_data, tmp_path,
                                                                  monkeypatch):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    seen = _capture(monkeypatch)
    cfg = C.make_config(data=str(wnid_data), data_backend=backend, student="fastkd:resnet8", teacher=TEACHER,
                        teacher_pretrained=True, teacher_classes="imagenet", check_teacher=False, epochs=1,
                        batch_size=4, image_size=24, workers=1, device="cpu", output=str(tmp_path / "run"))
    result = train(cfg)
    assert "teacher_top1" in result["final"]  # the teacher's validation ran on its own view too
    # training (3 batches) then validation (2 batches): the same batches in the same order for both models
    assert len(seen["student"]) == len(seen["teacher"]) == 5
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    for s, t in zip(seen["student"], seen["teacher"]):
        pixels = (s * std + mean) * 255  # the crop's uint8 values, back from the student's view
        x = pixels.round()
        assert (pixels - x).abs().max() < 1e-3
        want = (x - 127.5) / 127.5  # (x/255 - 0.5)/0.5, in fp32
        if backend == "torch":
            assert torch.equal(t, want)  # the torch loader computes exactly this
        else:  # DALI's crop_mirror_normalize multiplies by 1/std: the same up to fp32 rounding
            assert (t - want).abs().max() <= 2e-7, (t - want).abs().max()
        assert not torch.equal(t, s)


def test_teacher_classes_map_the_logits_and_a_1000_class_teacher_needs_them(hub_home, wnid_data, tmp_path):
    from fastkd.models.hub import load_pretrained

    cfg = C.make_config(data=str(wnid_data), student="fastkd:resnet8", teacher=TEACHER, teacher_pretrained=True,
                        teacher_classes="imagenet", output=str(tmp_path / "x"))
    classes = ["n01440764", "n01443537", "n01484850"]  # ImageNet's outputs 0, 1, 2
    teacher = TS.build_teacher(cfg, classes[::-1])
    full, _ = load_pretrained(TEACHER)
    teacher.eval(), full.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(teacher(x), full(x)[:, [2, 1, 0]])
    cfg.teacher_classes = None
    with pytest.raises(ValueError, match="has 1000 outputs and the data 3 classes: give --teacher-classes"):
        TS.build_teacher(cfg, classes)
    cfg.teacher_classes = "imagenet"
    with pytest.raises(ValueError, match="not among the teacher's classes"):
        TS.build_teacher(cfg, ["n01440764", "cats"])


def test_normalisation_sources_and_the_flag_warning(hub_home, caplog):
    cfg = C.make_config(data="d", student="fastkd:resnet8", teacher=TEACHER, teacher_pretrained=True)
    view = TS.teacher_preprocessing(cfg)
    assert (view.mean, view.std) == ((0.5,) * 3, (0.5,) * 3) and view.stated
    cfg = C.make_config(data="d", student="fastkd:resnet8", teacher=TEACHER, teacher_pretrained=True,
                        teacher_mean=[0.25, 0.25, 0.25])
    with caplog.at_level(logging.WARNING, logger="fastkd"):
        view = TS.teacher_preprocessing(cfg, what="test-flag-warning")
    assert view.mean == (0.25,) * 3 and view.std == (0.5,) * 3  # the flag wins; std from the config
    assert "--teacher-mean 0.25,0.25,0.25 differs from the 0.5,0.5,0.5" in caplog.text
    cfg = C.make_config(data="d", student="fastkd:resnet8", teacher="fastkd:resnet8", random_teacher=True)
    view = TS.teacher_preprocessing(cfg)
    assert (view.mean, view.std) == (tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)) and not view.stated
    with pytest.raises(C.ConfigError, match="3 numbers in"):
        C.make_config(data="d", student="fastkd:resnet8", teacher=TEACHER, teacher_pretrained=True,
                      teacher_mean=[0.5, 0.5])
    with pytest.raises(C.ConfigError, match="--teacher-weights"):
        C.make_config(data="d", student="fastkd:resnet8", teacher=TEACHER, teacher_pretrained=True,
                      teacher_weights="IMAGENET1K_V2")
    with pytest.raises(C.ConfigError, match="choose one"):
        C.make_config(data="d", student="fastkd:resnet8", teacher=TEACHER, teacher_pretrained=True,
                      teacher_checkpoint="t.pt")


def test_checkpoint_records_its_input_for_a_run_distilling_from_it(tmp_path, wnid_data):
    """A fastkd checkpoint records the normalisation its student saw: the next run's teacher view uses it."""
    run = tmp_path / "t"
    train(C.make_config(data=str(wnid_data), student="fastkd:resnet8", method="ce", epochs=1, batch_size=8,
                        image_size=16, workers=0, device="cpu", output=str(run)))
    assert TS.recorded_input(run / "last.pt") == {"image_size": 16, "mean": tuple(IMAGENET_MEAN),
                                                  "std": tuple(IMAGENET_STD)}
    cfg = C.make_config(data="d", student="fastkd:resnet8", teacher="fastkd:resnet8",
                        teacher_checkpoint=str(run / "last.pt"))
    view = TS.teacher_preprocessing(cfg)
    assert view.stated and str(run / "last.pt") in view.source


# --------------------------------------------------------------------------------------------
# The teacher check
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_classes(tmp_path_factory, digit_jpegs):
    """2 classes, 50 validation images each (enough for the check to decide)."""
    return digit_jpegs(tmp_path_factory.mktemp("check") / "data", {"train": (2, 2), "val": (50, 50)})


@pytest.fixture(scope="module")
def constant_teacher(tmp_path_factory):
    """A fastkd:resnet8 that always answers class 0: 50% on balanced classes, chance."""
    from fastkd.models import create_model

    model = create_model("fastkd:resnet8", 2)
    sd = model.state_dict()
    fc = [k for k in sd if sd[k].ndim == 2][-1]
    sd[fc].zero_()
    sd[fc.replace("weight", "bias")].copy_(torch.tensor([1.0, 0.0]))
    path = tmp_path_factory.mktemp("teacher") / "constant.pt"
    torch.save(sd, path)
    return path


def _train_args(data, teacher, out):
    return ["train", "--data", str(data), "--student", "fastkd:resnet8", "--teacher", "fastkd:resnet8",
            "--teacher-checkpoint", str(teacher), "--epochs", "1", "--batch-size", "16", "--image-size", "16",
            "--workers", "0", "--device", "cpu", "--data-backend", "torch", "--output", str(out)]


def _errors(caplog) -> list:
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    caplog.clear()
    return lines


def test_a_teacher_at_chance_stops_the_run_before_epoch_0(two_classes, constant_teacher, tmp_path, caplog):
    out = tmp_path / "run"
    assert cli.main(_train_args(two_classes, constant_teacher, out)) == 2
    err = _errors(caplog)
    assert len(err) == 1 and "\n" not in err[0]
    assert err[0].startswith("fastkd train: error: the teacher fastkd:resnet8 scores 50.00% top-1 on 100 validation "
                             "images (torch loader), near chance")
    for cause in ("preprocessing", "class order", "weights", "--no-check-teacher"):
        assert cause in err[0]
    assert not out.exists()  # stopped before anything was written
    assert cli.main(["cache", "build", "--data", str(two_classes), "--teacher", "fastkd:resnet8",
                     "--teacher-checkpoint", str(constant_teacher), "--epochs", "1", "--batch-size", "16",
                     "--image-size", "16", "--workers", "0", "--device", "cpu", "--data-backend", "torch",
                     "--output", str(tmp_path / "c")]) == 2
    assert "near chance" in _errors(caplog)[0]


def test_the_check_reads_at_most_20_batches_and_decides_on_100_images(two_classes, constant_teacher, caplog):
    from fastkd.data import create_loader
    from fastkd.models import create_model, load_weights

    from fastkd.models.classes import ClassMap

    teacher = load_weights(create_model("fastkd:resnet8", 2), constant_teacher).eval()
    ClassMap(teacher, torch.tensor([1, 0]))  # now it always answers class 1; the first 40 images are class 0
    calls = []
    teacher.register_forward_pre_hook(lambda m, a: calls.append(len(a[0])))
    view = TS.TeacherView(tuple(IMAGENET_MEAN), tuple(IMAGENET_STD), "test")
    loader = create_loader(two_classes / "val", train=False, batch_size=2, image_size=16, backend="torch",
                           num_threads=0, device="cpu")
    with caplog.at_level(logging.INFO, logger="fastkd"):
        got = TS.check_teacher(teacher, loader, torch.device("cpu"), 2, name="t", view=view)
    assert calls == [2] * 20 and got == {"images": 40, "top1": 0.0}  # 40 < 100 images: logged, not stopped
    assert "teacher check: t scores 0.00% top-1 on 40 validation images (20 batch(es), torch loader" in caplog.text
    with pytest.raises(TS.TeacherCheckError):
        TS.check_teacher(teacher, loader, torch.device("cpu"), 2, name="t", view=view, min_images=40)
    assert TS.near_chance(2) == pytest.approx(0.55) and TS.near_chance(1000) == pytest.approx(0.0015)


def test_no_check_teacher_trains_from_that_teacher(two_classes, constant_teacher, tmp_path):
    assert cli.main([*_train_args(two_classes, constant_teacher, tmp_path / "run"), "--no-check-teacher"]) == 0


# --------------------------------------------------------------------------------------------
# Cache build: the manifest records the weights, the normalisation and the class mapping
# --------------------------------------------------------------------------------------------
def test_cache_manifest_records_the_hub_teacher_and_refuses_a_mismatch(hub_home, wnid_data, tmp_path, caplog):
    common = ["--data", str(wnid_data), "--teacher", TEACHER, "--teacher-pretrained", "--teacher-classes",
              "imagenet", "--batch-size", "4", "--image-size", "16", "--workers", "0", "--device", "cpu",
              "--data-backend", "torch"]
    cache = tmp_path / "cache"
    assert cli.main(["cache", "build", *common, "--epochs", "1", "--output", str(cache)]) == 0
    m = json.loads((cache / "manifest.json").read_text())
    assert m["teacher_weights"] == {"source": "timm", "name": "test_resnet.r160_in1k",
                                    "hub": "timm/test_resnet.r160_in1k"}
    assert m["view"]["mean"] == m["view"]["std"] == [0.5, 0.5, 0.5] and m["teacher_classes"] == "imagenet"
    caplog.clear()
    assert cli.main(["cache", "build", *common, "--teacher-std", "0.25", "0.25", "0.25", "--epochs", "1",
                     "--output", str(cache)]) == 2
    assert "normalisation std: cache has [0.5, 0.5, 0.5], this run has [0.25, 0.25, 0.25]" in _errors(caplog)[0]
    run = ["train", "--student", "fastkd:resnet8", "--epochs", "1", "--teacher-cache", str(cache),
           *[a for a in common if a not in ("--teacher-classes", "imagenet")]]
    assert cli.main([*run, "--teacher-mean", "0.4", "0.4", "0.4", "--output", str(tmp_path / "r1")]) == 2
    assert "normalisation mean: cache has [0.5, 0.5, 0.5], this run has [0.4, 0.4, 0.4]" in _errors(caplog)[0]
    assert cli.main([*run, "--output", str(tmp_path / "r2")]) == 0


def test_analyze_a_hub_teacher_on_a_subset(hub_home, wnid_data, tmp_path):
    """fastkd analyze: the hub teacher with its own normalisation and its logits mapped to the folders."""
    from fastkd.data import create_loader
    from fastkd.models.classes import ClassMap, class_index, teacher_class_names
    from fastkd.models.hub import load_pretrained

    out = tmp_path / "an"
    assert cli.main(["analyze", "--data", str(wnid_data), "--teacher", f"{TEACHER}:pretrained", "--teacher-classes",
                     "imagenet", "--image-size", "24", "--data-backend", "torch", "--workers", "0", "--device", "cpu",
                     "--no-plots", "--temperatures", "1", "--ats", "none", "--ats-grid", "none",
                     "--output", str(out)]) == 0
    got = json.loads((out / "metrics.json").read_text())["teachers"]["test_resnet.r160_in1k"]["accuracy"]
    teacher, _ = load_pretrained(TEACHER)
    loader = create_loader(wnid_data / "val", train=False, batch_size=4, image_size=24, backend="torch",
                           num_threads=0, device="cpu", mean=(0.5,) * 3, std=(0.5,) * 3)
    ClassMap(teacher.eval(), class_index(teacher_class_names("imagenet", 1000), loader.classes))
    hits = n = 0
    with torch.inference_mode():
        for b in loader:
            hits += int((teacher(b.images).argmax(1) == b.labels).sum())
            n += len(b.labels)
    assert n == 6 and got == pytest.approx(hits / n)


def test_student_pretrained_brings_its_normalisation(hub_home):
    cfg = C.make_config(data="d", student=TEACHER, student_pretrained=True, method="ce")
    assert TS.student_preprocessing(cfg) == ((0.5,) * 3, (0.5,) * 3)
    student = TS.build_student(cfg, 3)
    assert student.state_dict()["fc.weight"].shape[0] == 3
    assert torch.equal(student.state_dict()["conv1.0.weight"], hub_home["state"]["conv1.0.weight"])


def test_offline_without_the_weights_is_one_line(hub_home, wnid_data, tmp_path, caplog):
    out = tmp_path / "run"
    assert cli.main(["train", "--data", str(wnid_data), "--student", "fastkd:resnet8", "--teacher",
                     "timm:resnet18.a1_in1k", "--teacher-pretrained", "--teacher-classes", "imagenet",
                     "--image-size", "16", "--workers", "0", "--device", "cpu", "--output", str(out)]) == 2
    err = _errors(caplog)
    assert len(err) == 1 and "\n" not in err[0]
    assert "timm:resnet18.a1_in1k: pretrained weights not found in the Hugging Face cache" in err[0]
    assert str(hub_home["home"] / "hub") in err[0] and not out.exists()
