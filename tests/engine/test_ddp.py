"""DDP with two gloo processes (torchrun): validation counted exactly as one process counts it."""
import pytest
import torch

from fastkd.data import create_loader
from fastkd.engine.metrics import read_metrics
from fastkd.engine.runner import TeacherRunner
from fastkd.engine.trainer import evaluate
from fastkd.models import create_model, load_weights


def test_two_gloo_processes_count_validation_like_one(tiny_jpegs, tmp_path, run_fastkd):
    torch.manual_seed(5)
    teacher_path = tmp_path / "teacher.pt"
    torch.save(create_model("fastkd:resnet8", 3).state_dict(), teacher_path)
    out = tmp_path / "ddp"
    proc = run_fastkd(["--standalone", "--nproc_per_node", "2", "-m", "fastkd", "train", "--data", tiny_jpegs,
                       "--student", "fastkd:resnet8", "--teacher", "fastkd:resnet8", "--teacher-checkpoint",
                       teacher_path, "--method", "kd", "--epochs", "1", "--batch-size", "4", "--image-size", "16",
                       "--device", "cpu", "--workers", "0", "--data-backend", "torch", "--output", out],
                      module=("-m", "torch.distributed.run"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "world_size: 2" in (out / "config.yaml").read_text()
    record = read_metrics(out / "metrics.jsonl", "epoch")[-1]
    # 31 training and 13 validation images over 2 shards: one padded row each, not counted
    assert record["train_samples"] == 31 and record["val_samples"] == 13

    # One process, the same weights, the whole validation set.
    student = load_weights(create_model("fastkd:resnet8", 3), out / "last.pt")
    teacher = TeacherRunner(load_weights(create_model("fastkd:resnet8", 3), teacher_path), torch.device("cpu"))
    loader = create_loader(tiny_jpegs, train=False, batch_size=4, image_size=16, backend="torch", num_threads=0,
                           device="cpu")
    single = evaluate(student, loader, torch.device("cpu"), teacher=teacher)
    for key in ("val_samples", "val_correct_top1", "val_correct_top5", "teacher_correct_top1", "agreement"):
        assert single[key] == record[key], key
    assert abs(single["kl"] - record["kl"]) < 1e-6


def test_the_collective_timeout_reaches_the_process_group(monkeypatch):
    # issue 11 item 15: a stopped rank blocked the others for gloo's default 30 minutes
    import datetime

    import torch.distributed as dist

    from fastkd.engine import distributed as D

    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: seen.update(kw))
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    info = D.init("cpu", timeout_s=42.5)
    assert info.world_size == 2 and seen["backend"] == "gloo"
    assert seen["timeout"] == datetime.timedelta(seconds=42.5)
    seen.clear()
    D.init("cpu")
    assert seen["timeout"] == datetime.timedelta(seconds=D.DEFAULT_TIMEOUT_S)


@pytest.mark.slow
def test_a_stopped_rank_ends_the_run_after_the_dist_timeout(tmp_path):
    # issue 11 item 15, end to end: rank 1 is SIGSTOPped after its first step; rank 0 must fail
    # after --dist-timeout seconds (gloo's default would block it for 30 minutes)
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kill_run = str(Path(__file__).with_name("kill_run.py"))
    args = ["train", "--data-backend", "synthetic", "--synthetic-samples", "256", "--synthetic-classes", "4",
            "--image-size", "8", "--batch-size", "8", "--student", "fastkd:resnet8", "--method", "ce",
            "--epochs", "1", "--device", "cpu", "--threads", "1", "--dist-timeout", "3",
            "--output", str(tmp_path / "run")]
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, kill_run, "stop:1", *args] if rank == 1 else [sys.executable, "-m", "fastkd", *args]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        t0 = time.monotonic()
        _, err = procs[0].communicate(timeout=120)
        waited = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()
    assert procs[0].returncode != 0, err[-3000:]
    assert "timed out after 3 s (--dist-timeout)" in err and "Traceback" not in err, err[-3000:]
    assert procs[0].returncode == 2
    assert waited < 90


def test_a_finished_run_leaves_no_reducer_for_interpreter_exit(tmp_path, run_fastkd):
    """When 'train' returns on a rank, its DDP wrapper (and the reducer holding gloo's threads) is
    gone already: left to interpreter finalisation, it could abort a rank that had finished (a
    SIGABRT once seen in CI after a two-process cached run)."""
    script = tmp_path / "train_then_count.py"
    script.write_text(
        "import gc, sys\n"
        "from fastkd import cli\n"
        "rc = cli.main(sys.argv[1:])\n"
        "alive = sum(type(o).__name__ == 'DistributedDataParallel' for o in gc.get_objects())\n"
        "print(f'ddp-alive={alive}', flush=True)\n"
        "sys.exit(rc)\n")
    args = ["train", "--data-backend", "synthetic", "--synthetic-samples", "32", "--synthetic-classes", "4",
            "--image-size", "8", "--batch-size", "8", "--student", "fastkd:resnet8", "--method", "ce",
            "--epochs", "1", "--device", "cpu", "--threads", "1", "--output", tmp_path / "run"]
    proc = run_fastkd(["--standalone", "--nproc_per_node", "2", script, *args], module=("-m", "torch.distributed.run"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("ddp-alive=0") == 2, proc.stdout[-2000:]
