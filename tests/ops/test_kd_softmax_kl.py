"""The fused KD kernel (fastkd.kernels.kd_softmax_kl) against the fp64 reference.

On a CPU machine the kernels run in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1); on a GPU machine the same tests run the compiled kernels, and the tests
marked ``gpu`` add the large shapes.

Tolerance rule (flash-attention's): for every compared quantity, the kernel's max error
against the exact (fp64) reference may be at most RATIO[dtype] times the error of PyTorch's
own same-dtype computation (the ``torch`` backend on the same inputs: fp32 math, gradients
rounded to the input dtype), plus a small floor relative to the quantity's size.
"""
import json
import logging
import math
import os
import subprocess
import sys

import pytest
import torch

import fastkd
from fastkd import _compat
from fastkd.kernels import fused_distill
from fastkd.kernels import _launch as L
from fastkd.kernels import kd_softmax_kl as K
from fastkd.kernels.kd_softmax_kl import LaunchConfig
from fastkd.losses import methods
from fastkd.losses import reference as ref

RATIO = {torch.float32: 4.0, torch.bfloat16: 2.0, torch.float16: 2.0}
FLOOR = 1e-6  # relative to max |exact|: ~8 fp32 ulps, for quantities torch happens to get exact
# Triton's interpreter converts fp32 -> bf16/fp16 by truncation where the GPU rounds to nearest
# even, and the gradient is rounded twice when grad_output != 1 (stored in the input dtype in
# forward, scaled in backward): under the interpreter a 16-bit gradient may carry one more unit
# in the last place than on the GPU.
INTERPRETED = _compat.triton_interpret()
MANTISSA = {torch.bfloat16: 7, torch.float16: 10}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
II = -100

# Method -> parameters with temperatures other than 1 (ISATS: a short grid keeps the
# interpreter fast; the default 16-candidate grid has its own test).
PARAMS = {
    "kd": dict(temperature=2.0),
    "ats": dict(tau_target=4.0, tau_other=1.5, student_temperature=1.5),
    "isats": dict(tau_target=4.0, candidates=(0.5, 1.5, 2.75, 4.0), student_temperature=2.0),
    "dkd": dict(alpha=1.0, beta=8.0, temperature=4.0),
    "jsd": dict(beta=0.3, temperature=2.0),
    "rkl": dict(temperature=1.5),
}
KD_METHODS = list(PARAMS)


def test_every_kernel_method_of_the_table_is_parametrised():
    """A method added to the table's row-local kernel methods joins every test here via PARAMS."""
    from fastkd.losses.methods import METHOD_TABLE

    assert set(PARAMS) == {m for m, spec in METHOD_TABLE.items() if spec.row_local and m != "ce"}

# The interpreter evaluates kernels with numpy: an invalid operation (-inf - -inf, log(0) of an
# unused empty sum) warns, and such warnings fail these tests (the -inf-masking tests below
# produce legitimate infinities, which do not warn).
pytestmark = [
    pytest.mark.filterwarnings("error:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("error:divide by zero encountered:RuntimeWarning"),
]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def rand(shape, dtype, seed, scale=3.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def labels(n, c, seed, device="cpu", ignored=()):
    g = torch.Generator().manual_seed(seed + 100)
    y = torch.randint(0, c, (n,), generator=g)
    for i in ignored:
        y[i] = II
    return y.to(device)


def ref_rows(method, z, v, y, params, eps=0.0):
    """Per-row (CE, KD) with DistillLoss conventions (every KD term skips ignored rows): the
    reference's one per-row KD function, with the method table's defaults for unset parameters."""
    if y is None:
        ce = torch.zeros(z.shape[0], dtype=ref.upcast(z).dtype, device=z.device)
    else:
        ce = ref.cross_entropy(z, y, eps, II)
    if method == "ce":
        return ce, torch.zeros_like(ce)
    full = {k: val for k, val in {**methods.defaults(method), **params}.items() if k != "warmup_epochs"}
    if y is None:  # plain KD without labels: every row counts
        return ce, ref.kd(z, v, full["temperature"])
    return ce, ref.kd_term_rows(method, z, v, y, II, **full)


def torch_side(method, z, v, y, params, ce_w, kd_w, eps, reduction, grad_out):
    """Reference loss, parts and gradient on (z, v) as given (fp64 copies -> exact)."""
    z = z.detach().clone().requires_grad_(True)
    ce, kd = ref_rows(method, z, v, y, params, eps)
    rows = (ce_w * ce if ce_w else 0 * ce.detach()) + (kd_w * kd if kd_w else 0 * kd.detach())
    if reduction == "none":
        loss = rows
    elif reduction == "sum":
        loss = rows.sum()
    else:
        n = z.shape[0] if y is None else int((y != II).sum())
        loss = rows.sum() / max(n, 1)
    (g,) = torch.autograd.grad(loss, z, grad_out.to(loss.dtype) if grad_out is not None else None)
    return loss.detach(), ce.detach(), kd.detach(), g


def check(name, got, same_dtype, exact, dtype, rounded_twice=False):
    """Kernel error <= RATIO x torch's same-dtype error + FLOOR x scale; non-finite entries equal.
    ``rounded_twice``: a 16-bit gradient stored in forward and scaled by grad_output in backward;
    under the interpreter each of its two roundings truncates, so up to two units in the last
    place (found on the reverse KL's bf16 gradient with grad_output up to 6)."""
    out_dtype = got.dtype
    ulp_slack = INTERPRETED and out_dtype in MANTISSA
    got, same_dtype, exact = got.double().cpu(), same_dtype.double().cpu(), exact.double().cpu()
    assert got.shape == exact.shape, f"{name}: shape {tuple(got.shape)} != {tuple(exact.shape)}"
    fin = torch.isfinite(exact)
    assert torch.equal(torch.isnan(got), torch.isnan(exact)), f"{name}: NaN pattern differs"
    assert torch.equal(got[~fin & ~torch.isnan(exact)], exact[~fin & ~torch.isnan(exact)]), f"{name}: inf differs"
    if not fin.any():
        return
    e, s = exact[fin], same_dtype[fin]
    err_k = (got[fin] - e).abs().max().item()
    err_t = (s - e).abs().max().item()
    scale = e.abs().max().item()
    tol = RATIO[dtype] * err_t + FLOOR * scale + 1e-30
    if ulp_slack and scale > 0:
        tol += (2.0 if rounded_twice else 1.0) * 2.0 ** (math.floor(math.log2(scale)) - MANTISSA[out_dtype])
    assert err_k <= tol, f"{name}: kernel error {err_k:.3e} > {tol:.3e} (torch {dtype} error {err_t:.3e}, scale {scale:.3e})"


def run_case(method, z, v, y, *, dtype, ce_w=0.3, kd_w=0.7, eps=0.0, reduction="batchmean", grad_out=None,
             params=None, config=None):
    params = PARAMS.get(method, {}) if params is None else params
    zk = z.detach().clone().requires_grad_(True)
    loss, parts = fused_distill(zk, v, y, method=method, ce_weight=ce_w, kd_weight=kd_w, label_smoothing=eps,
                                ignore_index=II, reduction=reduction, config=config, **params)
    assert loss.dtype == torch.float32
    (g,) = torch.autograd.grad(loss, zk, grad_out)
    assert g.dtype == z.dtype and g.shape == z.shape
    vv = v.detach() if v is not None else None
    ex = torch_side(method, z.double(), vv.double() if vv is not None else None, y, params, ce_w, kd_w, eps,
                    reduction, grad_out)
    td = torch_side(method, z, vv, y, params, ce_w, kd_w, eps, reduction, grad_out)
    for name, got, t, e in zip(("loss", "ce", "kd", "grad"), (loss, parts["ce"], parts["kd"], g), td, ex):
        check(f"{method}/{dtype}/{name}", got, t, e, dtype, rounded_twice=name == "grad" and grad_out is not None)
    return loss, parts, g


def chunked(prefetch):
    """A launch configuration forcing the multi-chunk (two-sweep) path on small rows."""
    return LaunchConfig(max_single=256, chunk=256, prefetch=prefetch, split=False)


# --------------------------------------------------------------------------------------------
# every method x dtype, single-block and chunked paths
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("method", KD_METHODS)
def test_matches_reference_41x1271(method, dtype, device):
    """Odd shape, CE + KD weighted, label smoothing, ignored rows, temperatures != 1, grad_output != 1."""
    z = rand((41, 1271), dtype, 1, device=device)
    v = rand((41, 1271), dtype, 2, device=device)
    y = labels(41, 1271, 3, device, ignored=(0, 17))
    run_case(method, z, v, y, dtype=dtype, eps=0.1, grad_out=torch.tensor(1.7, device=device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("method", KD_METHODS)
def test_chunked_path_matches_reference(method, dtype, device):
    z = rand((7, 1000), dtype, 4, device=device)
    v = rand((7, 1000), dtype, 5, device=device)
    y = labels(7, 1000, 6, device, ignored=(3,))
    # both loop variants: plain, and with the register prefetch
    run_case(method, z, v, y, dtype=dtype, eps=0.05, config=chunked(dtype == torch.bfloat16))


def split(slice=256, lag=2):
    """A launch configuration forcing the split-row path (slices of ``slice`` columns)."""
    return LaunchConfig(max_single=128, split=True, slice=slice, lag=lag)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("method", ["ce"] + KD_METHODS)
def test_split_path_matches_reference(method, dtype, device):
    """Split rows (C = 1271 in 5 slices of 256, the last partial), odd N, ignored rows, label
    smoothing, temperatures != 1, grad_output != 1, work steps interleaved with a lag of 2 rows."""
    z = rand((9, 1271), dtype, 70, device=device)
    v = rand((9, 1271), dtype, 71, device=device)
    y = labels(9, 1271, 72, device, ignored=(0, 5))
    assert K.L.plan(1271, method, split(), 9).path == "split"
    run_case(method, z, v if method != "ce" else None, y, dtype=dtype, eps=0.1, kd_w=0.0 if method == "ce" else 0.7,
             grad_out=torch.tensor(1.7, device=device), config=split())


@pytest.mark.parametrize("method", KD_METHODS)
def test_split_path_reductions_lags_and_masked_slices(method, device):
    """reduction none / sum with grad_output != 1, lag 0 (gradient items right after the row's
    statistics) and lag >= N (all statistics first); a whole slice masked with -inf."""
    N, C = 5, 700
    z = rand((N, C), torch.float32, 73, device=device)
    v = rand((N, C), torch.float32, 74, device=device)
    y = labels(N, C, 75, device, ignored=(3,))
    y[1] = 650
    z[1, 256:512] = float("-inf")  # slice 1 of row 1 entirely masked in both
    v[1, 256:512] = float("-inf")
    go = rand((N,), torch.float32, 76, device=device)
    run_case(method, z, v, y, dtype=torch.float32, reduction="none", grad_out=go, config=split(lag=0))
    run_case(method, z, v, y, dtype=torch.float32, reduction="sum", grad_out=torch.tensor(-0.5, device=device),
             config=split(lag=100))


def test_split_path_kd_without_labels_isats_default_grid_and_determinism(device):
    z = rand((4, 530), torch.float16, 77, device=device)
    v = rand((4, 530), torch.float16, 78, device=device)
    run_case("kd", z, v, None, dtype=torch.float16, ce_w=0.0, kd_w=1.0, params=dict(temperature=3.0), config=split())
    y = labels(4, 530, 79, device)
    y[:2] = v[:2].argmax(-1)  # rows where some candidate keeps the label on top, and rows where none does
    params = dict(tau_target=4.0, candidates=None, student_temperature=1.0)  # the 16-candidate grid
    run_case("isats", z.float(), v.float(), y, dtype=torch.float32, params=params, config=split())
    kw = dict(method="dkd", ce_weight=0.5, kd_weight=0.5, label_smoothing=0.0, ignore_index=II,
              reduction="batchmean", config=split(), **PARAMS["dkd"])
    a, pa = fused_distill(z, v, y, **kw)
    b, pb = fused_distill(z, v, y, **kw)
    assert torch.equal(a, b) and torch.equal(pa["kd"], pb["kd"])


def test_launch_plan_defaults():
    """Rows up to one block: single; longer rows: chunked by default (the split path is opt-in
    until it has run compiled on a GPU), split with split=True; split=False forces chunked."""
    assert L.plan(1000, "kd").path == "single" and L.plan(8192, "kd").path == "single"
    assert L.SPLIT_BY_DEFAULT is False
    assert L.plan(8193, "kd").path == "chunked" and L.plan(128256, "kd", N=8192).path == "chunked"
    assert L.plan(8193, "kd", LaunchConfig(split=True)).path == "split"
    assert L.plan(128256, "kd", LaunchConfig(split=True), N=8192)[:2] == ("split", L.SLICE)
    assert L.plan(6000, "isats").path == "chunked"
    assert L.plan(32000, "isats", LaunchConfig(split=True)).block == L.SLICE_ISATS
    assert L.plan(128256, "kd", LaunchConfig(split=False)).path == "chunked"
    p = L.plan(1271, "kd", split(lag=600), N=9)
    assert p.slices == 5 and p.lag_rows == 9  # the lag is at most N rows
    assert L.plan(300_000, "kd", LaunchConfig(slice=16)).slices <= L.MAX_SLICES


@pytest.mark.parametrize("method", ["kd", "ats", "dkd"])
def test_row_longer_than_65536(method, device):
    """C = 70000: beyond one block (and beyond 65536) with the default chunking."""
    z = rand((2, 70000), torch.bfloat16, 7, device=device)
    v = rand((2, 70000), torch.bfloat16, 8, device=device)
    y = labels(2, 70000, 9, device)
    run_case(method, z, v, y, dtype=torch.bfloat16)


@pytest.mark.parametrize("method", ["ce"] + KD_METHODS)
def test_smallest_shape_1x2(method, device):
    z = rand((1, 2), torch.float32, 10, device=device)
    v = rand((1, 2), torch.float32, 11, device=device)
    y = torch.tensor([1], device=device)
    run_case(method, z, v if method != "ce" else None, y, dtype=torch.float32, kd_w=0.7 if method != "ce" else 0.0)


def test_isats_default_grid_and_wrong_teacher(device):
    """16 default candidates; rows where the teacher's arg-max is not the label (no candidate
    keeps the label on top -> the largest candidate) and rows where it is."""
    N, C = 6, 200
    z = rand((N, C), torch.float32, 12, device=device)
    v = rand((N, C), torch.float32, 13, device=device)
    y = labels(N, C, 14, device)
    top = v.argmax(-1)
    y[:3] = top[:3]  # teacher right on rows 0-2, (almost surely) wrong on 3-5
    v[0, y[0]] += 20.0  # very confident: small temperatures qualify
    params = dict(tau_target=4.0, candidates=None, student_temperature=1.0)
    run_case("isats", z, v, y, dtype=torch.float32, params=params)
    chosen = ref.isats_select_tau(v.cpu(), y.cpu(), 4.0)
    assert chosen[3:].eq(4.0).all() and chosen[:3].lt(4.0).any()  # both branches exercised


# --------------------------------------------------------------------------------------------
# numerics edge cases
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", KD_METHODS)
@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e4), (torch.float16, 6e4)], ids=["fp32_1e4", "fp16_6e4"])
def test_large_magnitude_logits(method, dtype, scale, device):
    g = torch.Generator().manual_seed(15)
    z = ((torch.rand(8, 300, generator=g, dtype=torch.float64) * 2 - 1) * scale).to(dtype).to(device)
    v = ((torch.rand(8, 300, generator=g, dtype=torch.float64) * 2 - 1) * scale).to(dtype).to(device)
    y = labels(8, 300, 16, device)
    loss, _, g = run_case(method, z, v, y, dtype=dtype)
    assert torch.isfinite(loss) and torch.isfinite(g).all()


# z - max(z) = -1e38 - 3e38 overflows to -inf, whose exp is the exact 0: a harmless overflow.
@pytest.mark.filterwarnings("ignore:overflow encountered in subtract:RuntimeWarning")
@pytest.mark.parametrize("path", ["single", "chunked", "split"])
def test_label_smoothing_near_fp32_max_does_not_overflow(path, device):
    """mean(z) of label smoothing accumulated as a sum of z/C (as the reference): a row near
    fp32's maximum gives its finite CE (~5.6e36), not -inf (a plain sum of z overflowed)."""
    z = torch.full((2, 40), 2.5e38, device=device)  # a plain fp32 sum of a row overflows
    z[:, :3] = 3e38
    z[:, 3] = 2e38
    z[:, 39] = -1e38
    y = torch.tensor([0, 3], device=device)
    config = {"single": None, "chunked": LaunchConfig(max_single=16, chunk=16, split=False),
              "split": LaunchConfig(max_single=16, slice=16, split=True)}[path]
    loss, parts = fused_distill(z, None, y, method="ce", ce_weight=1.0, kd_weight=0.0, label_smoothing=0.1,
                                ignore_index=II, reduction="none", config=config)
    exact = ref.cross_entropy(z.double(), y, 0.1, II)
    assert torch.isfinite(loss).all() and 5e36 < loss[0].item() < 6e36
    torch.testing.assert_close(parts["ce"].double(), exact, rtol=1e-6, atol=0)


@pytest.mark.parametrize("method", KD_METHODS)
def test_masked_minus_inf(method, device):
    """-inf where both mask (contributes 0), teacher-only mask, and a student-only mask where
    the teacher has mass (that row's KD is +inf, exactly as the reference says)."""
    N, C = 6, 300
    z = rand((N, C), torch.float32, 17, device=device)
    v = rand((N, C), torch.float32, 18, device=device)
    y = labels(N, C, 19, device)
    ninf = float("-inf")
    for r in range(N):
        cols = [(7 * r + 5 * k) % C for k in range(20)]
        cols = [c for c in cols if c != int(y[r])]
        z[r, cols] = ninf
        v[r, cols] = ninf
    v[1, (int(y[1]) + 1) % C] = ninf  # teacher-only mask
    z[2, (int(y[2]) + 3) % C] = ninf  # student-only mask: KD of row 2 is +inf
    loss, parts, g = run_case(method, z, v, y, dtype=torch.float32, reduction="none",
                              grad_out=torch.ones(N, device=device))
    if method == "rkl":  # student first: the teacher-only mask of row 1 (student mass there) is +inf
        assert parts["kd"][1] == math.inf and torch.isfinite(parts["kd"][[0, 2, 3, 4, 5]]).all()
        return
    if method == "jsd":  # M = beta p + (1 - beta) q has mass wherever either has: every row finite
        assert torch.isfinite(parts["kd"]).all()
        return
    assert torch.isfinite(parts["kd"][[0, 1, 3, 4, 5]]).all()
    if method != "dkd":  # DKD's NCKD of row 2 is +inf as well; both checked against the reference above
        assert parts["kd"][2] == math.inf


@pytest.mark.parametrize("method", ["ce"] + KD_METHODS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_all_rows_ignored(method, reduction, device):
    z = rand((4, 50), torch.float32, 20, device=device).requires_grad_(True)
    v = rand((4, 50), torch.float32, 21, device=device)
    y = torch.full((4,), II, device=device)
    loss, parts = fused_distill(z, v if method != "ce" else None, y, method=method, ce_weight=0.5,
                                kd_weight=0.5 if method != "ce" else 0.0, label_smoothing=0.1, ignore_index=II,
                                reduction=reduction, **PARAMS.get(method, {}))
    assert torch.all(loss == 0) and not torch.isnan(loss).any()
    loss.sum().backward()
    assert torch.equal(z.grad, torch.zeros_like(z))
    assert torch.all(parts["ce"] == 0) and torch.all(parts["kd"] == 0)


@pytest.mark.parametrize("method", KD_METHODS)
def test_reduction_none_and_sum_with_grad_output(method, device):
    N, C = 9, 129
    z = rand((N, C), torch.bfloat16, 22, device=device)
    v = rand((N, C), torch.bfloat16, 23, device=device)
    y = labels(N, C, 24, device, ignored=(4,))
    go = rand((N,), torch.float32, 25, device=device)
    run_case(method, z, v, y, dtype=torch.bfloat16, reduction="none", grad_out=go)
    run_case(method, z, v, y, dtype=torch.bfloat16, reduction="sum", grad_out=torch.tensor(-0.25, device=device))


def test_kd_without_labels_and_ce_only(device):
    z = rand((10, 333), torch.float16, 26, device=device)
    v = rand((10, 333), torch.float16, 27, device=device)
    run_case("kd", z, v, None, dtype=torch.float16, ce_w=0.0, kd_w=1.0, params=dict(temperature=3.0))
    y = labels(10, 333, 28, device, ignored=(2,))
    run_case("ce", z, None, y, dtype=torch.float16, ce_w=1.0, kd_w=0.0, eps=0.2, params={})


def test_ats_equals_kd_when_temperatures_match(device):
    z = rand((12, 77), torch.float32, 29, device=device)
    v = rand((12, 77), torch.float32, 30, device=device)
    y = labels(12, 77, 31, device)
    common = dict(ce_weight=0.0, kd_weight=1.0, label_smoothing=0.0, ignore_index=II, reduction="none")
    a, _ = fused_distill(z, v, y, method="ats", tau_target=2.5, tau_other=2.5, student_temperature=2.5, **common)
    k, _ = fused_distill(z, v, y, method="kd", temperature=2.5, **common)
    torch.testing.assert_close(a, k, rtol=1e-5, atol=1e-6)


def test_bad_label_gives_nan_row_only(device):
    """With the label check off, an out-of-range label makes its row NaN (no OOB read)."""
    z = rand((5, 40), torch.float32, 32, device=device).requires_grad_(True)
    v = rand((5, 40), torch.float32, 33, device=device)
    y = labels(5, 40, 34, device)
    y[1], y[3] = 40, -7
    for method in KD_METHODS:
        loss, parts = fused_distill(z, v, y, method=method, ce_weight=0.5, kd_weight=0.5, label_smoothing=0.0,
                                    ignore_index=II, reduction="none", **PARAMS[method])
        assert torch.isnan(loss[[1, 3]]).all() and torch.isfinite(loss[[0, 2, 4]]).all(), method
        (g,) = torch.autograd.grad(loss[[0, 2, 4]].sum(), z)
        assert torch.isfinite(g[[0, 2, 4]]).all()
    out = fastkd.DistillLoss("dkd", backend="triton", check_labels=False)(z, v, y)
    assert torch.isnan(out)


# --------------------------------------------------------------------------------------------
# layout: strided rows, transposed columns, (B, T, C)
# --------------------------------------------------------------------------------------------
def test_strided_rows_without_copy(device, monkeypatch, caplog):
    wide_z = rand((11, 600), torch.bfloat16, 35, device=device)
    wide_v = rand((11, 700), torch.bfloat16, 36, device=device)
    z, v = wide_z[:, 50:550], wide_v[:, 100:600]  # stride(0) 600 / 700, stride(1) 1
    y = labels(11, 500, 37, device, ignored=(5,))

    def no_copy(self, *a, **k):
        raise AssertionError("the kernel path copied a row-strided input")

    with caplog.at_level(logging.INFO, logger="fastkd"):
        monkeypatch.setattr(torch.Tensor, "contiguous", no_copy)
        loss, parts = fused_distill(z.detach().requires_grad_(), v, y, method="kd", ce_weight=0.5, kd_weight=0.5,
                                    label_smoothing=0.0, ignore_index=II, reduction="batchmean", temperature=2.0)
        monkeypatch.undo()
    assert "copies" not in caplog.text
    run_case("dkd", z, v, y, dtype=torch.bfloat16)  # numbers on the same strided views


def test_transposed_columns_copy_once_and_say_so(device, caplog):
    zt = rand((300, 13), torch.float32, 38, device=device).t()  # column stride 13
    v = rand((13, 300), torch.float32, 39, device=device)
    y = labels(13, 300, 40, device)
    _compat._said_once.clear()
    with caplog.at_level(logging.INFO, logger="fastkd"):
        run_case("ats", zt, v, y, dtype=torch.float32)
        run_case("ats", zt, v, y, dtype=torch.float32)
    assert caplog.text.count("copies student logits") == 1


@pytest.mark.parametrize("api", ["kd", "ats", "isats", "dkd"])
def test_public_api_btc_inputs(api, device):
    """(B, T, C) logits through the public functions, backend='triton' vs backend='torch'."""
    B, T, C = 3, 5, 97
    z = rand((B, T, C), torch.float32, 41, device=device)
    v = rand((B, T, C), torch.float32, 42, device=device)
    y = labels(B * T, C, 43, device, ignored=(4,)).reshape(B, T)
    fn = {"kd": fastkd.kd_loss, "ats": fastkd.ats_loss, "isats": fastkd.isats_loss, "dkd": fastkd.dkd_loss}[api]
    args = (v,) if api == "kd" else (v, y)
    kw = {"kd": dict(temperature=2.0), "ats": dict(tau_target=3.0, tau_other=1.5),
          "isats": dict(candidates=(1.0, 2.0, 4.0)), "dkd": dict(temperature=2.0)}[api]
    for reduction in ("batchmean", "none"):
        outs = []
        for backend in ("triton", "torch"):
            zz = z.clone().requires_grad_(True)
            out = fn(zz, *args, reduction=reduction, backend=backend, **kw)
            (g,) = torch.autograd.grad(out.sum(), zz)
            outs.append((out, g))
        assert outs[0][0].shape == outs[1][0].shape == ((B, T) if reduction == "none" else ())
        torch.testing.assert_close(outs[0][0], outs[1][0].float(), rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(outs[0][1], outs[1][1], rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["ce", "kd", "ats", "isats", "dkd", "dist"])
def test_distill_loss_module_triton_vs_torch(method, device):
    B, C = 16, 100
    z = rand((B, C), torch.float32, 44, device=device)
    v = rand((B, C), torch.float32, 45, device=device)
    y = labels(B, C, 46, device, ignored=(2, 9))
    extra = {"dkd": dict(warmup_epochs=2.0), "isats": dict(candidates=(1.0, 2.0, 3.0, 4.0))}.get(method, {})
    results = []
    for backend in ("triton", "torch"):
        mod = fastkd.DistillLoss(method, ce_weight=0.4, kd_weight=0.6, label_smoothing=0.1, backend=backend, **extra)
        mod.set_epoch(1.0)
        zz = z.clone().requires_grad_(True)
        out = mod(zz, v, y)
        out.backward()
        results.append((out, zz.grad, mod.last_terms))
    (a, ga, ta), (b, gb, tb) = results
    torch.testing.assert_close(a, b.float(), rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(ga, gb, rtol=2e-5, atol=1e-7)
    for key in ("ce", "kd"):
        torch.testing.assert_close(ta[key].float(), tb[key].float(), rtol=2e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# the launch machinery: counting, the in-launch reduction, backward, fallbacks
# --------------------------------------------------------------------------------------------
def test_label_count_from_device_reduction(device, monkeypatch):
    """N above COUNT_IN_KERNEL_MAX: the count comes from a device reduction; same numbers."""
    z = rand((20, 64), torch.float32, 47, device=device)
    v = rand((20, 64), torch.float32, 48, device=device)
    y = labels(20, 64, 49, device, ignored=(1, 2, 3))
    first = run_case("kd", z, v, y, dtype=torch.float32)
    monkeypatch.setattr(L, "COUNT_IN_KERNEL_MAX", 4)
    second = run_case("kd", z, v, y, dtype=torch.float32)
    assert torch.equal(first[0], second[0]) and torch.equal(first[2], second[2])


@pytest.mark.parametrize("label_dtype,ii", [(torch.uint8, II), (torch.uint8, 255), (torch.int8, II),
                                           (torch.int16, II), (torch.int32, II)])
def test_narrow_label_dtypes_count_rows_correctly(label_dtype, ii, device):
    """The in-kernel batchmean count must not count the padding lanes past N as valid rows
    (a uint8 ``other=-100`` wraps to 156, which is not the ignore_index)."""
    z = rand((5, 20), torch.float32, 61, device=device)
    v = rand((5, 20), torch.float32, 62, device=device)
    y = labels(5, 20, 63, device)
    if ii != II or label_dtype != torch.uint8:  # a uint8 label can never equal -100
        y[1] = ii
    loss, _ = fused_distill(z, v, y.to(label_dtype), method="kd", ce_weight=0.5, kd_weight=0.5,
                            label_smoothing=0.0, ignore_index=ii, reduction="batchmean")
    ce = ref.cross_entropy(z.double(), y, 0.0, ii)
    kd = torch.where(y != ii, ref.kd(z.double(), v.double()), torch.zeros_like(ce))
    n_valid = int((y != ii).sum())
    torch.testing.assert_close(loss.double(), (0.5 * ce + 0.5 * kd).sum() / n_valid, rtol=1e-5, atol=0)


def test_reduction_is_deterministic_and_counter_resets(device):
    z = rand((33, 257), torch.float32, 50, device=device)
    v = rand((33, 257), torch.float32, 51, device=device)
    y = labels(33, 257, 52, device)
    kw = dict(method="dkd", ce_weight=0.5, kd_weight=0.5, label_smoothing=0.0, ignore_index=II,
              reduction="batchmean", **PARAMS["dkd"])
    a, pa = fused_distill(z, v, y, **kw)
    b, pb = fused_distill(z, v, y, **kw)
    assert torch.equal(a, b)
    assert int(L.ticket_counter(z.device).item()) == 0
    # the in-launch sum is the ordinary fixed-order sum of the rows
    rows = 0.5 * pa["ce"] + 0.5 * pa["kd"]
    torch.testing.assert_close(a, rows.sum() / 33, rtol=1e-6, atol=0)


def test_backward_twice_is_refused(device):
    z = rand((4, 30), torch.float32, 53, device=device).requires_grad_(True)
    v = rand((4, 30), torch.float32, 54, device=device)
    loss, _ = fused_distill(z, v, None, method="kd", ce_weight=0.0, kd_weight=1.0, label_smoothing=0.0,
                            ignore_index=II, reduction="batchmean")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_no_grad_path_writes_no_gradient(device):
    z = rand((6, 90), torch.bfloat16, 55, device=device)
    v = rand((6, 90), torch.bfloat16, 56, device=device)
    y = labels(6, 90, 57, device)
    with torch.no_grad():
        loss, _ = fused_distill(z, v, y, method="ats", ce_weight=0.5, kd_weight=0.5, label_smoothing=0.0,
                                ignore_index=II, reduction="batchmean", **PARAMS["ats"])
    exact = torch_side("ats", z.double(), v.double(), y, PARAMS["ats"], 0.5, 0.5, 0.0, "batchmean", None)[0]
    torch.testing.assert_close(loss.double(), exact, rtol=1e-5, atol=0)
    assert not loss.requires_grad


def test_no_grad_with_a_grad_requiring_student_writes_no_gradient(device, monkeypatch):
    """A loss evaluated under torch.no_grad on logits that require grad (e.g. for logging)
    must not make the kernel write an (N, C) gradient."""
    z = rand((6, 90), torch.float32, 55, device=device).requires_grad_(True)
    v = rand((6, 90), torch.float32, 56, device=device)
    y = labels(6, 90, 57, device)
    launches = []
    orig = K._launch
    monkeypatch.setattr(K, "_launch", lambda *a: launches.append(a[4]) or orig(*a))
    with torch.no_grad():
        loss, _ = fused_distill(z, v, y, method="kd", ce_weight=0.5, kd_weight=0.5, label_smoothing=0.0,
                                ignore_index=II, reduction="batchmean")
    assert launches == [False] and not loss.requires_grad
    fused_distill(z, v, y, method="kd", ce_weight=0.5, kd_weight=0.5, label_smoothing=0.0,
                  ignore_index=II, reduction="batchmean")
    assert launches == [False, True]


def test_float64_is_refused_by_the_kernel_and_routed_to_the_reference(device, caplog):
    """The kernel computes in fp32, so it refuses fp64 clearly; the public API sends fp64 to the
    fp64 reference even with backend='triton' (same numbers as backend='torch') and says so."""
    z = rand((5, 20), torch.float64, 58, device=device).requires_grad_(True)
    v = rand((5, 20), torch.float64, 59, device=device)
    y = labels(5, 20, 60, device)
    with pytest.raises(TypeError, match="float64"):
        fused_distill(z, v, y, method="kd", ce_weight=0.5, kd_weight=0.5, label_smoothing=0.0, ignore_index=II,
                      reduction="batchmean")
    _compat._said_once.clear()
    with caplog.at_level(logging.INFO, logger="fastkd"):
        got = fastkd.DistillLoss("dkd", ce_weight=0.5, kd_weight=0.5, backend="triton", **PARAMS["dkd"])(z, v, y)
    assert "float64" in caplog.text and got.dtype == torch.float64
    exact = fastkd.DistillLoss("dkd", ce_weight=0.5, kd_weight=0.5, backend="torch", **PARAMS["dkd"])(z, v, y)
    assert torch.equal(got, exact)


@pytest.mark.parametrize("field,value", [("chunk", 100), ("warps", 0), ("slice", 8), ("split", 1), ("lag", -1)])
def test_bad_launch_config_is_named(field, value):
    with pytest.raises(ValueError, match=f"LaunchConfig.{field}"):
        LaunchConfig(**{field: value})


def test_empty_batch(device):
    z = torch.zeros(0, 10, device=device, requires_grad=True)
    v = torch.zeros(0, 10, device=device)
    y = torch.zeros(0, dtype=torch.long, device=device)
    loss, parts = fused_distill(z, v, y, method="kd", ce_weight=0.5, kd_weight=0.5, label_smoothing=0.0,
                                ignore_index=II, reduction="batchmean")
    assert loss.item() == 0
    loss.backward()
    assert z.grad.shape == (0, 10) and parts["ce"].shape == (0,)


# --------------------------------------------------------------------------------------------
# the compiler (not only the interpreter) accepts every kernel variant
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_kernels_compile_for_hopper_without_a_gpu():
    """The interpreter accepts code the compiler rejects: compile the main variants for sm_90
    with Triton's own compiler and ptxas (no GPU needed; a subprocess, since this process has
    TRITON_INTERPRET set) and require no register spills."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "fastkd.kernels._compile_check", "--arch", "90"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if lines and "skip" in lines[0]:
        pytest.skip(lines[0]["skip"])
    assert len(lines) >= 8, proc.stdout + proc.stderr[-3000:]
    for usage in lines:
        assert usage["SPILL_STORES"] == 0 and usage["SPILL_LOADS"] == 0, f"register spills: {usage}"


# --------------------------------------------------------------------------------------------
# GPU: the benchmark shapes, compiled
# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("method", KD_METHODS)
@pytest.mark.parametrize("shape", [(256, 1000), (4096, 32000), (512, 128256), (2, 262144)])
def test_gpu_large_shapes(method, shape):
    """bf16 at the benchmark shapes; the fp64 reference on a subset of rows (reduction none)."""
    N, C = shape
    dev = torch.device("cuda")
    z = rand((N, C), torch.bfloat16, 61, device=dev)
    v = rand((N, C), torch.bfloat16, 62, device=dev)
    y = labels(N, C, 63, dev, ignored=(0,))
    zk = z.clone().requires_grad_(True)
    loss, parts = fused_distill(zk, v, y, method=method, ce_weight=0.5, kd_weight=0.5, label_smoothing=0.0,
                                ignore_index=II, reduction="none", **PARAMS[method])
    go = rand((N,), torch.float32, 64, device=dev)
    (g,) = torch.autograd.grad(loss, zk, go)
    rows = torch.arange(0, N, max(1, N // 16), device=dev)
    ex = torch_side(method, z[rows].double(), v[rows].double(), y[rows], PARAMS[method], 0.5, 0.5, 0.0, "none",
                    go[rows])
    td = torch_side(method, z[rows], v[rows], y[rows], PARAMS[method], 0.5, 0.5, 0.0, "none", go[rows])
    for name, got, t, e in zip(("loss", "ce", "kd", "grad"), (loss[rows], parts["ce"][rows], parts["kd"][rows],
                                                              g[rows]), td, ex):
        check(f"{method}/{shape}/{name}", got, t, e, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("method", KD_METHODS)
def test_gpu_split_and_chunked_paths_agree(method):
    """Compiled: the split-row path (ordered tickets, spin-waits, published row statistics) gives
    the chunked path's numbers up to fp32 summation order, at the shapes the GPU visit times."""
    dev = torch.device("cuda")
    for N, C in ((4096, 32000), (64, 128256)):
        z = rand((N, C), torch.bfloat16, 65, device=dev)
        v = rand((N, C), torch.bfloat16, 66, device=dev)
        y = labels(N, C, 67, dev, ignored=(1,))
        out = []
        for config in (LaunchConfig(split=False), LaunchConfig(split=True), LaunchConfig(split=True, lag=0)):
            zk = z.clone().requires_grad_(True)
            loss, parts = fused_distill(zk, v, y, method=method, ce_weight=0.5, kd_weight=0.5, label_smoothing=0.1,
                                        ignore_index=II, reduction="batchmean", config=config, **PARAMS[method])
            loss.backward()
            out.append((loss, parts["kd"], zk.grad.float()))
        for loss, kd, g in out[1:]:
            torch.testing.assert_close(loss, out[0][0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(kd, out[0][1], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(g, out[0][2], rtol=2e-2, atol=1e-6)


@pytest.mark.gpu
def test_gpu_nc_above_2_pow_31():
    """N x C > 2^31 elements: 64-bit row offsets (needs ~13 GB of GPU memory)."""
    dev = torch.device("cuda")
    N, C = 16500, 131072  # 2.16e9 elements
    free, _ = torch.cuda.mem_get_info()
    if free < 16 * 2**30:
        pytest.skip("needs ~16 GiB of free GPU memory")
    z = torch.zeros(N, C, dtype=torch.bfloat16, device=dev)
    v = torch.zeros(N, C, dtype=torch.bfloat16, device=dev)
    z[-1, 5] = 3.0
    v[-1, 7] = 2.0
    y = torch.zeros(N, dtype=torch.long, device=dev)
    y[-1] = 7
    zk = z.requires_grad_(True)
    loss, parts = fused_distill(zk, v, y, method="kd", ce_weight=0.5, kd_weight=0.5, label_smoothing=0.0,
                                ignore_index=II, reduction="none", temperature=1.0)
    (g,) = torch.autograd.grad(loss[-1], zk)
    last = torch_side("kd", z[-1:].detach().double(), v[-1:].double(), y[-1:], {"temperature": 1.0}, 0.5, 0.5, 0.0,
                      "none", torch.ones(1, dtype=torch.float64, device=dev))
    torch.testing.assert_close(loss[-1:].double(), last[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g[-1:].double(), last[3], rtol=2e-2, atol=1e-3)
    assert g[:-1].abs().max().item() == 0  # rows 0..N-2 got grad_output 0



def test_create_graph_is_refused_not_silently_zero(device):
    import fastkd

    z = torch.randn(4, 9, device=device, requires_grad=True)
    v = torch.randn(4, 9, device=device)
    loss = fastkd.kd_loss(z, v, 2.0, backend="triton")
    with pytest.raises(RuntimeError, match="higher-order gradients"):
        torch.autograd.grad(loss, z, create_graph=True)
    # the torch backend supports it
    loss = fastkd.kd_loss(z, v, 2.0, backend="torch")
    (g,) = torch.autograd.grad(loss, z, create_graph=True)
    assert g.requires_grad


@pytest.mark.parametrize("method", ["jsd", "rkl"])
def test_llm_divergences_take_the_chunked_path_for_split_rows_and_say_so(method, device, caplog):
    """The split path has no jsd / rkl variant (their gradient needs a row sum over the final
    normalisers): an explicit split configuration runs the chunked path, with the same numbers,
    and says so once."""
    z = rand((3, 700), torch.float32, 80, device=device)
    v = rand((3, 700), torch.float32, 81, device=device)
    y = labels(3, 700, 82, device)
    _compat._said_once.clear()
    with caplog.at_level(logging.INFO, logger="fastkd"):
        a, _, ga = run_case(method, z, v, y, dtype=torch.float32, config=split())
        b, _, gb = run_case(method, z, v, y, dtype=torch.float32, config=LaunchConfig(max_single=128, split=False))
    assert caplog.text.count("split-row path has no jsd / rkl variant") == 1
    assert torch.equal(a, b) and torch.equal(ga, gb)


def test_jsd_end_points_run_as_kd_and_rkl(device):
    """Liger's end points: beta 0 is the forward KL (the kd kernel), beta 1 the reverse KL."""
    z = rand((5, 90), torch.float32, 83, device=device)
    v = rand((5, 90), torch.float32, 84, device=device)
    y = labels(5, 90, 85, device)
    common = dict(ce_weight=0.0, kd_weight=1.0, label_smoothing=0.0, ignore_index=II, reduction="none")
    for beta, other in ((0.0, dict(method="kd")), (1.0, dict(method="rkl"))):
        a, _ = fused_distill(z, v, y, method="jsd", beta=beta, temperature=2.0, **common)
        b, _ = fused_distill(z, v, y, temperature=2.0, **other, **common)
        assert torch.equal(a, b)
        torch.testing.assert_close(a.double(), ref.jsd(z.double(), v.double(), beta, 2.0), rtol=1e-5, atol=1e-6)
