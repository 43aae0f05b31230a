"""``fastkd analyze`` end to end: tiny ResNet checkpoints on real digit JPEGs, every output file,
and numbers that match an independent pass over the same images."""
import csv
import json
import math

import pytest
import torch

from fastkd import cli
from fastkd.analysis import metrics as M
from fastkd.analysis.cli import parse_teacher
from fastkd.analysis.report import format_report, write_outputs

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def digits(digits_root):
    return digits_root


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two resnet8 teachers: one trained a few steps (not uniform), one at random init; saved as a
    fastkd checkpoint dict and as a bare state_dict."""
    from fastkd.models import create_model

    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    a = create_model("fastkd:resnet8", num_classes=10)
    opt = torch.optim.SGD(a.parameters(), lr=0.1)
    x, y = torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,))
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(a(x), y).backward()
        opt.step()
    torch.save({"model": a.state_dict(), "epoch": 3}, d / "early.pt")
    torch.manual_seed(1)
    torch.save(create_model("fastkd:resnet8", num_classes=10).state_dict(), d / "init.pt")
    return d / "early.pt", d / "init.pt"


def test_parse_teacher():
    s = parse_teacher("fastkd:resnet8:/tmp/a:b.pt")
    assert (s.label, s.model, str(s.checkpoint)) == ("resnet8", "fastkd:resnet8", "/tmp/a:b.pt")
    s = parse_teacher("big=timm:resnet50:r50.pth")
    assert (s.label, s.model, str(s.checkpoint)) == ("big", "timm:resnet50", "r50.pth")
    with pytest.raises(ValueError, match="NAME:CHECKPOINT"):
        parse_teacher("resnet8.pt")


def test_analyze_writes_every_file_with_the_right_numbers(digits, checkpoints, tmp_path, capsys):
    early, init = checkpoints
    out = tmp_path / "report"
    rc = cli.main(["analyze", "--data", str(digits), "--teacher", f"fastkd:resnet8:{early}",
                   "--teacher", f"fastkd:resnet8:{init}", "--temperatures", "1,4", "--ats", "4,2",
                   "--image-size", "16", "--batch-size", "64", "--data-backend", "torch", "--workers", "0",
                   "--device", "cpu", "--output", str(out)])
    assert rc == 0
    names = {p.name for p in out.iterdir()}
    assert names == {"metrics.json", "metrics.csv", "pairs.csv", "report.md", "affinity.png",
                     "ats_label_on_top_resnet8_early.png", "ats_label_on_top_resnet8_init.png"} | {
        f"temperature_{m}.png" for m in M.METRICS}
    for name in names:
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == PNG

    res = json.loads((out / "metrics.json").read_text())
    labels = ["resnet8@early", "resnet8@init"]
    assert list(res["teachers"]) == labels
    assert [p["a"] for p in res["pairs"]] == ["resnet8@early"]

    # An independent pass: the same images through the same weights, metrics on the whole set.
    from fastkd.data import create_loader
    from fastkd.models import create_model, load_weights

    loader = create_loader(digits, train=False, batch_size=50, image_size=16, backend="torch", num_threads=0,
                           device="cpu")
    logits = {k: [] for k in labels}
    ys = []
    models = {}
    for k, path in zip(labels, (early, init)):
        models[k] = load_weights(create_model("fastkd:resnet8", num_classes=10), path).eval()
    with torch.no_grad():
        for batch in loader:
            ys.append(batch.labels)
            for k in labels:
                logits[k].append(models[k](batch.images))
    y = torch.cat(ys)
    logits = {k: torch.cat(v) for k, v in logits.items()}
    assert res["teachers"][labels[0]]["num_samples"] == len(y) == loader.num_samples
    for k in labels:
        got = res["teachers"][k]
        assert got["accuracy"] == pytest.approx((logits[k].argmax(1) == y).double().mean().item())
        for sl in (M.SoftLabel(temperature=1.0), M.SoftLabel(temperature=4.0),
                   M.SoftLabel(tau_target=4.0, tau_other=2.0)):
            want = M.wrong_class_stats(logits[k], y, sl)
            for m in M.METRICS:
                assert got["settings"][sl.name][m] == pytest.approx(want[m].mean().item(), rel=1e-4, abs=1e-12)
    pair = res["pairs"][0]
    rho = M.wrong_class_spearman(logits[labels[0]], logits[labels[1]], y)
    assert pair["spearman"] == pytest.approx(rho.nanmean().item(), rel=1e-4, abs=1e-6)
    assert pair["top1_agreement"] == pytest.approx(
        M.top1_agreement(logits[labels[0]], logits[labels[1]]).double().mean().item())

    # CSV: one row per teacher and soft label; pairs: one row.
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["teacher"], r["soft_label"]) for r in rows] == [(k, s) for k in labels for s in ("T=1", "T=4", "ATS(4,2)")]
    assert float(rows[1]["wrong_std"]) == pytest.approx(res["teachers"][labels[0]]["settings"]["T=4"]["wrong_std"])
    with (out / "pairs.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 1
    report = (out / "report.md").read_text()
    assert "resnet8@early" in report and "ATS(4,2)" in report
    printed = capsys.readouterr().out
    assert "wrong-class Spearman" in printed and "wrote 12 files" in printed
    # the ATS regime diagnostic: per teacher, the label-on-top fraction over the default grid
    for k in labels:
        got = res["teachers"][k]["ats_label_on_top"]
        assert len(got) == 30
        for key in ("4,2", "1,1", "6,1"):
            a, b = (float(t) for t in key.split(","))
            assert got[key] == pytest.approx(M.ats_label_on_top(logits[k], y, a, b).double().mean().item())
        assert set(res["teachers"][k]["wrong_target_ratio"]) == {"q05", "q25", "q50", "q75", "q95", "mean",
                                                                 "nonpositive_target"}
    assert "ATS regime" in report and "tau1 \\ tau2" in report


@pytest.fixture(scope="module")
def trained_run(digits, tmp_path_factory):
    """A 1-epoch ``fastkd train`` run at 16 px: its checkpoint records image size and classes."""
    from fastkd.engine.config import make_config
    from fastkd.engine.trainer import train

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("run") / "t"
        result = train(make_config(data=str(digits), student="fastkd:resnet8", method="ce", epochs=1, batch_size=64,
                                   image_size=16, lr=0.1, workers=0, device="cpu", data_backend="torch",
                                   output=str(out)))
    finally:
        torch.set_num_threads(before)
    return out, result["final"]


def test_analyze_reads_the_image_size_from_the_checkpoint(digits, trained_run, tmp_path, caplog):
    run, final = trained_run
    base = ["analyze", "--data", str(digits), "--teacher", f"fastkd:resnet8:{run / 'last.pt'}", "--device", "cpu",
            "--no-plots", "--data-backend", "torch", "--workers", "0", "--ats-grid", "4:2"]
    assert cli.main(base + ["--output", str(tmp_path / "a")]) == 0  # no --image-size
    res = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert res["config"]["image_size"] == 16
    # the same accuracy as training's own validation of that checkpoint
    assert 100 * res["teachers"]["resnet8"]["accuracy"] == pytest.approx(final["val_top1"], abs=1e-9)
    assert list(res["teachers"]["resnet8"]["ats_label_on_top"]) == ["4,2"]
    with caplog.at_level("WARNING", logger="fastkd"):
        assert cli.main(base + ["--image-size", "24", "--output", str(tmp_path / "b")]) == 0
    assert "--image-size 24 differs from the 16" in caplog.text


def test_analyze_refuses_data_of_another_class_count(digits, trained_run, tmp_path):
    import shutil

    run, _ = trained_run
    three = tmp_path / "three"
    for c in sorted(p.name for p in (digits / "val").iterdir())[:3]:
        shutil.copytree(digits / "val" / c, three / c)
    base = ["analyze", "--teacher", f"fastkd:resnet8:{run / 'last.pt'}", "--device", "cpu", "--no-plots",
            "--data-backend", "torch", "--workers", "0", "--output", str(tmp_path / "o"), "--debug"]
    with pytest.raises(ValueError, match="trained on 10 classes, --data .* holds 3"):
        cli.main(base + ["--data", str(three)])
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        cli.main(base + ["--data", str(tmp_path / "no-such-folder")])
    # without --debug: one line and exit code 2
    assert cli.main([a for a in base if a != "--debug"] + ["--data", str(three)]) == 2


def test_analyze_names_bad_input(digits, checkpoints, tmp_path):
    early, _ = checkpoints
    base = ["analyze", "--data", str(digits), "--image-size", "16", "--device", "cpu", "--no-plots",
            "--output", str(tmp_path), "--debug"]  # --debug: the exceptions themselves (else exit code 2)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        cli.main(base + ["--teacher", f"fastkd:resnet8:{tmp_path / 'missing.pt'}"])
    with pytest.raises(ValueError, match="NAME:CHECKPOINT"):
        cli.main(base + ["--teacher", str(early)])
    with pytest.raises(ValueError, match="ambiguous"):
        cli.main(base + ["--teacher", f"a=fastkd:resnet8:{early}", "--teacher", f"a=fastkd:resnet8:{early}"])
    with pytest.raises(ValueError, match="weights do not fit"):  # a resnet8 checkpoint is no resnet8x4
        cli.main(base + ["--teacher", f"fastkd:resnet8x4:{early}", "--data-backend", "torch", "--workers", "0"])


def test_single_teacher_and_undefined_spearman_in_reports(tmp_path):
    v = torch.tensor([[3.0, 1.0, 1.0, 1.0], [0.0, 2.0, 1.0, 3.0]])
    y = torch.tensor([0, 3])
    meter = M.TeacherMeter([M.SoftLabel(temperature=1.0)])
    meter.update(v, y)
    pair = M.PairMeter()
    pair.update(v, v.flip(1), y)
    res = {"teachers": {"only": meter.result()}, "pairs": []}
    written = write_outputs(res, tmp_path / "one")
    assert {p.name for p in written} == {"metrics.json", "metrics.csv", "pairs.csv", "report.md"} | {
        f"temperature_{m}.png" for m in M.METRICS}
    # a pair whose Spearman is undefined on one row and its value on the other
    p = pair.result()
    assert p["spearman_undefined"] == 1 and not math.isnan(p["spearman"])
    both = {"teachers": {"a": meter.result(), "b": meter.result()}, "pairs": [{"a": "a", "b": "b", **p}]}
    assert "1 (1)" in format_report(both)
    both["pairs"][0]["spearman"] = math.nan  # no row had a defined Spearman
    assert "n/a" in format_report(both)
    write_outputs(both, tmp_path / "two", plots=False)
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["pairs"][0]["spearman"] is None


def test_plots_and_the_digits_are_part_of_the_base_install():
    """issue 12 item 3: the README's `pip install -e .` must run `fastkd analyze` (plots) and the study."""
    import pathlib
    import tomllib

    root = pathlib.Path(__file__).resolve().parents[2]
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split(";")[0].split(">")[0].split("=")[0].strip().lower() for d in deps}
    assert {"matplotlib", "mlxtend"} <= names

@pytest.mark.gpu
def test_analyze_on_cuda(digits, checkpoints, tmp_path):
    """The CUDA path (GPU JPEG decoding, teachers on the GPU) against a pass over the same loader."""
    from fastkd.data import create_loader
    from fastkd.models import create_model, load_weights

    early, init = checkpoints
    out = tmp_path / "gpu"
    assert cli.main(["analyze", "--data", str(digits), "--teacher", f"a=fastkd:resnet8:{early}", "--teacher",
                     f"b=fastkd:resnet8:{init}", "--image-size", "16", "--data-backend", "torch", "--device", "cuda",
                     "--output", str(out)]) == 0
    res = json.loads((out / "metrics.json").read_text())
    assert res["config"]["device"] == "cuda"
    loader = create_loader(digits, train=False, batch_size=128, image_size=16, backend="torch", device="cuda")
    models = [load_weights(create_model("fastkd:resnet8", num_classes=10), p).cuda().eval() for p in (early, init)]
    with torch.no_grad():
        batches = [(b.labels, [m(b.images) for m in models]) for b in loader]
    y = torch.cat([b[0] for b in batches])
    for i, k in enumerate("ab"):
        logits = torch.cat([b[1][i] for b in batches])
        want = M.wrong_class_stats(logits, y, M.SoftLabel(temperature=4.0))["wrong_entropy"].mean().item()
        assert res["teachers"][k]["settings"]["T=4"]["wrong_entropy"] == pytest.approx(want, rel=1e-3)
        assert res["teachers"][k]["accuracy"] == pytest.approx((logits.argmax(1) == y).double().mean().item(),
                                                               abs=2 / len(y))


def test_analyze_names_the_workers_flag(tmp_path):
    # Before: "num_threads must be a non-negative integer, got -1" from inside the loader.
    with pytest.raises(ValueError, match="^--workers must be >= 0, got -1"):
        cli.main(["analyze", "--data", str(tmp_path), "--teacher", f"fastkd:resnet8:{tmp_path / 'x.pt'}",
                  "--workers", "-1", "--device", "cpu", "--output", str(tmp_path / "out"), "--debug"])
