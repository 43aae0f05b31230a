"""``fastkd demo`` end to end with one epoch per run (the full demo runs 8 per run)."""
import json

from fastkd import cli


def test_demo_runs_every_stage_and_prints_the_table(tmp_path, capsys):
    rc = cli.main(["demo", "--cache-dir", str(tmp_path / "cache"), "--output", str(tmp_path / "runs"),
                   "--teacher-epochs", "1", "--student-epochs", "1", "--image-size", "8", "--device", "cpu",
                   "--workers", "0"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "student top-1" in text and "resnet8 <- resnet8x4 [ats]" in text
    (demo_dir,) = (tmp_path / "runs").iterdir()
    results = json.loads((demo_dir / "demo_results.json").read_text())
    runs = {r["run"]: r for r in results["runs"]}
    assert len(runs) == 7
    teachers = {name.split("-", 1)[1]: r for name, r in runs.items() if name.startswith("teacher-")}
    for name, r in runs.items():
        f = r["final"]
        assert 0 <= f["val_top1"] <= 100 and f["images_per_s"] > 0
        if "-from-" in name:  # a student reports the accuracy of the best checkpoint of its teacher
            t = teachers[name.rsplit("-from-", 1)[1]]
            assert f["teacher_top1"] == t["final"]["best_top1"]
    # the data set is real JPEG files, cached for the next demo
    assert len(list((tmp_path / "cache").rglob("*.jpg"))) == 1797
