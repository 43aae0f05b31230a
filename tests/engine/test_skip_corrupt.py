"""``fastkd train --skip-corrupt`` (issue 11 item 13): corrupt files are skipped, counted each epoch
in metrics.jsonl and the log; without the flag the error names the file and the flag."""
import shutil

import pytest

from fastkd import cli
from fastkd.engine.metrics import read_metrics


@pytest.fixture
def broken_jpegs(tiny_jpegs, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_jpegs, root)
    victim = sorted((root / "train" / "class1").iterdir())[0]
    victim.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root, victim


ARGS = ["train", "--data-backend", "torch", "--workers", "0", "--image-size", "16", "--batch-size", "8",
        "--student", "fastkd:resnet8", "--method", "ce", "--epochs", "2", "--device", "cpu", "--threads", "1"]


def test_skip_corrupt_counts_each_epoch(broken_jpegs, tmp_path, caplog):
    root, victim = broken_jpegs
    out = tmp_path / "run"
    with caplog.at_level("INFO", logger="fastkd"):
        assert cli.main([*ARGS, "--data", str(root), "--output", str(out), "--skip-corrupt"]) == 0
    epochs = read_metrics(out / "metrics.jsonl", "epoch")
    assert [(r["skipped_files"], r["skipped_files_total"]) for r in epochs] == [(1, 1), (1, 1)]
    assert "skipped 1 corrupt file(s) (1 in all)" in caplog.text


def test_without_the_flag_the_error_names_the_file_and_the_flag(broken_jpegs, tmp_path, caplog):
    root, victim = broken_jpegs
    with caplog.at_level("ERROR", logger="fastkd"):
        assert cli.main([*ARGS, "--data", str(root), "--output", str(tmp_path / "run")]) == 2
    assert victim.name in caplog.text and "--skip-corrupt" in caplog.text
