"""Defects of the adversarial pass (issue 11) in the loss layer, each with a test that failed on
the old code: narrow label dtypes, DKD's shift invariance on the torch backend, one upcast for
bf16/fp16 gradients, temperatures outside fp32's normal range and non-numeric parameters."""

import math
import pytest
import torch

import fastkd
from fastkd.losses import reference as ref

BACKENDS = ["torch", "triton"]


# ---------------------------------------------------------------- item 2: uint8 labels
@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_index_applies_only_where_the_label_dtype_can_hold_it(backend):
    g = torch.Generator().manual_seed(0)
    C = 200
    z, v = torch.randn(4, C, generator=g), torch.randn(4, C, generator=g)
    y64 = torch.tensor([156, 3, 199, 0])
    y8 = y64.to(torch.uint8)  # uint8 cannot hold -100: 156 is class 156, never "ignored"
    for method in ("ce", "kd", "ats", "dkd"):
        crit = fastkd.DistillLoss(method, backend=backend)
        torch.testing.assert_close(crit(z, v, y8), crit(z, v, y64))
    torch.testing.assert_close(fastkd.ats_loss(z, v, y8, reduction="none", backend=backend),
                               fastkd.ats_loss(z, v, y64, reduction="none", backend=backend))
    # where the dtype can hold ignore_index, it applies: uint8 156 with ignore_index=156
    rows = fastkd.dkd_loss(z, v, y8, ignore_index=156, reduction="none", backend=backend)
    assert rows[0] == 0 and (rows[1:] > 0).all()
    # int8 holds -100
    y_i8 = torch.tensor([-100, 3, 100, 0], dtype=torch.int8)
    rows = fastkd.ats_loss(z, v, y_i8, reduction="none", backend=backend)
    assert rows[0] == 0 and (rows[1:] > 0).all()


# ---------------------------------------------------------------- item 5: DKD in LSE forms
def _dkd_truth(z, v, y, alpha, beta, T):
    """fp64 DKD from probabilities of explicitly max-shifted rows (the textbook definition)."""
    ps, pt = (torch.softmax((x.double() / T) - (x.double() / T).amax(-1, keepdim=True), -1) for x in (z, v))
    on = torch.zeros_like(ps, dtype=torch.bool).scatter_(1, y[:, None], True)

    def kl(p, q):
        return torch.where(p == 0, torch.zeros_like(p), p * (p.log() - q.log())).sum(-1)

    s_y, t_y = ps[on], pt[on]
    tckd = kl(torch.stack([t_y, 1 - t_y], -1), torch.stack([s_y, 1 - s_y], -1))
    nckd = kl(torch.where(on, 0, pt) / (1 - t_y)[:, None], torch.where(on, 0, ps) / (1 - s_y)[:, None])
    return T * T * (alpha * tckd + beta * nckd)


# The interpreter evaluates with numpy, which warns where an intermediate (e.g. a difference of two
# logits near 3e38) overflows to an inf that the kernel then uses correctly (exp(-inf) = 0).
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_dkd_is_shift_invariant_at_huge_logit_scale(backend):
    # Logits near 3e38: x_y - LSE(x) cancels two values ~7.5e37 (the old torch path gave 0 here).
    z = torch.tensor([[2e38, 2e38, -3e38, 2e38]])
    v = torch.tensor([[2e38, 1e38, -1e38, 2e38]])
    y = torch.tensor([3])
    truth = _dkd_truth(z, v, y, 1.0, 8.0, 4.0)
    assert 89.6 < truth.item() < 89.7
    out = fastkd.dkd_loss(z, v, y, backend=backend)
    torch.testing.assert_close(out.double(), truth[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(fastkd.dkd_loss(z.double(), v.double(), y, backend="torch"), truth[0])


def test_dkd_torch_error_at_scale_100_is_comparable_to_the_kernel():
    g = torch.Generator().manual_seed(28)
    z, v = torch.randn(32, 100, generator=g) * 100, torch.randn(32, 100, generator=g) * 100
    y = torch.randint(0, 100, (32,), generator=g)
    truth = _dkd_truth(z, v, y, 1.0, 8.0, 4.0)

    def worst(backend):
        rows = fastkd.dkd_loss(z, v, y, reduction="none", backend=backend).double()
        return ((rows - truth).abs() / truth.abs()).max().item()

    torch_err, kernel_err = worst("torch"), worst("triton")
    assert torch_err <= 2 * max(kernel_err, 1e-6), (torch_err, kernel_err)  # old x_y - LSE form: 2.4e-2 (kernel 5.1e-4)


def test_dkd_gradient_unchanged_by_the_shift():
    g = torch.Generator().manual_seed(1)
    z = (torch.randn(5, 9, generator=g, dtype=torch.float64) * 3).requires_grad_()
    v, y = torch.randn(5, 9, generator=g, dtype=torch.float64), torch.randint(0, 9, (5,), generator=g)
    fastkd.dkd_loss(z, v, y, 1.0, 2.0, 2.0).backward()
    zs = (z.detach() + 1000.0).requires_grad_()
    fastkd.dkd_loss(zs, v + 1000.0, y, 1.0, 2.0, 2.0).backward()
    torch.testing.assert_close(zs.grad, z.grad)


# ---------------------------------------------------------------- item 9: upcast once
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_ce_and_kd_gradients_add_in_fp32(dtype):
    g = torch.Generator().manual_seed(0)
    n, c = 64, 100
    z = (torch.randn(n, c, generator=g) * 2).to(dtype)
    v = (torch.randn(n, c, generator=g) * 2).to(dtype)
    y = torch.randint(0, c, (n,), generator=g)
    zd = z.double().requires_grad_()
    g_ce, = torch.autograd.grad(0.5 * ref.cross_entropy(zd, y).mean(), zd)
    g_kd, = torch.autograd.grad(0.5 * ref.kd(zd, v.double(), 1.0).mean(), zd)
    exact = g_ce + g_kd
    # elements where rounding each term to `dtype` and adding them there gives exactly 0
    cancel = ((g_ce.to(dtype) + g_kd.to(dtype)) == 0) & (exact.to(dtype) != 0)
    assert cancel.any()
    zz = z.clone().requires_grad_()
    fastkd.DistillLoss("kd", backend="torch")(zz, v, y).backward()
    got = zz.grad.double()
    assert (got[cancel] != 0).all() and (got[cancel].sign() == exact[cancel].sign()).all()
    ulp = torch.finfo(dtype).eps
    assert ((got - exact).abs() <= ulp * exact.abs() + torch.finfo(dtype).tiny).all()


# ---------------------------------------------------------------- item 10: parameters
TINY, BIG = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max
Z, V, Y = torch.randn(3, 5), torch.randn(3, 5), torch.tensor([0, 1, 2])


@pytest.mark.parametrize("call,exc,match", [
    (lambda: fastkd.kd_loss(Z, V, temperature=TINY / 4), ValueError, r"temperature must be a number in \[0.001, 100\]"),
    (lambda: fastkd.kd_loss(Z, V, temperature=BIG * 4.0), ValueError, "temperature must be a number in"),
    (lambda: fastkd.kd_loss(Z, V, temperature=2e19), ValueError, "above it fp32 cannot hold the loss"),
    (lambda: fastkd.ats_loss(Z, V, Y, tau_target=1e30), ValueError, "tau_target"),
    (lambda: fastkd.dkd_loss(Z, V, Y, temperature=1e-39), ValueError, "temperature"),
    (lambda: fastkd.ats_loss(Z, V, Y, tau_other=1e39), ValueError, "tau_other"),
    (lambda: fastkd.isats_loss(Z, V, Y, candidates=[1.0, 1e-40]), ValueError, "candidate"),
    (lambda: fastkd.dkd_loss(Z, V, Y, beta=None), TypeError, "beta must be a number, got None"),
    (lambda: fastkd.dkd_loss(Z, V, Y, alpha=1e39), ValueError, "alpha"),
    (lambda: fastkd.kd_loss(Z, V, temperature="4"), TypeError, "temperature must be a number, got '4'"),
    (lambda: fastkd.kd_loss(Z, V, temperature=True), TypeError, "temperature must be a number, got True"),
    (lambda: fastkd.dist_loss(Z, V, gamma=False), TypeError, "gamma must be a number"),
    (lambda: fastkd.isats_loss(Z, V, Y, candidates="24"), TypeError, "candidates must be a sequence"),
    (lambda: fastkd.ats_loss(Z, V, Y, ignore_index=-100.0), TypeError, "ignore_index must be an integer"),
    (lambda: fastkd.DistillLoss("kd", temperature="4"), TypeError, "temperature must be a number"),
    (lambda: fastkd.DistillLoss("dkd", beta=None), TypeError, "beta must be a number, got None"),
    (lambda: fastkd.DistillLoss("kd", kd_weight=True), TypeError, "kd_weight must be a number"),
])
def test_bad_parameters_are_clear_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# At T = 1e-3 the kernel's DKD overflows exp on the label column of the non-target terms, a value
# it never uses (the interpreter's numpy warns).
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_temperatures_at_the_edges_of_the_accepted_range_are_accepted(backend):
    # (issue 18 narrowed the range to [1e-3, 100]; tests/losses/test_extreme_numerics.py checks it)
    for T in (1e-3, 100.0):
        assert fastkd.kd_loss(Z, V, temperature=T, backend=backend).isfinite()
        assert fastkd.dkd_loss(Z, V, Y, temperature=T, backend=backend).isfinite()
    assert fastkd.kd_loss(Z, V, temperature=torch.tensor(2.0)).isfinite()


def test_label_smoothing_mean_does_not_overflow_near_fp32_max():
    z = torch.tensor([[3e38, 3e38, 3e38, 2e38, -1e38]])
    y = torch.tensor([0])
    truth = fastkd.cross_entropy(z.double(), y, label_smoothing=0.1)
    assert 0.99e37 < truth.item() < 1.01e37
    torch.testing.assert_close(fastkd.cross_entropy(z, y, label_smoothing=0.1).double(), truth, rtol=1e-6, atol=0)
