"""``fastkd bench kernels`` (fastkd/bench/kernels.py): the parts that run without a GPU.

The timing itself needs CUDA (benchmarks/gpu_visit.sh runs it); here: every compared
implementation (fastkd's and the plain fp32 baselines a competent user writes, for every
method) computes the same loss and gradient as the fp64 reference, so the table compares like
with like; the dry run end to end on the CPU; the rows' commit; the results files; the clear
exits.
"""
import argparse
import json

import pytest
import torch

from fastkd.bench import common
from fastkd.bench import kernels as bk
from fastkd.errors import UsageError
from fastkd.losses import reference as ref

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def _exact(method, z, v, y, params, ce_w=0.5, kd_w=0.5):
    zd, vd = z.detach().double().requires_grad_(True), v.double()
    if method == "dist":
        kd = ref.dist(zd, vd, **params)
    else:
        kd = ref.kd_term_rows(method, zd, vd, y, **params).mean()
    loss = ce_w * ref.cross_entropy(zd, y).mean() + kd_w * kd
    (g,) = torch.autograd.grad(loss, zd)
    return loss.detach(), g


@pytest.mark.parametrize("impl", ["fastkd", "eager"])
@pytest.mark.parametrize("method", bk.METHODS)
def test_benchmarked_implementations_compute_the_reference(method, impl, device):
    T = 2.0 if "temperature" in bk.method_params(method) else None
    fn = bk.build_impls(method, T, 0.5, 0.5, [impl])[impl][0]
    z, v, y = bk.make_inputs(6, 300, torch.float32, device=device)
    loss, g = bk.fwd_bwd(fn, z, v, y, torch.ones((), device=device))
    params = bk.method_params(method, T)
    exact_loss, exact_g = _exact(method, z.cpu(), v.cpu(), y.cpu(), params)
    torch.testing.assert_close(loss.double().cpu(), exact_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.double().cpu(), exact_g, rtol=1e-4, atol=1e-7)


def test_every_method_of_the_table_is_benchmarked_with_a_plain_baseline():
    from fastkd.losses.methods import METHOD_TABLE

    assert set(bk.METHODS) == set(METHOD_TABLE) - {"ce"} and set(bk.PLAIN) == set(bk.METHODS)


@pytest.mark.parametrize("method", [m for m in bk.METHODS if m not in ("dist", "jsd", "rkl")])  # no split variant
def test_split_row_benchmark_row_computes_the_reference(method, device):
    """The `fastkd-split` row really takes the split path (a small forced slice) and is exact."""
    from fastkd.kernels import _launch as L

    T = 2.0 if method in ("kd", "dkd") else None
    cfg = {"max_single": 128, "slice": 128}
    assert L.plan(300, method, L.LaunchConfig(**cfg, split=True), N=6).path == "split"
    fn = bk.build_impls(method, T, 0.5, 0.5, ["fastkd-split"], config=cfg)["fastkd-split"][0]
    z, v, y = bk.make_inputs(6, 300, torch.float32, device=device)
    loss, g = bk.fwd_bwd(fn, z, v, y, torch.ones((), device=device))
    exact_loss, exact_g = _exact(method, z.cpu(), v.cpu(), y.cpu(), bk.method_params(method, T))
    torch.testing.assert_close(loss.double().cpu(), exact_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.double().cpu(), exact_g, rtol=1e-4, atol=1e-7)


def test_plain_baselines_use_the_methods_defaults():
    assert bk.method_params("dkd") == {"alpha": 1.0, "beta": 8.0, "temperature": 4.0}
    assert bk.method_params("dkd", 2.0)["temperature"] == 2.0
    assert bk.method_params("ats", 2.0) == {"tau_target": 4.0, "tau_other": 2.0, "student_temperature": 1.0}
    assert len(bk.method_params("isats")["candidates"]) == 16


def test_parse_shapes():
    assert bk.parse_shapes("256x1000, 4096X32000") == [(256, 1000), (4096, 32000)]
    for bad in ("256x1", "x100", "256x300000", "12"):
        with pytest.raises(ValueError, match="bad shape"):
            bk.parse_shapes(bad)


def test_parse_impls():
    assert bk.parse_impls("fastkd, liger") == ["fastkd", "liger-kl", "liger-jsd"]
    assert bk.parse_impls("compile,eager,compile") == ["compile", "eager"]
    with pytest.raises(ValueError, match="unknown implementation"):
        bk.parse_impls("fastkd,apex")


def test_parse_config():
    assert bk.parse_config("chunk=2048, warps=4,prefetch=1") == {"chunk": 2048, "warps": 4, "prefetch": True}
    assert bk.parse_config("split=1,slice=4096,slice_warps=8") == {"split": True, "slice": 4096, "slice_warps": 8}
    assert bk.parse_config(None) == {}
    with pytest.raises(ValueError, match="bad --config item"):
        bk.parse_config("chunks=2048")


def _args(**kw):
    parser = argparse.ArgumentParser()
    bk.add_arguments(parser)
    args = parser.parse_args([])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def test_sweep_covers_the_chunked_and_the_split_path(device, monkeypatch):
    assert {c["split"] for c in bk.SWEEP} == {False, True}
    monkeypatch.setattr(bk, "SWEEP", [{"split": False, "chunk": 2048}, {"split": True, "slice": 4096}])
    z, v, y = bk.make_inputs(3, 9000, torch.float32, device=device)  # above one block: the sweep applies
    built = []

    def fn_for(cfg):
        fn = bk.build_impls("kd", None, 0.5, 0.5, ["fastkd"], config=cfg)["fastkd"][0]
        loss, _ = bk.fwd_bwd(fn, z, v, y, torch.ones((), device=device))
        built.append(float(loss.detach()))
        return fn

    rows = bk.sweep_configs(fn_for, z, v, y, 1, 1)
    assert [("ms" in r, r["split"]) for r in rows] == [(True, False), (True, True)]
    exact_loss, _ = _exact("kd", z.cpu(), v.cpu(), y.cpu(), {"temperature": 1.0})
    assert all(abs(x - float(exact_loss)) < 1e-4 for x in built)  # each configuration computes the loss


def test_bad_arguments_are_usage_errors():
    # fastkd.cli turns a UsageError into one line on stderr and exit code 2
    for kw, message in ((dict(shapes="256y1000"), "bad shape"), (dict(impls="fastkd,apex"), "unknown implementation"),
                        (dict(config="chunk=3000"), "power of two")):
        with pytest.raises(UsageError, match=message):
            bk.main(_args(**kw))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_without_gpu_says_so():
    with pytest.raises(UsageError, match="needs a CUDA GPU.*--dry-run"):
        bk.main(_args())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU check")
def test_dry_run_measures_every_row_and_records_the_commit(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert bk.main(_args(dry_run=True, shapes="4x50", commit="abc1234", json=str(out), save=True,
                         results_dir=str(tmp_path))) == 0
    text = capsys.readouterr().out
    assert "DRY RUN" in text and "commit abc1234" in text
    data = json.loads(out.read_text())
    assert "partial" not in data  # the per-shape checkpoints are replaced by the full file at the end
    rows = {r["impl"]: r for r in data["rows"]}
    assert set(rows) == {"fastkd", "fastkd-split", "eager", "compile"}  # liger is not installed here
    assert set(data["skipped"]) == {"liger-kl", "liger-jsd"} and "not installed" in data["skipped"]["liger-jsd"]
    assert all(r["commit"] == "abc1234" and r["dry_run"] for r in rows.values())
    assert rows["eager"]["vs_eager"] == 1.0 and rows["compile"]["vs_compile"] == 1.0
    losses = [r["loss"] for r in rows.values()]
    assert max(losses) - min(losses) < 1e-4
    md = next(tmp_path.glob("kernels-*.md")).read_text()
    assert "commit abc1234" in md and "liger-jsd: not measured: liger_kernel is not installed" in md


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU check")
def test_several_methods_in_one_run(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert bk.main(_args(dry_run=True, method="ats,dkd", impls="fastkd,eager", shapes="4x50", json=str(out))) == 0
    rows = json.loads(out.read_text())["rows"]
    assert sorted((r["method"], r["impl"]) for r in rows) == [("ats", "eager"), ("ats", "fastkd"),
                                                               ("dkd", "eager"), ("dkd", "fastkd")]
    for m in ("ats", "dkd"):
        a, b = (r["loss"] for r in rows if r["method"] == m)
        assert abs(a - b) < 1e-4
    with pytest.raises(UsageError, match="unknown method"):
        bk.main(_args(method="ats,kdd"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU check")
def test_a_stopped_run_leaves_the_rows_it_measured(tmp_path, monkeypatch):
    measure = bk.measure

    def measure_until_the_second_shape(fn, z, *a):
        if z.shape[0] == 5:
            raise KeyboardInterrupt  # stands for the visit's timeout killing the process
        return measure(fn, z, *a)

    monkeypatch.setattr(bk, "measure", measure_until_the_second_shape)
    out = tmp_path / "rows.json"
    with pytest.raises(KeyboardInterrupt):
        bk.main(_args(dry_run=True, impls="eager", shapes="4x50,5x50", json=str(out)))
    data = json.loads(out.read_text())
    assert data["partial"] and [(r["N"], r["impl"]) for r in data["rows"]] == [(4, "eager")]


def test_liger_rows_only_for_kd():
    skipped = {}
    bk.build_impls("dkd", None, 0.5, 0.5, ["eager", "liger-jsd"], skipped=skipped)
    assert skipped == {"liger-jsd": "Liger rows are for --method kd only"}


def test_source_commit(tmp_path):
    assert common.source_commit("deadbee") == "deadbee"
    assert common.source_commit(None, root=tmp_path) == "unknown"  # not a git checkout
    here = common.source_commit()
    assert here == "unknown" or len(here.split("+")[0]) == 7


def test_save_appends_rows(tmp_path):
    env = {"gpu": "NVIDIA H100 80GB HBM3", "date": "2026-01-01 00:00 UTC", "torch": "2.11", "cuda": "13.0",
           "triton": "3.6.0", "fastkd": "0.1.0", "liger_kernel": None, "python": "3.12", "commit": "abc1234"}
    row = {"N": 4, "C": 10, "impl": "fastkd", "note": "fused", "method": "kd", "dtype": "bf16",
           "params": {"temperature": 1.0}, "ms": 0.01, "graph_ms": 0.005, "gbs": 12.0, "pct_copy": 1.0,
           "vs_eager": 3.0, "vs_compile": 1.5, "peak_mb": 0.1, "launches_fwd": 1, "launches": 2, "loss": 1.5, **env}
    for _ in range(2):
        bk.save([row], env, 3000.0, tmp_path)
    lines = (tmp_path / "kernels-nvidia-h100-80gb-hbm3.jsonl").read_text().splitlines()
    assert [json.loads(x)["impl"] for x in lines] == ["fastkd", "fastkd"]
    md = (tmp_path / "kernels-nvidia-h100-80gb-hbm3.md").read_text()
    assert md.count("## NVIDIA H100 80GB HBM3, 2026-01-01 00:00 UTC, commit abc1234: kd + CE, bf16") == 2
    assert "| 4 x 10 | fastkd | 0.0100 | 0.0050 | 12 | 1 % | 3.00x | 1.50x | 0 | 1 / 2 | 1.5 |" in md


def _fake_liger(monkeypatch, jsd_accepts_zero=True):
    """A stand-in for liger_kernel with the documented semantics of the three losses the table
    uses (Liger is not installed here): checks how the liger rows compose them."""
    import importlib.machinery
    import sys
    import types

    import torch.nn.functional as F
    from torch import nn

    class LigerCrossEntropyLoss(nn.Module):
        def forward(self, z, y):
            return F.cross_entropy(z.float(), y)

    class LigerKLDIVLoss(nn.KLDivLoss):
        def forward(self, y_pred, y_true):
            return F.kl_div(y_pred, y_true, reduction=self.reduction, log_target=self.log_target)

    class LigerJSD(nn.Module):
        def __init__(self, beta=0.5):
            super().__init__()
            assert jsd_accepts_zero or 0 < beta < 1, f"beta must be greater than 0 and less than 1. Got: {beta}"
            self.beta = beta

        def forward(self, log_q, log_p):  # beta = 0: forward KL(P || Q), mean over rows
            return (log_p.exp() * (log_p - log_q)).sum() / log_q.shape[0]

    root = types.ModuleType("liger_kernel")
    root.__spec__ = importlib.machinery.ModuleSpec("liger_kernel", None)
    sub = types.ModuleType("liger_kernel.transformers")
    sub.LigerCrossEntropyLoss, sub.LigerKLDIVLoss, sub.LigerJSD = LigerCrossEntropyLoss, LigerKLDIVLoss, LigerJSD
    root.transformers = sub
    monkeypatch.setitem(sys.modules, "liger_kernel", root)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", sub)


@pytest.mark.parametrize("impl", ["liger-kl", "liger-jsd"])
def test_liger_rows_compute_kd_plus_ce(impl, monkeypatch):
    _fake_liger(monkeypatch)
    T = 2.0
    fn = bk.build_impls("kd", T, 0.5, 0.5, [impl])[impl][0]
    z, v, y = bk.make_inputs(6, 300, torch.float32, device="cpu")
    z0 = z.detach().clone()
    loss, g = bk.fwd_bwd(fn, z, v, y, torch.ones(()))
    exact_loss, exact_g = _exact("kd", z, v, y, {"temperature": T})
    torch.testing.assert_close(loss.double(), exact_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.double(), exact_g, rtol=1e-4, atol=1e-7)
    assert torch.equal(z.detach(), z0)  # Liger's CE got a copy: the logits are untouched


def test_liger_jsd_row_skips_a_release_that_refuses_beta_zero(monkeypatch):
    _fake_liger(monkeypatch, jsd_accepts_zero=False)
    skipped = {}
    impls = bk.build_impls("kd", None, 0.5, 0.5, ["liger-kl", "liger-jsd"], skipped=skipped)
    assert "liger-kl" in impls and "liger-jsd" not in impls
    assert "refuses beta=0" in skipped["liger-jsd"]
