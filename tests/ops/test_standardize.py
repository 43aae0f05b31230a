"""Logit standardisation (``standardize=True``) on both backends against the fp64 reference.

The fused path (fastkd.kernels._standardize around the fused KD kernel) is checked with the same
tolerance rule as every method (test_kd_softmax_kl.run_case: the kernel's error against fp64 at most
a small multiple of PyTorch's own same-dtype error); the reference itself against the formula.
"""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import fastkd
from fastkd.kernels import fused_distill
from fastkd.losses import reference as ref


def _conformance_helpers():
    """The tolerance machinery of the kernel conformance tests (tests run with --import-mode=importlib)."""
    name = "_fastkd_kd_softmax_kl_tests"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("test_kd_softmax_kl.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


_H = _conformance_helpers()
II, LaunchConfig, chunked, labels, rand, run_case, split = (_H.II, _H.LaunchConfig, _H.chunked, _H.labels, _H.rand,
                                                            _H.run_case, _H.split)

pytestmark = [
    pytest.mark.filterwarnings("error:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("error:divide by zero encountered:RuntimeWarning"),
]

PARAMS = {
    "kd": dict(temperature=2.0, standardize=True),
    "ats": dict(tau_target=4.0, tau_other=1.5, student_temperature=1.5, standardize=True),
    "dkd": dict(alpha=1.0, beta=8.0, temperature=4.0, standardize=True),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def test_reference_is_the_z_score_with_the_unbiased_std():
    x = torch.tensor([[1.0, 2.0, 4.0, 9.0], [-3.0, 0.0, 0.0, 3.0]], dtype=torch.float64)
    mean = x.mean(1, keepdim=True)
    sd = ((x - mean) ** 2).sum(1, keepdim=True).div(3).sqrt()  # C - 1 = 3
    torch.testing.assert_close(ref.standardize(x), (x - mean) / (sd + 1e-7), rtol=0, atol=1e-15)
    z = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ref.standardize(t).pow(3).sum(), (z,))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("method", list(PARAMS))
def test_fused_matches_reference_odd_shape(method, dtype, device):
    """41 x 1271, CE + KD weighted, label smoothing on the raw CE, ignored rows, grad_output != 1."""
    z = rand((41, 1271), dtype, 1, device=device)
    v = rand((41, 1271), dtype, 2, scale=7.0, device=device)
    y = labels(41, 1271, 3, device, ignored=(0, 17))
    run_case(method, z, v, y, dtype=dtype, eps=0.1, grad_out=torch.tensor(1.7, device=device),
             params=PARAMS[method])


@pytest.mark.parametrize("method", list(PARAMS))
@pytest.mark.parametrize("config", ["chunked", "split"])
def test_fused_matches_reference_on_the_chunked_and_split_paths(method, config, device):
    z = rand((7, 1000), torch.float32, 4, device=device)
    v = rand((7, 1000), torch.float32, 5, device=device)
    y = labels(7, 1000, 6, device, ignored=(3,))
    cfg = chunked(True) if config == "chunked" else split()
    run_case(method, z, v, y, dtype=torch.float32, eps=0.05, config=cfg, params=PARAMS[method])


def test_rows_longer_than_one_z_score_block(device, monkeypatch):
    """C = 4099 > the z-score kernel's 4096-wide block: its multi-sweep loop. The z-scored rows are
    fp32 whatever the input dtype (as in the reference), so the KD term's error is an fp32 one: the
    fp32 ratio applies (the z-scores themselves match fp64 as closely as torch's, 3.9e-7 here)."""
    monkeypatch.setitem(_H.RATIO, torch.bfloat16, _H.RATIO[torch.float32])
    z = rand((3, 4099), torch.bfloat16, 7, device=device)
    v = rand((3, 4099), torch.bfloat16, 8, device=device)
    y = labels(3, 4099, 9, device, ignored=(1,))
    run_case("kd", z, v, y, dtype=torch.bfloat16, params=PARAMS["kd"])


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_reductions_with_grad_output(reduction, device):
    z = rand((6, 33), torch.float32, 10, device=device)
    v = rand((6, 33), torch.float32, 11, device=device)
    y = labels(6, 33, 12, device, ignored=(4,))
    go = torch.linspace(0.5, 2.0, 6, device=device) if reduction == "none" else torch.tensor(0.3, device=device)
    run_case("ats", z, v, y, dtype=torch.float32, reduction=reduction, grad_out=go, params=PARAMS["ats"])


def test_smallest_shape_two_classes(device):
    z, v = rand((1, 2), torch.float32, 13, device=device), rand((1, 2), torch.float32, 14, device=device)
    run_case("dkd", z, v, labels(1, 2, 15, device), dtype=torch.float32, params=PARAMS["dkd"])


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("method", list(PARAMS))
def test_invariant_to_a_per_row_affine_change_of_either_logits(method, backend, device):
    """The point of standardisation: a * x + b (a > 0, per row) changes no KD term."""
    z = rand((5, 20), torch.float64 if backend == "torch" else torch.float32, 16, device=device)
    v = rand((5, 20), z.dtype, 17, device=device)
    y = labels(5, 20, 18, device)
    a = torch.tensor([[0.5], [2.0], [3.0], [1.0], [7.0]], dtype=z.dtype, device=device)
    fn = {"kd": lambda s, t: fastkd.kd_loss(s, t, 2.0, backend=backend, standardize=True),
          "ats": lambda s, t: fastkd.ats_loss(s, t, y, 4.0, 2.0, backend=backend, standardize=True),
          "dkd": lambda s, t: fastkd.dkd_loss(s, t, y, backend=backend, standardize=True)}[method]
    base = fn(z, v)
    torch.testing.assert_close(fn(a * z - 3.0, v), base, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fn(z, a * v + 5.0), base, rtol=1e-5, atol=1e-6)
    plain = {"kd": lambda: fastkd.kd_loss(z, a * v + 5.0, 2.0, backend=backend)}.get(method)
    if plain is not None:  # without standardisation the same change does move KD
        assert abs(plain().item() - fastkd.kd_loss(z, v, 2.0, backend=backend).item()) > 1e-3


def test_kd_without_labels_and_padding_rows_on_both_backends(device):
    """kd_loss reads no label; ``valid`` padding rows (finite garbage) contribute no loss and no gradient."""
    z = rand((8, 50), torch.float32, 19, device=device)
    v = rand((8, 50), torch.float32, 20, device=device)
    z[6:], v[6:] = 1e4, -1e4
    valid = torch.tensor([True] * 6 + [False] * 2, device=device)
    out = []
    for backend in ("triton", "torch"):
        zz = z.clone().requires_grad_(True)
        loss = fastkd.kd_loss(zz, v, 3.0, backend=backend, valid=valid, standardize=True)
        loss.backward()
        out.append((loss, zz.grad))
        assert torch.equal(zz.grad[6:], torch.zeros_like(zz.grad[6:]))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=2e-5, atol=1e-7)
    exact = fastkd.kd_loss(z[:6].double(), v[:6].double(), 3.0, backend="torch", standardize=True)
    torch.testing.assert_close(out[0][0].double(), exact, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", list(PARAMS))
def test_distill_loss_module_triton_vs_torch(method, device):
    B, C = 16, 100
    z = rand((B, C), torch.float32, 44, device=device)
    v = rand((B, C), torch.float32, 45, device=device)
    y = labels(B, C, 46, device, ignored=(2, 9))
    p = {k: val for k, val in PARAMS[method].items() if k != "standardize"}
    results = []
    for backend in ("triton", "torch"):
        mod = fastkd.DistillLoss(method, ce_weight=0.4, kd_weight=0.6, label_smoothing=0.1, backend=backend,
                                 standardize=True, **p)
        zz = z.clone().requires_grad_(True)
        out = mod(zz, v, y)
        out.backward()
        results.append((out, zz.grad, mod.last_terms))
    (a, ga, ta), (b, gb, tb) = results
    torch.testing.assert_close(a, b.float(), rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(ga, gb, rtol=2e-5, atol=1e-7)
    for key in ("ce", "kd"):
        torch.testing.assert_close(ta[key].float(), tb[key].float(), rtol=2e-5, atol=1e-6)
    # the CE term keeps the raw logits: it equals plain CE
    torch.testing.assert_close(tb["ce"], ref.cross_entropy(z, y, 0.1, II).sum() / 14)


def test_bad_settings_are_refused(device):
    z, v, y = torch.randn(2, 5), torch.randn(2, 5), torch.tensor([1, 2])
    with pytest.raises(TypeError, match="standardize must be True or False"):
        fastkd.DistillLoss("kd", standardize="yes")
    with pytest.raises(TypeError, match="standardize must be True or False"):
        fastkd.kd_loss(z, v, standardize=1)
    with pytest.raises(ValueError, match="unknown parameter.*standardize"):
        fastkd.DistillLoss("isats", standardize=True)
    with pytest.raises(ValueError, match="at least 2 classes"):
        ref.standardize(torch.randn(2, 1))
    with pytest.raises(ValueError, match="at least 2 classes"):
        fused_distill(torch.randn(2, 1), torch.randn(2, 1), None, method="kd", ce_weight=0.0, kd_weight=1.0,
                      label_smoothing=0.0, ignore_index=II, reduction="sum", standardize=True)
    with pytest.raises(ValueError, match="applies to kd, ats and dkd"):
        fused_distill(z, v, y, method="isats", ce_weight=0.0, kd_weight=1.0, label_smoothing=0.0, ignore_index=II,
                      reduction="sum", standardize=True)


def test_launch_config_is_passed_through(device):
    """A forced chunked config reaches the KD kernel on the z-scored rows (same numbers as the default)."""
    z = rand((4, 300), torch.float32, 21, device=device)
    v = rand((4, 300), torch.float32, 22, device=device)
    y = labels(4, 300, 23, device)
    kw = dict(method="kd", ce_weight=0.5, kd_weight=0.5, label_smoothing=0.0, ignore_index=II,
              reduction="batchmean", temperature=2.0, standardize=True)
    a, _ = fused_distill(z, v, y, **kw)
    b, _ = fused_distill(z, v, y, config=LaunchConfig(max_single=64, chunk=64, split=False), **kw)
    torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7)
