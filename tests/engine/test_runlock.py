"""One run per --output: a second run on a busy folder is refused naming the holder's PID, a lock
left by a killed run is taken over with a warning, and a cache folder is no run's --output."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastkd import cli
from fastkd.engine.runlock import LOCK_NAME, FolderBusyError, FolderLock
from fastkd.engine.metrics import read_metrics

ARGS = ["train", "--data-backend", "synthetic", "--synthetic-samples", "64", "--synthetic-classes", "4",
        "--image-size", "8", "--batch-size", "16", "--student", "fastkd:resnet8", "--method", "ce", "--epochs", "1",
        "--device", "cpu", "--seed", "3", "--threads", "1", "--log-interval", "1"]
KILL_RUN = str(Path(__file__).with_name("kill_run.py"))


def _errors(caplog):
    return [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


def test_a_second_run_on_a_locked_folder_is_refused_naming_the_pid(tmp_path, caplog):
    out = tmp_path / "run"
    with FolderLock(out, "run folder"):  # another open file: flock conflicts as with another process
        assert cli.main([*ARGS, "--output", str(out)]) == 2
    errors = _errors(caplog)
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert f"is in use by another fastkd process (PID {os.getpid()})" in errors[0]
    assert not (out / "metrics.jsonl").exists() and not (out / "config.yaml").exists()
    # released: the folder trains, and a clean run leaves no lock file behind
    assert cli.main([*ARGS, "--output", str(out)]) == 0
    assert not (out / LOCK_NAME).exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK_NAME).write_text(f"{dead.pid}\n")
    caplog.set_level("INFO", logger="fastkd")
    assert cli.main([*ARGS, "--output", str(out)]) == 0
    assert f"took over the lock left by PID {dead.pid}" in caplog.text
    assert read_metrics(out / "metrics.jsonl", "epoch")


def test_lock_is_exclusive_between_open_files_and_released(tmp_path):
    a = FolderLock(tmp_path / "f", "run folder").acquire()
    assert (tmp_path / "f" / LOCK_NAME).read_text().strip() == str(os.getpid())
    with pytest.raises(FolderBusyError, match=f"PID {os.getpid()}"):
        FolderLock(tmp_path / "f", "run folder").acquire()
    a.release()
    a.release()  # idempotent
    with FolderLock(tmp_path / "f", "run folder") as b:
        assert b.held
    assert not (tmp_path / "f" / LOCK_NAME).exists()


def test_a_cache_folder_is_refused_as_a_runs_output(tmp_path, caplog):
    cache = tmp_path / "cache"
    cache.mkdir()
    manifest = {"version": "fastkd-cache/1", "epochs_done": []}
    (cache / "manifest.json").write_text(json.dumps(manifest))
    assert cli.main([*ARGS, "--output", str(cache)]) == 2
    errors = _errors(caplog)
    assert len(errors) == 1 and f"--output {cache} is a teacher cache" in errors[0], errors
    assert sorted(p.name for p in cache.iterdir()) == ["manifest.json"]


@pytest.mark.slow
def test_a_live_run_refuses_a_second_and_its_lock_dies_with_it(tmp_path, run_fastkd):
    """A real concurrent run (stopped mid-epoch with SIGSTOP) holds its folder: a second run is
    refused naming its PID; after kill -9 the resume takes the lock over and finishes."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen([sys.executable, KILL_RUN, "stop:2", *ARGS, "--output", str(out),
                              "--checkpoint-interval", "1"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait until it stops itself after step 2
            with open(f"/proc/{first.pid}/stat") as fh:
                if fh.read().split(")")[-1].split()[0] == "T":
                    break
            time.sleep(0.2)
        else:
            pytest.fail("the first run never reached step 2")
        second = run_fastkd([*ARGS, "--output", out, "--resume", "auto"])
        assert second.returncode == 2
        lines = [ln for ln in second.stderr.splitlines() if "error" in ln]
        assert lines == [f"fastkd train: error: the run folder {out} is in use by another fastkd process "
                         f"(PID {first.pid}): wait for it to end, or choose another --output"], second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    third = run_fastkd([*ARGS, "--output", out, "--resume", "auto"])
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"took over the lock left by PID {first.pid}" in third.stderr
    assert [r["global_step"] for r in read_metrics(out / "metrics.jsonl", "step")] == [1, 2, 3, 4]
