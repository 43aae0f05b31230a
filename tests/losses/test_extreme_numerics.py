"""Extreme numerics of the loss API on both backends (issue 18, items 11-15 and 17), each with a
test that failed on the code before: the accepted temperature range and its accuracy against
fp64, left-out rows that hold NaN, DIST on an empty batch, out-of-range labels with the label
check off, and compressed teachers that carry their labels."""

import math

import pytest
import torch

import fastkd
from fastkd.losses import functional as F

BACKENDS = ["torch", "triton"]


def data(n=8, c=50, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g) * scale
    v = torch.randn(n, c, generator=g) * scale
    y = torch.randint(0, c, (n,), generator=g)
    return z, v, y


# Every temperature-like parameter of every method, all set to T.
TEMPERED = {
    "kd": lambda z, v, y, T, b: fastkd.kd_loss(z, v, T, backend=b),
    "ats": lambda z, v, y, T, b: fastkd.ats_loss(z, v, y, tau_target=T, tau_other=max(T / 2, F.TEMPERATURE_MIN), student_temperature=T,
                                                 backend=b),
    "isats": lambda z, v, y, T, b: fastkd.isats_loss(z, v, y, tau_target=T, candidates=(max(T / 2, F.TEMPERATURE_MIN), T),
                                                     student_temperature=T, backend=b),
    "dkd": lambda z, v, y, T, b: fastkd.dkd_loss(z, v, y, temperature=T, backend=b),
    "dist": lambda z, v, y, T, b: fastkd.dist_loss(z, v, temperature=T, backend=b),
    "jsd": lambda z, v, y, T, b: fastkd.jsd_loss(z, v, beta=0.5, temperature=T, backend=b),
    "rkl": lambda z, v, y, T, b: fastkd.rkl_loss(z, v, temperature=T, backend=b),
}


def test_every_tempered_method_of_the_table_is_swept():
    """A method added to the table with a temperature-like parameter joins the sweeps above."""
    from fastkd.losses.methods import METHOD_TABLE

    tempered = {name for name, m in METHOD_TABLE.items() if any(p.kind == "temperature" for p in m.params)}
    assert tempered <= set(TEMPERED), sorted(tempered - set(TEMPERED))


# ---------------------------------------------------------------- item 11: large temperatures
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", sorted(TEMPERED))
def test_accepted_temperatures_match_fp64(method, backend):
    """A sweep of the accepted range [1e-3, 100]: loss within 1e-3 of fp64 (relative), gradient within
    1e-4 of the largest gradient entry, on both backends."""
    fn = TEMPERED[method]
    z, v, y = data()
    for T in (F.TEMPERATURE_MIN, 1e-2, 0.3, 1.0, 4.0, 20.0, F.TEMPERATURE_MAX):
        zz = z.clone().requires_grad_()
        loss = fn(zz, v, y, T, backend)
        loss.backward()
        zd = z.double().requires_grad_()
        exact = fn(zd, v.double(), y, T, "torch")
        exact.backward()
        assert abs(loss.item() - exact.item()) <= 1e-3 * abs(exact.item()), (T, loss.item(), exact.item())
        gerr = (zz.grad.double() - zd.grad).abs().max().item()
        # The floor where the exact gradient is tiny (saturated softmaxes at small T): fp32 log-probs
        # carry an absolute error of about eps32 * |z| / T, and JSD's and reverse KL's gradients
        # multiply them by T / N (KD's gradient, a difference of probabilities, never reaches it).
        floor = torch.finfo(torch.float32).eps * z.abs().max().item() / z.shape[0]
        assert gerr <= 1e-4 * zd.grad.abs().max().item() + floor, (T, gerr, floor)


@pytest.mark.parametrize("backend", BACKENDS)
def test_temperatures_fp32_cannot_hold_are_refused(backend):
    # Before: T = 1e4 gave 4.80 (fp64: 9.11) and 1e5 a negative KL, on both backends.
    z, v, y = data()
    for T in (1e4, 1e5, 100.5):
        with pytest.raises(ValueError, match=r"temperature must be a number in \[0.001, 100\], got .*above it"):
            fastkd.kd_loss(z, v, T, backend=backend)
    for name in ("tau_target", "tau_other", "student_temperature"):
        with pytest.raises(ValueError, match=f"{name} must be a number in"):
            fastkd.ats_loss(z, v, y, backend=backend, **{name: 1e4})
    with pytest.raises(ValueError, match="candidate temperature must be a number in"):
        fastkd.isats_loss(z, v, y, candidates=(1.0, 1e4), backend=backend)
    with pytest.raises(ValueError, match="temperature must be a number in"):
        fastkd.DistillLoss("dkd", temperature=1e4, backend=backend)
    with pytest.raises(ValueError, match="temperature must be a number in"):
        fastkd.dist_loss(z, v, temperature=1e4, backend=backend)


# ---------------------------------------------------------------- item 12: small temperatures
@pytest.mark.parametrize("backend", BACKENDS)
def test_temperatures_where_logits_overflow_are_refused(backend):
    # Before: T = 1.1755e-38 (fp32's smallest normal) was accepted and gave NaN.
    z, v, y = data()
    for T in (1.1755e-38, 1e-10, 9.99e-4):
        with pytest.raises(ValueError, match=r"got .*below it logits / T overflow"):
            fastkd.kd_loss(z, v, T, backend=backend)
        with pytest.raises(ValueError, match="student_temperature must be a number in"):
            fastkd.isats_loss(z, v, y, student_temperature=T, backend=backend)
        with pytest.raises(ValueError, match="tau_target must be a number in"):
            fastkd.DistillLoss("ats", tau_target=T, backend=backend)
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="temperature must be a number in"):
            fastkd.kd_loss(z, v, bad, backend=backend)


# Scaled logits near 1e36: the interpreter's numpy warns where a difference of two overflows to the
# -inf the kernel then uses correctly (exp(-inf) = 0), and where DKD's unused branches of a
# tl.where meet -inf - -inf.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", sorted(TEMPERED))
def test_losses_are_finite_at_the_range_ends_for_logits_up_to_1e33(method, backend):
    fn = TEMPERED[method]
    g = torch.Generator().manual_seed(3)
    z = (torch.rand(6, 9, generator=g) * 2 - 1) * F.LOGIT_MAX
    v = (torch.rand(6, 9, generator=g) * 2 - 1) * F.LOGIT_MAX
    z[0, 0], v[0, 1] = F.LOGIT_MAX, -F.LOGIT_MAX
    y = torch.randint(0, 9, (6,), generator=g)
    for T in (F.TEMPERATURE_MIN, F.TEMPERATURE_MAX):
        zz = z.clone().requires_grad_()
        loss = fn(zz, v, y, T, backend)
        loss.backward()
        assert loss.isfinite(), (T, loss)
        assert zz.grad.isfinite().all(), T


# ---------------------------------------------------------------- item 13: left-out rows holding NaN
PARAMS = {"kd": {"temperature": 2.0}, "ats": {}, "isats": {"tau_target": 3.0, "candidates": (1.0, 2.0, 3.0)},
          "dkd": {"beta": 2.0}, "dist": {"gamma": 2.0}, "ce": {}, "jsd": {"beta": 0.3}, "rkl": {}}


def _poisoned(n=6, c=7, where="student"):
    z, v, y = data(n, c, seed=5)
    out = (z.clone(), v.clone())
    for i in (1, 4):  # the rows left out
        (out[0] if where == "student" else out[1])[i, 2] = math.nan
    return out[0], out[1], y


# DIST uses every valid row, labelled or not: only valid=False leaves its rows out.
def test_every_method_of_the_table_is_left_out_tested():
    from fastkd.losses.methods import METHOD_TABLE

    assert set(METHOD_TABLE) <= set(PARAMS), sorted(set(METHOD_TABLE) - set(PARAMS))


LEFT_OUT = [(m, how) for m in sorted(PARAMS) for how in ("ignore_index", "valid") if (m, how) != ("dist", "ignore_index")]
# Logit standardisation z-scores whole rows: a left-out NaN row must not reach a z-score's gradient.
PARAMS.update({f"{m}+standardize": {**PARAMS[m], "standardize": True} for m in ("kd", "ats", "dkd")})
LEFT_OUT += [(f"{m}+standardize", how) for m in ("kd", "ats", "dkd") for how in ("ignore_index", "valid")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["student", "teacher"])
@pytest.mark.parametrize("method,how", LEFT_OUT)
# the interpreter computes the z-score of a NaN row (then left out) with numpy, which says so
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_left_out_rows_holding_nan_give_zero_loss_and_zero_gradient(method, how, where, backend):
    # Before: the loss was finite but the left-out rows' gradient was NaN (0 * NaN), on both backends.
    z, v, y = _poisoned(where=where)
    out_rows = torch.tensor([False, True, False, False, True, False])
    valid = None
    if how == "ignore_index":
        y[out_rows] = -100
    else:
        valid = ~out_rows
        y[out_rows] = 99  # a padding row's label is not read either
    crit = fastkd.DistillLoss(method.split("+")[0], ce_weight=0.3, kd_weight=0.7, backend=backend, **PARAMS[method])
    zg = z.clone().requires_grad_()
    loss = crit(zg, v, y, valid=valid)
    loss.backward()
    keep = (~out_rows).nonzero().squeeze(1)
    zs = z[keep].clone().requires_grad_()
    expect = crit(zs, v[keep], y[keep])
    expect.backward()
    assert loss.isfinite()
    torch.testing.assert_close(loss, expect, rtol=1e-5, atol=1e-6)
    assert torch.equal(zg.grad[out_rows], torch.zeros(2, 7)), zg.grad[out_rows]
    torch.testing.assert_close(zg.grad[keep], zs.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["student", "teacher"])
def test_functional_forms_leave_nan_rows_out_exactly(where, backend):
    z, v, y = _poisoned(where=where)
    valid = torch.tensor([True, False, True, True, False, True])
    y_ign = torch.where(valid, y, torch.full_like(y, -100))
    calls = [
        lambda a, b: fastkd.kd_loss(a, b, 2.0, backend=backend, valid=valid),
        lambda a, b: fastkd.dist_loss(a, b, temperature=2.0, backend=backend, valid=valid),
        lambda a, b: fastkd.ats_loss(a, b, y_ign, backend=backend),
        lambda a, b: fastkd.isats_loss(a, b, y, candidates=(1.0, 2.0), backend=backend, valid=valid),
        lambda a, b: fastkd.dkd_loss(a, b, y_ign, backend=backend, valid=valid),
    ]
    if where == "student":
        calls.append(lambda a, b: fastkd.cross_entropy(a, y_ign, label_smoothing=0.1))
    for call in calls:
        zg = z.clone().requires_grad_()
        loss = call(zg, v)
        loss.backward()
        assert loss.isfinite() and zg.grad.isfinite().all()
        assert torch.equal(zg.grad[~valid], torch.zeros(2, 7))


def test_tolerant_and_dpk_leave_nan_rows_out_exactly():
    from fastkd.losses.tolerant import TolerantTeacherLoss

    z, _, y = _poisoned()
    valid = torch.tensor([True, False, True, True, False, True])
    for kwargs in ({"valid": valid}, {}):
        yy = y if kwargs else torch.where(valid, y, torch.full_like(y, -100))
        zg = z.clone().requires_grad_()
        loss = TolerantTeacherLoss(ce_weight=1.0, eta=0.5, k=3)(zg, None, yy, **kwargs)
        loss.backward()
        assert loss.isfinite() and torch.equal(zg.grad[~valid], torch.zeros(2, 7))
    from fastkd.losses.dpk import DPKLoss

    torch.manual_seed(0)
    dpk = DPKLoss([3], [4], seed=0)
    fs = torch.randn(6, 3, 4, 4)
    ft = torch.randn(6, 4, 4, 4)
    fs[1, 0, 0, 0] = math.nan
    ft[4, 1, 2, 2] = math.nan
    fs.requires_grad_()
    loss = dpk([fs], [ft], valid=valid)
    loss.backward()
    assert loss.isfinite() and torch.equal(fs.grad[~valid], torch.zeros(2, 3, 4, 4))
    assert all(p.grad.isfinite().all() for p in dpk.parameters() if p.grad is not None)
    assert math.isfinite(dpk.ratios[0])


# ---------------------------------------------------------------- item 14: DIST on no rows
@pytest.mark.parametrize("backend", BACKENDS)
def test_dist_on_an_empty_batch_is_zero_with_a_zero_gradient(backend):
    # Before: NaN (the mean of no correlations).
    z = torch.empty(0, 5, requires_grad=True)
    loss = fastkd.dist_loss(z, torch.empty(0, 5), backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and z.grad.shape == (0, 5)
    crit = fastkd.DistillLoss("dist", backend=backend)
    assert crit(torch.empty(0, 5), torch.empty(0, 5), torch.empty(0, dtype=torch.long)).item() == 0.0
    z3 = torch.empty(2, 0, 5, requires_grad=True)  # leading dimensions holding no row
    fastkd.dist_loss(z3, torch.empty(2, 0, 5), backend=backend).backward()
    assert z3.grad.shape == (2, 0, 5)


# ---------------------------------------------------------------- item 15: unchecked out-of-range labels
LABELLED = {
    "ats": lambda z, v, y, b, **k: fastkd.ats_loss(z, v, y, backend=b, check_labels=False, **k),
    "isats": lambda z, v, y, b, **k: fastkd.isats_loss(z, v, y, candidates=(1.0, 2.0), backend=b,
                                                       check_labels=False, **k),
    "dkd": lambda z, v, y, b, **k: fastkd.dkd_loss(z, v, y, backend=b, check_labels=False, **k),
}


@pytest.mark.parametrize("method", sorted(LABELLED))
def test_unchecked_out_of_range_labels_give_the_same_nan_rows_on_both_backends(method):
    # Before: torch raised IndexError, Triton returned NaN.
    fn = LABELLED[method]
    z, v, y = data(5, 7, seed=2)
    y[1], y[3] = 7, -3  # outside [0, 7), not ignore_index
    got = {}
    for b in BACKENDS:
        rows = fn(z, v, y, b, reduction="none")
        assert rows.isnan().tolist() == [False, True, False, True, False], (b, rows)
        zg = z.clone().requires_grad_()
        loss = fn(zg, v, y, b)
        loss.backward()
        assert loss.isnan()
        assert zg.grad[[1, 3]].isnan().all() and zg.grad[[0, 2, 4]].isfinite().all()
        got[b] = (rows, zg.grad)
    torch.testing.assert_close(got["torch"][0], got["triton"][0], rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(got["torch"][1], got["triton"][1], rtol=1e-5, atol=1e-7, equal_nan=True)
    # the other rows are what a checked call on them gives
    keep = torch.tensor([0, 2, 4])
    torch.testing.assert_close(got["torch"][0][keep], fn(z[keep], v[keep], y[keep], "torch", reduction="none"))


@pytest.mark.parametrize("method", ["ce", "kd", "ats", "dkd"])
def test_unchecked_out_of_range_labels_in_distill_loss_agree(method):
    z, v, y = data(5, 7, seed=4)
    y[2] = 12
    out = {}
    for b in BACKENDS:
        crit = fastkd.DistillLoss(method, backend=b, check_labels=False)
        zg = z.clone().requires_grad_()
        loss = crit(zg, v, y)
        loss.backward()
        assert loss.isnan(), b
        assert zg.grad[2].isnan().all() and zg.grad[[0, 1, 3, 4]].isfinite().all(), b
        out[b] = zg.grad
    torch.testing.assert_close(out["torch"], out["triton"], rtol=1e-5, atol=1e-7, equal_nan=True)
