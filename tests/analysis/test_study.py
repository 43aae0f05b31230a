"""``fastkd study capacity``: the verdict rules on given numbers, and the tiny preset end to end."""
import json

import pytest
import torch

from fastkd import cli
from fastkd.analysis.study import CRITERIA, PRESETS, compare, verdicts


def test_compare_uses_paired_differences_and_two_standard_errors():
    assert compare([0.80, 0.82, 0.81], [0.70, 0.71, 0.72])["verdict"] == "reproduced"
    assert compare([0.70, 0.71, 0.72], [0.80, 0.82, 0.81])["verdict"] == "opposite"
    # a mean difference of +0.01 with a per-seed spread of 0.03 is within noise
    assert compare([0.80, 0.74, 0.77], [0.78, 0.76, 0.74])["verdict"] == "not reproduced"
    c = compare([0.5, 0.6], [0.4, 0.4])
    assert c["diff_mean"] == pytest.approx(0.15) and c["diff_se"] == pytest.approx(0.05)


def _students(**test):
    base = {"t8/kd": [0.70, 0.71, 0.72], "t56/kd": [0.60, 0.61, 0.62], "t56/ats": [0.75, 0.76, 0.77],
            "t56/diag": [0.65, 0.66, 0.67], "t56/isats": [0.75, 0.76, 0.76], "t56/eskd_stop": [0.60, 0.61, 0.62],
            "t56/eskd_early_teacher": [0.50, 0.52, 0.51], "t56-tolerant/kd": [0.55, 0.56, 0.54]}
    base.update(test)
    return {k: {"test_top1": v, "val_top1": v} for k, v in base.items()}


def test_verdicts_follow_the_numbers_either_way():
    teachers = [{"name": "t8"}, {"name": "t56"}]
    pairs = [{"a": "t8", "b": "t56", "spearman": 0.7}]
    sel = {"ats": "t56/ats", "diagonal": "t56/diag"}
    v, ev = verdicts(_students(), teachers, [0.02, 0.01], pairs, sel)
    assert set(v) == set(CRITERIA)
    assert v == {"capacity_mismatch": "reproduced", "ats_beats_kd": "reproduced", "isats_close_to_ats": "reproduced",
                 "eskd_helps": "not reproduced", "tolerant_helps": "opposite", "observation_1": "reproduced",
                 "observation_2": "reproduced"}
    assert ev["eskd_helps"]["variant"] == "t56/eskd_stop"  # chosen by validation
    # the same code, the other way round
    flipped = _students(**{"t56/kd": [0.80, 0.81, 0.82], "t56/isats": [0.60, 0.61, 0.62]})
    v, _ = verdicts(flipped, teachers, [0.01, 0.02], [{"a": "t8", "b": "t56", "spearman": -0.1}], sel)
    assert v["capacity_mismatch"] == "opposite" and v["ats_beats_kd"] == "opposite"
    assert v["isats_close_to_ats"] == "opposite" and v["observation_1"] == "opposite"
    assert v["observation_2"] == "opposite"


@pytest.mark.slow
def test_tiny_preset_end_to_end(tmp_path, capsys):
    threads = torch.get_num_threads()
    out = tmp_path / "study"
    assert cli.main(["study", "capacity", "--preset", "tiny", "--output", str(out), "--no-plots"]) == 0
    assert torch.get_num_threads() == threads  # restored
    s = json.loads((out / "summary.json").read_text())
    assert set(s) == {"criteria", "verdicts", "teachers", "students", "selection"}
    assert s["criteria"] == CRITERIA and set(s["verdicts"]) == set(CRITERIA)
    assert all(v in ("reproduced", "not reproduced", "opposite") for v in s["verdicts"].values())
    names = [t["name"] for t in s["teachers"]]
    assert names == ["resnet8", "resnet20", "resnet20@epoch1", "resnet20-tolerant"]
    for t in s["teachers"]:
        assert set(t) == {"name", "params", "test_top1", "ats_label_on_top"} and len(t["ats_label_on_top"]) == 30
        assert all(0 <= f <= 1 for f in t["ats_label_on_top"].values())
    cfg = PRESETS["tiny"]
    for st in s["students"]:
        assert set(st) == {"teacher", "method", "settings", "seeds", "val_top1_mean", "test_top1_mean", "test_top1_se"}
        assert st["seeds"] == list(cfg.seeds)
    ats = [st for st in s["students"] if st["method"].startswith("ats(")]
    assert all(st["settings"]["ce_weight"] == 0.5 and st["settings"]["kd_weight"] == 0.5
               and st["settings"]["student_temperature"] == 1.0 for st in ats)  # the released setting
    kd = [st for st in s["students"] if st["method"] == "kd"]
    assert {st["teacher"] for st in kd} == {"resnet8", "resnet20", "resnet20-tolerant"}
    assert all(st["settings"]["temperature"] == 4.0 for st in kd)
    sel = s["selection"]
    assert sel["split"] == "val" and (sel["ats"]["t1"], sel["ats"]["t2"]) in [(2.0, 1.0), (4.0, 1.0)]
    assert sum("[val-selected ATS]" in st["method"] for st in s["students"]) == 1
    readme = (out / "README.md").read_text()
    assert readme.index("## Criteria") < readme.index("## Results") < readme.index("## Verdicts")
    full = json.loads((out / "study.json").read_text())
    # the accuracies name how the images were read (no decoder here: in-memory tensors)
    assert full["loader"].startswith("in-memory tensors") and f"Loader: {full['loader']}" in readme
    assert full["selection"]["ats_detail"]["rule"].startswith("the grid point with the highest mean validation")
    assert "Verdicts" in capsys.readouterr().out


def test_study_rejects_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="seeds"):
        cli.main(["study", "capacity", "--preset", "tiny", "--seeds", "0", "--output", str(tmp_path), "--debug"])
    with pytest.raises(ValueError, match="comma-separated integers"):
        cli.main(["study", "capacity", "--preset", "tiny", "--seeds", "a,b", "--output", str(tmp_path), "--debug"])


@pytest.mark.parametrize("seeds", ["-1,-2", "0,99999999999999999999999"])
def test_study_rejects_seeds_out_of_range_before_running(seeds, tmp_path, capsys, caplog):
    # Before: negative seeds ran (wrapped by torch), a huge one failed deep inside torch with
    # "Overflow when unpacking long long".
    assert cli.main(["study", "capacity", "--preset", "tiny", f"--seeds={seeds}", "--output", str(tmp_path)]) == 2
    assert "seeds must be integers in [0, 2**32)" in capsys.readouterr().err + caplog.text
    assert not (tmp_path / "study.json").exists()
