"""Two ``torchrun`` agents on this machine as two nodes (``--nnodes 2``, c10d rendezvous on
localhost, one gloo process each), as the README's multi-node command runs them: a node killed
mid-epoch, ``--resume auto`` on both, the same weights as the uninterrupted run; a frozen node
ends the other after ``--dist-timeout``; ranks that see different checkpoints refuse to start."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastkd.engine import checkpoint as ckpt
from fastkd.engine.metrics import read_metrics

pytestmark = pytest.mark.slow

KILL_RUN = str(Path(__file__).with_name("kill_run.py"))
# 64 samples, 8 per rank and step, 2 ranks: 4 steps per epoch, 2 epochs; a checkpoint every 2 steps.
ARGS = ["train", "--data-backend", "synthetic", "--synthetic-samples", "64", "--synthetic-classes", "4",
        "--image-size", "8", "--batch-size", "8", "--student", "fastkd:resnet8", "--method", "ce", "--epochs", "2",
        "--checkpoint-interval", "2", "--lr", "0.05", "--device", "cpu", "--threads", "1", "--workers", "0",
        "--seed", "3", "--log-interval", "1", "--deterministic"]
TOTAL_STEPS = 8
ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list:
    """Processes whose parent is ``pid`` (torchrun's workers run in sessions of their own)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


class Nodes:
    """Two torchrun agents; the first hosts the c10d store (the second starts once it listens).
    ``second`` replaces the second node's entry point (e.g. kill_run.py with a fault)."""

    def __init__(self, folder: Path, args: list, second=None):
        port = _free_port()
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                    "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "fastkd-test",
                    "--max-restarts", "0"]
        self.logs = [folder / "node0.log", folder / "node1.log"]
        self.procs = []
        entries = [["-m", "fastkd"], second or ["-m", "fastkd"]]
        for i, entry in enumerate(entries):
            with open(self.logs[i], "w") as log:
                self.procs.append(subprocess.Popen([*torchrun, *entry, *args], env={**os.environ, **ENV}, stdout=log,
                                                   stderr=subprocess.STDOUT, start_new_session=True))
            if i == 0:
                self._wait_listening(port)

    def _wait_listening(self, port: int) -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and self.procs[0].poll() is None:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise AssertionError("the first torchrun agent never listened:\n" + self.logs[0].read_text()[-3000:])

    def wait(self, i: int, timeout: float = 300) -> int:
        return self.procs[i].wait(timeout=timeout)

    def log(self, i: int) -> str:
        return self.logs[i].read_text()

    def close(self) -> None:
        """Kill whatever is left: each agent's process group and its workers (own sessions)."""
        for p in self.procs:
            if p.poll() is None:
                for child in _children(p.pid):
                    try:
                        os.kill(child, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()


def _run_two_nodes(folder: Path, out: Path, extra=()) -> None:
    nodes = Nodes(folder, [*ARGS, "--output", str(out), *extra])
    try:
        for i in (0, 1):
            assert nodes.wait(i) == 0, nodes.log(i)[-4000:]
    finally:
        nodes.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted two-node run."""
    folder = tmp_path_factory.mktemp("two_nodes_ref")
    _run_two_nodes(folder, folder / "run")
    return folder / "run"


def test_a_node_killed_mid_epoch_then_both_resume_to_the_same_weights(reference, tmp_path):
    out = tmp_path / "run"
    nodes = Nodes(tmp_path, [*ARGS, "--output", str(out)], second=[KILL_RUN, "node:7"])
    try:
        assert nodes.wait(1) == -signal.SIGKILL  # the second node's agent and worker are gone
        assert nodes.wait(0) != 0
    finally:
        nodes.close()
    survivor = nodes.log(0)
    # its worker stops with fastkd's one line (it used to die with gloo's "Connection reset by peer" traceback)
    assert "another rank's process ended during a collective" in survivor, survivor[-4000:]
    assert "fastkd train: error: rank" in survivor and "Connection reset by peer" not in survivor
    assert "exitcode  : 2" in survivor  # a handled error, not a crash
    state = ckpt.load(out / "last.pt")
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 2, 6)  # mid-epoch; step 7 lost

    _run_two_nodes(tmp_path, out, ["--resume", "auto"])
    a, b = ckpt.load(out / "last.pt"), ckpt.load(reference / "last.pt")
    assert a["global_step"] == b["global_step"] == TOTAL_STEPS and a["world_size"] == 2
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"weights differ in {k}"
    for pid, s in b["optimizer"]["state"].items():
        assert torch.equal(a["optimizer"]["state"][pid]["momentum_buffer"], s["momentum_buffer"])
    steps_a, steps_b = read_metrics(out / "metrics.jsonl", "step"), read_metrics(reference / "metrics.jsonl", "step")
    assert [s["global_step"] for s in steps_a] == list(range(1, TOTAL_STEPS + 1))
    assert [s["loss"] for s in steps_a] == [s["loss"] for s in steps_b]


def test_a_stopped_node_ends_the_other_after_the_dist_timeout_in_one_line(tmp_path):
    nodes = Nodes(tmp_path, [*ARGS, "--output", str(tmp_path / "run"), "--dist-timeout", "10"],
                  second=[KILL_RUN, "stopnode:1"])
    try:
        assert nodes.wait(0) != 0  # the live node ends; the frozen one stays frozen until close()
    finally:
        nodes.close()
    survivor = nodes.log(0)
    assert "a collective with the other processes timed out after 10 s (--dist-timeout)" in survivor, survivor[-4000:]
    assert "exitcode  : 2" in survivor and "[rank0]: Traceback" not in survivor


def test_ranks_that_see_different_checkpoints_refuse_to_resume(reference, tmp_path):
    # Nodes without a shared --output: rank 0's folder holds the run, rank 1's is empty. Before,
    # rank 0 resumed at step 8 and rank 1 started from scratch (a hang or a silently mixed run).
    own = [tmp_path / "node0", tmp_path / "node1"]
    own[0].mkdir()
    own[1].mkdir()
    shutil.copy(reference / "last.pt", own[0] / "last.pt")
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = {**os.environ, **ENV, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "fastkd", *ARGS, "--epochs", "3", "--resume", "auto",
                                       "--dist-timeout", "60", "--output", str(own[rank])], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        errs = [p.communicate(timeout=240)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, err) in enumerate(zip(procs, errs)):
        assert p.returncode == 2, err[-3000:]
        assert (f"rank {rank}: the ranks resume from different checkpoints in {own[rank]} (rank 0: global step 8"
                in err and "rank 1: no checkpoint" in err and "Traceback" not in err), err[-3000:]
    assert not (own[1] / "last.pt").exists()
