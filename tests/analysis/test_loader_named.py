"""Every accuracy names the loader (and decoder) that read the images: DALI and PIL decode and
resize slightly differently, so numbers from different loaders differ in the last tenths."""
import csv
import json

import pytest
import torch

from fastkd import cli


@pytest.fixture(autouse=True)
def _one_math_thread(one_thread):
    """One math thread (the root conftest's ``one_thread``)."""


@pytest.fixture(scope="module")
def digits_and_teacher(tmp_path_factory):
    from fastkd.data import make_digits_imagefolder
    from fastkd.models import create_model

    root = make_digits_imagefolder(tmp_path_factory.mktemp("digits") / "d", size=16)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "t.pt"
    torch.save(create_model("fastkd:resnet8", num_classes=10).state_dict(), path)
    return root, path


@pytest.mark.parametrize("backend, decoder", [("torch", "PIL"), pytest.param("dali", "libjpeg-turbo",
                                                                             marks=pytest.mark.dali)])
def test_analyze_names_the_loader_beside_the_accuracy(backend, decoder, digits_and_teacher, tmp_path, capsys):
    # Before: the report said "accuracy" with no word of the loader (DALI 93.9 % vs the demo's 94.2 %).
    if backend == "dali":
        pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
    root, ckpt = digits_and_teacher
    out = tmp_path / "a"
    assert cli.main(["analyze", "--data", str(root), "--teacher", f"fastkd:resnet8:{ckpt}", "--image-size", "16",
                     "--data-backend", backend, "--workers", "1" if backend == "dali" else "0", "--device", "cpu",
                     "--no-plots", "--ats", "none", "--ats-grid", "none", "--output", str(out)]) == 0
    named = f"accuracy ({backend} loader, {decoder})"
    assert named in capsys.readouterr().out and named in (out / "report.md").read_text()
    res = json.loads((out / "metrics.json").read_text())
    assert (res["config"]["loader"], res["config"]["decoder"]) == (backend, decoder)
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows and all((r["loader"], r["decoder"]) == (backend, decoder) for r in rows)
