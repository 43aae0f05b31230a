"""The ``fastkd`` command line: dispatch and check-env."""
import json
import subprocess
import sys

import pytest

from fastkd import cli


def run(*args):
    return subprocess.run([sys.executable, "-m", "fastkd", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
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


@pytest.mark.slow
def test_unknown_command_is_an_error():
    proc = run("distill")
    assert proc.returncode == 2 and "unknown command 'distill'" in proc.stderr


# ---- issue 12 items 2 and 10: one error path, short errors, an instant --version -----------------
BAD = {
    "check-env": ["check-env", "--no-such-flag"],
    "train": ["train", "--data", "/no/such/dir", "--student", "fastkd:resnet8", "--method", "ce", "--device", "cpu"],
    "train-config": ["train", "--data", "/d", "--student", "fastkd:resnet8", "--method", "kd"],
    "demo": ["demo", "--image-size", "0"],
    "analyze": ["analyze", "--data", "/no/such/dir", "--teacher", "nocheckpoint"],
    "bench kernels": ["bench", "kernels", "--shapes", "12by3"],
    "bench data": ["bench", "data", "--backends", "nope"],
    "study capacity": ["study", "capacity", "--seeds", "x,y"],
    "cache build": ["cache", "build", "--data", "/no/such/dir", "--teacher", "fastkd:resnet8",
                    "--teacher-checkpoint", "/no/such.pt", "--output", "/no/such/out"],
    "unknown target": ["bench", "gpus"],
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_invocations_of_every_subcommand_exit_2_with_one_line(case, capsys, caplog, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing a failed command might create lands in the repository
    assert cli.main(BAD[case]) == 2
    err = capsys.readouterr().err + caplog.text
    assert "Traceback" not in err
    assert "error:" in err
    assert list(tmp_path.iterdir()) == []  # and no empty output folder is left behind


@pytest.mark.slow
def test_stderr_of_a_failed_command_is_one_line_and_debug_shows_the_traceback():
    proc = run("train", "--data", "/no/such/dir", "--student", "fastkd:resnet8", "--method", "ce", "--device", "cpu",
               "--threads", "1")
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert errors == ["fastkd train: error: data root '/no/such/dir' does not exist"], proc.stderr
    with pytest.raises(ValueError, match="nocheckpoint"):  # --debug: the exception itself, for its traceback
        cli.main(["analyze", "--data", "/no/such/dir", "--teacher", "nocheckpoint", "--debug"])


def test_an_unknown_flag_is_one_line_with_a_hint(capsys):
    assert cli.main(["train", "--data", "/d", "--student", "fastkd:resnet8", "--learning-rate", "0.1",
                     "--warmpu-epochs=3", "--bs", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[1] == "Run 'fastkd train --help' for the options."
    assert err[0].startswith("fastkd train: error: unrecognized arguments: --learning-rate 0.1 --warmpu-epochs=3 --bs 4")
    assert "--learning-rate -> --lr?, --warmpu-epochs -> --warmup-epochs?, --bs -> --batch-size?" in err[0]


@pytest.mark.slow
def test_version_is_instant_and_imports_no_torch():
    code = ("import sys, runpy; sys.argv = ['fastkd', '--version']\n"
            "try:\n    runpy.run_module('fastkd', run_name='__main__')\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "assert 'torch' not in sys.modules, 'torch imported'\nprint('no torch')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "fastkd 0." in proc.stdout and "no torch" in proc.stdout, proc.stderr


def test_list_presets_prints_one_line_each(capsys):
    from fastkd.engine import config as C

    assert cli.main(["train", "--list-presets"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == C.presets()
    assert all("->" in line or "teacher training" in line for line in lines)


@pytest.mark.parametrize("name", ["bench", "study", "cache"])
def test_a_command_without_its_target_is_one_line_on_stderr(name, capsys):
    # Before: the usage went to stdout (exit code 2, stderr empty).
    assert cli.main([name]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and err.startswith(f"fastkd {name}: error: give a target")
    assert cli.main([name, "--help"]) == 0 and "usage" in capsys.readouterr().out
