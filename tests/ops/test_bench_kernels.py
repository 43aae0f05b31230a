"""``fastkd bench kernels`` (fastkd/bench/kernels.py): the parts that run without a GPU.

The timing itself needs CUDA (benchmarks/gpu_kernels.sh runs it); here: every compared
implementation computes the same loss and gradient as the fp64 reference (so the table compares
like with like), shape parsing, the results files, and the clear exit without a GPU.
"""
import argparse
import json

import pytest
import torch

from fastkd.bench import kernels as bk
from fastkd.losses import reference as ref

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def _exact(z, v, y, T):
    zd = z.detach().double().requires_grad_(True)
    loss = (0.5 * ref.cross_entropy(zd, y) + 0.5 * ref.kd(zd, v.double(), T)).mean()
    (g,) = torch.autograd.grad(loss, zd)
    return loss.detach(), g


@pytest.mark.parametrize("impl", ["fastkd", "eager"])
def test_benchmarked_implementations_compute_the_reference(impl, device):
    T = 2.0
    fn = bk.build_impls("kd", T, 0.5, 0.5, [impl])[impl][0]
    z, v, y = bk.make_inputs(6, 300, torch.float32, device=device)
    loss, g = bk.fwd_bwd(fn, z, v, y, torch.ones((), device=device))
    exact_loss, exact_g = _exact(z, v, y, T)
    torch.testing.assert_close(loss.double(), exact_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.double(), exact_g, rtol=1e-4, atol=1e-7)


def test_parse_shapes():
    assert bk.parse_shapes("256x1000, 4096X32000") == [(256, 1000), (4096, 32000)]
    for bad in ("256x1", "x100", "256x300000", "12"):
        with pytest.raises(ValueError, match="bad shape"):
            bk.parse_shapes(bad)


def test_parse_config():
    assert bk.parse_config("chunk=2048, warps=4,prefetch=1") == {"chunk": 2048, "warps": 4, "prefetch": True}
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


def test_bad_arguments_exit_2(capsys):
    assert bk.main(_args(shapes="256y1000")) == 2
    assert "bad shape" in capsys.readouterr().out
    assert bk.main(_args(impls="fastkd,apex")) == 2
    assert "unknown implementation(s) apex" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_without_gpu_says_so(capsys):
    assert bk.main(_args()) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out


def test_save_appends_rows(tmp_path):
    env = {"gpu": "NVIDIA H100 80GB HBM3", "date": "2026-01-01 00:00 UTC", "torch": "2.11", "cuda": "13.0",
           "triton": "3.6.0", "fastkd": "0.1.0", "liger_kernel": None, "python": "3.12"}
    row = {"N": 4, "C": 10, "impl": "fastkd", "method": "kd", "dtype": "bf16", "temperature": 1.0, "ms": 0.01, "gbs": 12.0, "pct_copy": 1.0, "speedup": 3.0,
           "peak_mb": 0.1, "launches_fwd": 1, "launches": 2, "loss": 1.5, **env}
    for _ in range(2):
        bk.save([row], env, 3000.0, tmp_path)
    lines = (tmp_path / "kernels-nvidia-h100-80gb-hbm3.jsonl").read_text().splitlines()
    assert [json.loads(x)["impl"] for x in lines] == ["fastkd", "fastkd"]
    md = (tmp_path / "kernels-nvidia-h100-80gb-hbm3.md").read_text()
    assert md.count("## NVIDIA H100 80GB HBM3, 2026-01-01 00:00 UTC: kd + CE, bf16, T=1.0") == 2
    assert "| 4 x 10 | fastkd | 0.0100 | 12 | 1 % | 3.00x | - | 0 | 1 / 2 | 1.5 |" in md
