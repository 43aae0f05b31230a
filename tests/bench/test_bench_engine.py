"""benchmarks/bench_engine.py without a GPU: the dry run of its modes, the derived numbers
(sum-of-parts bound, the teacher stream's own gain) and the table's labels."""
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def be():
    spec = importlib.util.spec_from_file_location("bench_engine", REPO / "benchmarks" / "bench_engine.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_derived_numbers(be):
    rows = {"fastkd-concurrent": {"images_per_s": 660.0}, "fastkd-sequential": {"images_per_s": 600.0},
            "naive-fair": {"images_per_s": 500.0}, "naive": {"images_per_s": 250.0},
            "student-only": {"images_per_s": 1200.0}, "teacher-only": {"images_per_s": 1200.0},
            "fastkd-compile": {"error": "RuntimeError: boom"}}
    d = be.summarise(rows)
    assert d == pytest.approx({"sum_of_parts_bound": 600.0, "stream_gain": 1.1, "fair_vs_naive": 2.0})
    text = be.table(rows, d, ["header"])
    assert "| fastkd-concurrent | " + be.MODES["fastkd-concurrent"] + " | 660 | 1.32x | 1.10x | 2.64x |" in text
    assert "not a fair baseline" in text and "failed: RuntimeError: boom" in text
    assert "teacher stream's own gain (fastkd-concurrent / fastkd-sequential): 1.100x" in text


def test_a_stopped_run_leaves_the_modes_it_measured(be, tmp_path, monkeypatch):
    def run_mode(args, mode):
        if mode == "naive":
            raise KeyboardInterrupt  # stands for the visit's timeout killing the process
        return {"images_per_s": 100.0}

    monkeypatch.setattr(be, "run_mode", run_mode)
    results = tmp_path / "engine.jsonl"
    with pytest.raises(KeyboardInterrupt):
        be.main(["--dry-run", "--results", str(results), "--modes", "naive-fair", "teacher-only", "naive"])
    assert not results.exists()
    rec = json.loads((tmp_path / "engine.jsonl.partial").read_text())
    assert rec["partial"] and set(rec["rows"]) == {"naive-fair", "teacher-only"}


def test_dry_run_measures_each_mode_and_records_the_commit(be, tmp_path, capsys):
    results = tmp_path / "engine.jsonl"
    rc = be.main(["--dry-run", "--commit", "abc1234", "--results", str(results), "--markdown", str(tmp_path / "t.md"),
                  "--modes", "naive-fair", "naive", "fastkd-sequential", "fastkd-graph", "teacher-only"])
    assert rc == 0, capsys.readouterr().out[-3000:]
    rec = json.loads(results.read_text())
    assert rec["commit"] == "abc1234" and rec["dry_run"] and rec["setting"].startswith("fastkd:resnet8")
    rows = rec["rows"]
    assert all(rows[m]["images_per_s"] > 0 for m in ("naive-fair", "naive", "fastkd-sequential", "teacher-only"))
    assert rows["fastkd-graph"] == {"skipped": "dry run: CUDA graphs need a GPU"}
    assert not (tmp_path / "engine.jsonl.partial").exists()  # written after each mode, removed at the end
    assert "DRY RUN" in (tmp_path / "t.md").read_text()
