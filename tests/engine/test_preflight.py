"""Presets state their device needs, the CUDA-graph error names the flag that turns it off, and a
missing input file is found before the data is indexed (which takes minutes on a large data set)."""
import argparse
import re

import pytest

from fastkd import cli
from fastkd import train_cli as ecli
from fastkd.engine import config as C


def test_every_preset_states_its_device_needs_in_its_file_and_its_list_line():
    for name in C.presets():
        values = C.load_yaml(name)
        text = C.find_config(name).read_text()
        [comment] = re.findall(r"^# Device: .*$", text, re.M)
        line = ecli.preset_line(name)
        if values.get("teacher_cuda_graph"):
            assert "a CUDA GPU" in comment and "--no-teacher-cuda-graph" in text
            assert line.endswith("device: CUDA GPU (teacher_cuda_graph; --no-teacher-cuda-graph on a CPU)")
        else:
            assert "or a CPU" in comment and line.endswith("device: CPU or CUDA GPU")


def test_a_cuda_graph_preset_on_a_cpu_names_the_flag_that_turns_it_off(tiny_jpegs, tmp_path, caplog):
    from fastkd.engine.trainer import Trainer

    base = ["train", "--config", "imagenet-r50-r18-kd", "--data", str(tiny_jpegs), "--teacher-checkpoint",
            str(tmp_path / "r50.pth"), "--device", "cpu", "--output", str(tmp_path / "run")]
    with caplog.at_level("ERROR", logger="fastkd"):
        assert cli.main(base) == 2
    assert "--teacher-cuda-graph" in caplog.text and "add --no-teacher-cuda-graph" in caplog.text
    parser = argparse.ArgumentParser()
    ecli.add_arguments(parser)
    cfg = C.from_args(parser.parse_args([*base[1:], "--no-teacher-cuda-graph"]))
    assert cfg.teacher_cuda_graph is False
    with pytest.raises(FileNotFoundError, match="--teacher-checkpoint .*r50.pth does not exist"):
        Trainer(cfg).setup()  # past the CUDA-graph check, to the next problem: the missing file


@pytest.fixture
def index_calls(monkeypatch):
    from fastkd.data import index

    calls = []
    original = index.index_image_folder

    def spy(root):
        calls.append(root)
        return original(root)

    monkeypatch.setattr(index, "index_image_folder", spy)
    return calls


TRAIN = ["train", "--data-backend", "torch", "--workers", "0", "--image-size", "16", "--batch-size", "8",
         "--student", "fastkd:resnet8", "--epochs", "1", "--device", "cpu"]


@pytest.mark.parametrize("flags, message", [
    (["--method", "kd", "--teacher", "fastkd:resnet8", "--teacher-checkpoint", "{tmp}/t.pt"],
     "--teacher-checkpoint {tmp}/t.pt does not exist"),
    (["--method", "ce", "--student-checkpoint", "{tmp}/s.pt"], "--student-checkpoint {tmp}/s.pt does not exist"),
    (["--method", "ce", "--resume", "{tmp}/old/last.pt"], "--resume {tmp}/old/last.pt does not exist"),
    (["--method", "ce", "--student-checkpoint", "{tmp}"], "--student-checkpoint {tmp} is a folder"),
    (["--method", "kd", "--teacher-cache", "{tmp}/cache"], "--teacher-cache {tmp}/cache does not exist"),
    (["--method", "kd", "--teacher-cache", "{tmp}"], "--teacher-cache {tmp} is not a teacher cache"),
])
def test_missing_input_files_are_found_before_the_data_is_indexed(tiny_jpegs, tmp_path, caplog, index_calls,
                                                                   flags, message):
    flags = [f.format(tmp=tmp_path) for f in flags]
    with caplog.at_level("ERROR", logger="fastkd"):
        assert cli.main([*TRAIN, *flags, "--data", str(tiny_jpegs), "--output", str(tmp_path / "run")]) == 2
    assert message.format(tmp=tmp_path) in caplog.text
    assert index_calls == []  # refused before indexing
    assert not (tmp_path / "run").exists()  # and before creating the output folder


def test_cache_build_checks_the_teacher_checkpoint_before_indexing(tiny_jpegs, tmp_path, caplog, index_calls):
    with caplog.at_level("ERROR", logger="fastkd"):
        assert cli.main(["cache", "build", "--data", str(tiny_jpegs), "--data-backend", "torch", "--teacher",
                         "fastkd:resnet8", "--teacher-checkpoint", str(tmp_path / "t.pt"), "--image-size", "16",
                         "--workers", "0", "--device", "cpu", "--epochs", "1", "--output", str(tmp_path / "c")]) == 2
    assert f"--teacher-checkpoint {tmp_path / 't.pt'} does not exist" in caplog.text and index_calls == []
