"""``fastkd study capacity`` in a tiny configuration: the data set, determinism, every output file."""
import csv
import json

import pytest
import torch

from fastkd import cli
from fastkd.analysis import metrics as M
from fastkd.analysis.study import METHODS, StudyConfig, make_data, run_study

TINY = dict(super_classes=3, classes_per_super=2, train_per_class=12, test_per_class=6, teacher_widths=(4, 16),
            student_width=4, teacher_epochs=3, student_epochs=2, temperatures=(1.0, 4.0))


def test_hierarchical_data_is_seeded_balanced_and_hierarchical():
    cfg = StudyConfig(**{**TINY, "train_per_class": 200, "noise": 0.3})
    a, b = make_data(cfg), make_data(cfg)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, make_data(StudyConfig(**{**TINY, "seed": 1})).x_train)
    assert a.x_train.shape == (6 * 200, cfg.input_dim)
    assert torch.bincount(a.y_train).tolist() == [200] * 6
    assert a.super_of_class.tolist() == [0, 0, 1, 1, 2, 2]
    # Class means of the same super-class lie closer together than those of different ones.
    means = torch.stack([a.x_train[a.y_train == c].mean(0) for c in range(6)])
    dist = torch.cdist(means, means)
    same = a.super_of_class[:, None] == a.super_of_class[None, :]
    off_diag = ~torch.eye(6, dtype=torch.bool)
    assert dist[same & off_diag].mean() < dist[~same].mean()


def test_study_is_deterministic():
    cfg = StudyConfig(**TINY)
    one, two = run_study(cfg), run_study(StudyConfig(**TINY))
    one["seconds"] = two["seconds"] = None
    for k in one["teachers"]:
        one["teachers"][k]["seconds"] = two["teachers"][k]["seconds"] = None
    assert one == two


def test_study_command_writes_every_file(tmp_path, capsys):
    out = tmp_path / "study"
    rc = cli.main(["study", "capacity", "--super-classes", "3", "--classes-per-super", "2", "--train-per-class",
                   "12", "--test-per-class", "6", "--widths", "4,16", "--student-width", "4", "--teacher-epochs",
                   "3", "--student-epochs", "2", "--temperatures", "1,4", "--output", str(out)])
    assert rc == 0
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert files == {"README.md", "study.json", "students.csv", "students.png", "wrong_std_vs_width.png",
                     "teachers/metrics.json", "teachers/metrics.csv", "teachers/pairs.csv", "teachers/report.md",
                     "teachers/affinity.png"} | {f"teachers/temperature_{m}.png" for m in M.METRICS}
    res = json.loads((out / "study.json").read_text())
    assert list(res["teachers"]) == ["w4", "w16"]
    assert set(res["students"]) == {"ce"} | {f"{t}/{m}" for t in ("w4", "w16") for m in METHODS}
    assert res["machine"]["torch_threads"] == 1 and "command" in res
    # The observations restate the analysis: std lists in width order, verdicts that match them.
    for name, o in res["observation_1"].items():
        stds = [res["analysis"]["teachers"][k]["settings"][name]["wrong_std"] for k in ("w4", "w16")]
        assert o["wrong_std"] == stds
        assert o["monotone_decreasing"] == (stds[1] < stds[0])
    assert res["observation_2"]["min"] == res["analysis"]["pairs"][0]["spearman"]
    with (out / "students.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 + 2 * len(METHODS)
    for r in rows:
        assert 0.0 <= float(r["test_accuracy"]) <= 1.0
    readme = (out / "README.md").read_text()
    assert "Observation 1" in readme and "Observation 2" in readme and "| w16 |" in readme
    assert "Capacity-mismatch mini-study" in capsys.readouterr().out


def test_study_rejects_bad_settings():
    with pytest.raises(ValueError, match="at least 3 classes"):
        run_study(StudyConfig(**{**TINY, "super_classes": 1, "classes_per_super": 2}))
    with pytest.raises(ValueError, match="duplicate"):
        run_study(StudyConfig(**{**TINY, "teacher_widths": (4, 4)}))
    with pytest.raises(ValueError, match="integers"):
        cli.main(["study", "capacity", "--widths", "4,wide"])
