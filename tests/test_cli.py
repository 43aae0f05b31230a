"""The ``fastkd`` command line: dispatch and check-env."""
import json
import subprocess
import sys

from fastkd import cli


def run(*args):
    return subprocess.run([sys.executable, "-m", "fastkd", *args], capture_output=True, text=True, timeout=120)


def test_check_env_reports_and_exits_zero():
    proc = run("check-env")
    assert proc.returncode == 0, proc.stderr
    for word in ("torch", "triton", "DALI", "apex", "timm", "torchvision", "GPU"):
        assert word in proc.stdout


def test_check_env_json(capsys):
    assert cli.main(["check-env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["torch"] and isinstance(info["cuda_available"], bool)
    assert "triton_mode" in info and "dali_gpu_decode" in info


def test_help_lists_every_command(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


def test_unknown_command_is_an_error():
    proc = run("distill")
    assert proc.returncode == 2 and "unknown command 'distill'" in proc.stderr
