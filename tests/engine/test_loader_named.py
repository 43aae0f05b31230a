"""Training's accuracies name the loader that read the validation images (records, epoch lines)."""
import logging

import pytest

from fastkd import cli
from fastkd.engine.metrics import read_metrics


@pytest.mark.parametrize("backend, decoder", [("torch", "PIL"), pytest.param("dali", "libjpeg-turbo",
                                                                             marks=pytest.mark.dali)])
def test_epoch_records_and_lines_name_the_loader(backend, decoder, tiny_jpegs, tmp_path, caplog):
    if backend == "dali":
        pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="fastkd"):
        assert cli.main(["train", "--data", str(tiny_jpegs), "--student", "fastkd:resnet8", "--method", "ce",
                         "--epochs", "1", "--batch-size", "16", "--image-size", "16", "--workers",
                         "1" if backend == "dali" else "0", "--data-backend", backend, "--device", "cpu",
                         "--output", str(out)]) == 0
    (record,) = read_metrics(out / "metrics.jsonl", "epoch")
    assert (record["loader"], record["decoder"]) == (backend, decoder)
    lines = [r.getMessage() for r in caplog.records]
    epoch_line = next(m for m in lines if m.startswith("epoch 1/1") and " top1 " in m)
    assert f"top1 {record['val_top1']:.2f}" in epoch_line and f"(val: {backend} loader, {decoder})" in epoch_line
    done = next(r.getMessage() for r in caplog.records if "fastkd train: done" in r.getMessage())
    assert f"best top-1 {record['best_top1']:.2f}% ({backend} loader, {decoder})" in done
