"""``fastkd demo`` end to end with one epoch per run (the full demo runs 15 per teacher, 6 per student),
and its closing sentences computed from its numbers, whichever way they go."""
import json

import pytest

from fastkd import cli
from fastkd.demo import conclusions


def _numbers(**kw):
    x = {"n_test": 360, "ce": 88.0, "kd": {"resnet20": 89.0, "resnet8x4": 89.5}, "ats_released": 90.0,
         "ats_selected": 91.0, "ats_selected_point": (6.0, 2.0), "diagonal_selected": 90.5,
         "diagonal_selected_t": 2.0, "large": "resnet8x4", "small": "resnet20",
         "speed": {"ce": 1000.0, "kd_online": 400.0, "kd_cached": 900.0}, "kd_cached": 89.4, "cache_build_s": 12.0,
         "kd_cached_same_weights": True}
    x.update(kw)
    return x


def test_conclusions_follow_the_numbers():
    text = " ".join(conclusions(_numbers()))
    assert "89.5%, within noise of the 89.0%" in text
    assert "(6,2) reached 91.0%: within noise of KD" in text
    up = " ".join(conclusions(_numbers(kd={"resnet20": 70.0, "resnet8x4": 90.0}, ats_selected=99.0, ce=60.0)))
    assert "90.0%, above the 70.0%" in up and "99.0%: above KD" in up and "(above it)" in up
    down = " ".join(conclusions(_numbers(kd={"resnet20": 90.0, "resnet8x4": 70.0}, ats_selected=50.0,
                                         ats_released=40.0)))
    assert "70.0%, below the 90.0%" in down and "50.0%: below KD" in down and "40.0% (below it)" in down
    assert "900 images/s, 0.90x the student-only run (1000 images/s)" in text and "0.40x" in text
    assert "89.4%, within noise of the online KD student's 89.5%" in text
    fast = " ".join(conclusions(_numbers(n_test=2500, speed={"ce": 500.0, "kd_online": 100.0, "kd_cached": 750.0},
                                         kd_cached=70.0)))
    assert "1.50x the student-only run" in fast and "70.0%, below the online KD" in fast
    assert "with the same weights bit for bit" in text and "but with other weights" not in text
    other = " ".join(conclusions(_numbers(kd_cached_same_weights=False)))
    assert "but with other weights" in other and "bit for bit" not in other


@pytest.mark.slow
def test_demo_runs_every_stage_and_prints_the_table(tmp_path, capsys):
    rc = cli.main(["demo", "--data", "digits", "--cache-dir", str(tmp_path / "cache"), "--output", str(tmp_path / "runs"),
                   "--teacher-epochs", "1", "--student-epochs", "1", "--image-size", "8", "--device", "cpu",
                   "--workers", "0"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "test top-1" in text and "resnet8 <- resnet8x4 cache [ats (4,2) s=1]" in text
    assert "resnet8 <- resnet8x4 [kd T=4 s=4]" in text and "resnet8 <- resnet8x4 cache [kd T=4 s=4]" in text
    # every accuracy names the loader that read its images (the demo reads through the torch loader)
    assert "train top-1" in text and "% (torch loader, PIL); label on top" in text
    assert "Images read by: 'test' and 'teacher test' the torch loader, PIL; 'val' the torch loader, PIL." in text
    assert "label on top under the released ATS(4,2)" in text and "KL(t||s) T=1" in text and "1 of 1 for students" in text
    (demo_dir,) = (tmp_path / "runs").iterdir()
    results = json.loads((demo_dir / "demo_results.json").read_text())
    runs = {r["run"]: r for r in results["runs"]}
    assert len(runs) == 2 + 1 + 2 + 3 + 2 + 1  # teachers, labels only, KD x 2, ATS grid, diagonal, KD from the cache
    teachers = {name.split("-", 1)[1]: r for name, r in runs.items() if name.startswith("teacher-")}
    for name, r in runs.items():
        f = r["final"]
        assert 0 <= f["val_top1"] <= 100 and f["images_per_s"] > 0
        assert (f["loader"], f["decoder"]) == ("torch", "PIL")
        if "-from-" in name:  # a student reports its teacher checkpoint's accuracy (from the cache too)
            t = teachers[name.rsplit("-from-", 1)[1].removesuffix("-cached")]
            assert f["teacher_top1"] == t["final"]["val_top1"]
            assert 0 <= r["holdout_top1"] <= 100
    # one ATS point and one diagonal point are chosen, by the validation (holdout) numbers
    chosen = [r for r in runs.values() if r.get("selected")]
    assert len(chosen) == 2
    ats = [r for r in runs.values() if "-ats" in r["run"]]
    assert max(r["holdout_top1"] for r in ats) == [r for r in chosen if "-ats" in r["run"]][0]["holdout_top1"]
    assert results["conclusions"] == conclusions(results["numbers"]) and len(results["conclusions"]) == 4
    cached = runs["student-resnet8-kd-from-resnet8x4-cached"]
    assert 0 <= cached["holdout_top1"] <= 100 and (demo_dir / "cache-resnet8x4").is_dir()
    # the ATS grid and the diagonal read the cache, which trains the online KD student's weights exactly
    assert all(runs[n]["cached"] for n in runs if "-ats" in n or "-diagonal" in n)
    assert results["numbers"]["kd_cached_same_weights"] is True and "with the same weights bit for bit" in text
    assert all(v > 0 for v in results["numbers"]["speed"].values())
    assert "KD from the teacher cache ran at" in text
    assert all(0 <= d["ats_label_on_top"]["4,2"] <= 1 for d in results["diagnostic"].values())
    assert all((d["loader"], d["decoder"]) == ("torch", "PIL") for d in results["diagnostic"].values())
    assert all(r["holdout_loader"] == "torch loader, PIL" for r in runs.values() if "holdout_top1" in r)
    # the data set is real JPEG files, cached for the next demo; the fit split leaves the holdout out
    assert len(list((tmp_path / "cache").rglob("*.jpg"))) == 1797
    n_fit = len(list((demo_dir / "data" / "fit" / "train").rglob("*.jpg")))
    n_hold = len(list((demo_dir / "data" / "holdout").rglob("*.jpg")))
    assert n_fit + n_hold == 1437 and 0.1 < n_hold / 1437 < 0.2


@pytest.mark.parametrize("threads", ["0", "-2"])
def test_demo_refuses_a_thread_count_below_one(threads, tmp_path):
    # Before: --threads 0 silently ran the whole demo with one thread (and -2 failed inside torch).
    from fastkd import cli

    with pytest.raises(ValueError, match="--threads must be >= 1"):
        cli.main(["demo", f"--threads={threads}", "--output", str(tmp_path), "--device", "cpu", "--debug"])


def test_animal_mnist_jpeg_folder_is_real_images_and_idempotent(tmp_path):
    from PIL import Image

    from fastkd.data.animal import make_animal_imagefolder

    root = make_animal_imagefolder(tmp_path / "animals", train_per_class=3, test_per_class=2, size=28, seed=1)
    train, val = sorted((root / "train").rglob("*.jpg")), sorted((root / "val").rglob("*.jpg"))
    assert len(train) == 30 and len(val) == 20 and not {p.name for p in train} & {p.name for p in val}
    with Image.open(train[0]) as im:
        assert im.size == (28, 28) and im.mode == "RGB"
    assert make_animal_imagefolder(root, train_per_class=3, test_per_class=2, size=28, seed=1) == root  # reused
    with pytest.raises(FileExistsError, match="made with"):
        make_animal_imagefolder(root, train_per_class=4, test_per_class=2, size=28, seed=1)
