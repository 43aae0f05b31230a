"""benchmarks/gpu_visit.sh and its summary (fastkd/bench/visit.py), without a GPU.

The whole ``--dry-run`` (every step at tiny sizes on the CPU) takes 2-5 minutes on a 2-core
machine, too long for CI: here it runs its set-up and JPEG steps end to end (the step runner,
the deadline bookkeeping, the summary, the tarball), and the summary is checked on the files a
full visit leaves behind. The kernel and engine benchmarks' dry runs are tested in
tests/ops/test_bench_kernels.py and tests/bench/test_bench_engine.py.
"""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from fastkd.bench import visit

REPO = Path(__file__).resolve().parents[2]


def test_summary_reads_what_the_steps_left(tmp_path):
    (tmp_path / "env.json").write_text(json.dumps({"gpu": "NVIDIA H200", "commit": "abc1234", "date": "today"}))
    (tmp_path / "steps.tsv").write_text("env\tok\t0\t12\t60\nops-tests\tfailed\t1\t80\t150\n"
                                        "study\tskipped\t-\t0\t120\nengine\ttimeout\t124\t150\t150\n")
    (tmp_path / "ops-tests.log").write_text("....F\n=== 1 failed, 131 passed in 79.2s ===\n")
    row = dict(method="kd", N=256, C=1000, dtype="bf16")
    (tmp_path / "kernels-kd.json").write_text(json.dumps({"rows": [
        {**row, "impl": "fastkd", "ms": 0.1, "graph_ms": 0.02, "vs_compile": 3.0, "pct_copy": 10.0},
        {**row, "impl": "compile", "ms": 0.3, "graph_ms": 0.05},
        {**row, "impl": "eager", "ms": 0.9, "graph_ms": None}]}))
    (tmp_path / "engine-synthetic.jsonl").write_text(json.dumps({
        "setting": "r50 -> r18", "rows": {"naive-fair": {"images_per_s": 5000.0},
                                          "fastkd-concurrent": {"images_per_s": 6500.0},
                                          "fastkd-compile": {"error": "BackendCompilerFailed: x"}},
        "stream_gain": 1.07}) + "\nnot json\n")
    (tmp_path / "engine-jpeg.jsonl.partial").write_text(json.dumps({
        "setting": "jpeg", "partial": True, "rows": {"naive-fair": {"images_per_s": 3000.0}}}) + "\n")
    (tmp_path / "cache.md").write_text("| run | images/s |\n|---|---:|\n| cached KD full fp16 | 7000 |\n")
    (tmp_path / "linear.md").write_text("| N x H x V | variant | ms (fwd+bwd) |\n|---|---|---:|\n"
                                        "| 8192 x 4096 x 128256 | fastkd | 12.5 |\n")
    text = visit.summary(tmp_path)
    assert "| 8192 x 4096 x 128256 | fastkd | 12.5 |" in text
    assert "| cached KD full fp16 | 7000 |" in text
    assert "NVIDIA H200, commit abc1234" in text
    assert "| ops-tests | failed (rc 1) | 80 (150) | 1 failed, 131 passed in 79.2s |" in text
    assert "| engine | timeout (rc 124) | 150 (150) |" in text and "| study | skipped |" in text
    assert "| kd | 256 x 1000 | 0.100 | 0.020 | 0.300 | 0.050 | 0.900 | 3.00x | 10 % |" in text
    assert "| fastkd-concurrent | 6500 | 1.30x |" in text and "failed: BackendCompilerFailed" in text
    assert "concurrent / sequential): 1.070x" in text
    assert "Engine (jpeg), images/s (PARTIAL: the step was stopped before its last mode)" in text


def test_summary_of_an_empty_folder_says_so(tmp_path):
    text = visit.summary(tmp_path)
    assert "(no steps.tsv)" in text and "no kernel or engine results" in text


@pytest.mark.skipif(sys.platform != "linux", reason="the visit script is bash for the Linux GPU machine")
@pytest.mark.slow
def test_visit_dry_run_runs_its_steps_and_packs_the_results(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "STEPS": "jpegs", "PYTHON": sys.executable, "FASTKD_COMMIT": "abc1234"}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_visit.sh"), "--dry-run"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = (tmp_path / "summary.md").read_text()
    assert "commit abc1234" in summary and "DRY RUN" in summary
    assert "| env | ok |" in summary and "| jpegs | ok |" in summary
    assert "kernels" not in summary.split("| jpegs |")[1]  # steps not asked for do not run
    assert "visit done" in (tmp_path / "visit.log").read_text()
    with tarfile.open(tmp_path / "visit.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"env.json", "steps.tsv", "summary.md", "jpegs.log"} <= names and not any(n.endswith(".jpg") for n in names)


@pytest.mark.slow
def test_visit_rejects_unknown_arguments():
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_visit.sh"), "--dryrun"], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2 and "unknown argument --dryrun" in proc.stdout
