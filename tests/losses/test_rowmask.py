"""Padding as a row mask: ``valid`` rows only, for every method and both backends; an all-padding
batch gives 0 and a zero gradient; ``check_labels`` replaces the process-wide switch."""
import math

import pytest
import torch

import fastkd
from fastkd.losses import reference as ref

METHODS = {"kd": {"temperature": 2.0}, "ats": {}, "isats": {"tau_target": 3.0, "candidates": (1.0, 2.0, 3.0)}, "dkd": {"beta": 2.0},
           "dist": {"gamma": 2.0}, "ce": {}, "jsd": {"beta": 0.3, "temperature": 2.0}, "rkl": {"temperature": 1.5}}
BACKENDS = ["torch", "triton"]


def test_every_method_of_the_table_is_row_mask_tested():
    from fastkd.losses.methods import METHOD_TABLE

    assert set(METHODS) == set(METHOD_TABLE)


def data(n=6, c=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g) * 3
    v = torch.randn(n, c, generator=g) * 3
    y = torch.randint(0, c, (n,), generator=g)
    return z, v, y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_masked_rows_count_for_nothing(method, backend):
    z, v, y = data()
    valid = torch.tensor([True, False, True, True, False, True])
    y[1] = 99  # a padding row's label may be anything: it is not checked and not used
    crit = fastkd.DistillLoss(method, ce_weight=0.3, kd_weight=0.7, backend=backend, **METHODS[method])
    zg = z.clone().requires_grad_()
    out = crit(zg, v, y, valid=valid)
    out.backward()
    keep = valid.nonzero().squeeze(1)
    zs = z[keep].clone().requires_grad_()
    expect = crit(zs, v[keep], y[keep])
    expect.backward()
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-6)
    assert torch.equal(zg.grad[~valid], torch.zeros_like(zg.grad[~valid]))
    torch.testing.assert_close(zg.grad[keep], zs.grad, rtol=1e-5, atol=1e-7)
    crit(z, v, y, valid=valid)
    terms = crit.last_terms
    crit(z[keep], v[keep], y[keep])
    for k in ("ce", "kd"):
        torch.testing.assert_close(terms[k], crit.last_terms[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_all_padding_batch_is_zero_without_nan(method, backend):
    z, v, y = data(4, 5)
    z.requires_grad_()
    crit = fastkd.DistillLoss(method, ce_weight=1.0, kd_weight=2.0, backend=backend, **METHODS[method])
    out = crit(z, v, y, valid=torch.zeros(4, dtype=torch.bool))
    out.backward()
    assert out.item() == 0.0 and torch.equal(z.grad, torch.zeros_like(z))
    assert all(t.item() == 0.0 for t in crit.last_terms.values())


def test_dist_statistics_use_valid_rows_only():
    z, v, _ = data(8, 5)
    valid = torch.tensor([1, 1, 0, 1, 0, 1, 1, 1], dtype=torch.bool)
    keep = valid.nonzero().squeeze(1)
    torch.testing.assert_close(fastkd.dist_loss(z, v, 1.0, 2.0, 2.0, valid=valid),
                               ref.dist(z[keep], v[keep], 1.0, 2.0, 2.0))
    # the padding rows' contents do not matter (not even huge values)
    z2 = z.clone()
    z2[~valid] = 1e30
    torch.testing.assert_close(fastkd.dist_loss(z2, v, valid=valid), fastkd.dist_loss(z, v, valid=valid))
    # all rows valid: the same as no mask
    torch.testing.assert_close(fastkd.dist_loss(z, v, valid=torch.ones(8, dtype=torch.bool)), fastkd.dist_loss(z, v))


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_losses_take_a_row_mask(backend):
    z, v, y = data()
    valid = torch.tensor([True, True, False, True, False, True])
    keep = valid.nonzero().squeeze(1)
    for fn in (lambda a, b, t, **k: fastkd.kd_loss(a, b, 2.0, backend=backend, **k),
               lambda a, b, t, **k: fastkd.ats_loss(a, b, t, backend=backend, **k),
               lambda a, b, t, **k: fastkd.dkd_loss(a, b, t, backend=backend, **k)):
        torch.testing.assert_close(fn(z, v, y, valid=valid), fn(z[keep], v[keep], y[keep]), rtol=1e-5, atol=1e-6)
        rows = fn(z, v, y, valid=valid, reduction="none")
        assert rows.shape == (6,) and torch.equal(rows[~valid], torch.zeros(2))
    torch.testing.assert_close(fastkd.cross_entropy(z, y, valid=valid), fastkd.cross_entropy(z[keep], y[keep]))


@pytest.mark.parametrize("bad,exc,match", [
    (torch.ones(6), TypeError, "valid must be a bool"),
    ([True] * 6, TypeError, "valid must be a bool"),
    (torch.ones(5, dtype=torch.bool), ValueError, r"valid shape \(5,\)"),
])
def test_bad_row_mask_is_a_clear_error(bad, exc, match):
    z, v, y = data()
    with pytest.raises(exc, match=match):
        fastkd.DistillLoss("kd")(z, v, y, valid=bad)


def test_check_labels_is_an_argument_not_a_process_switch():
    z, v, y = data()
    y[2] = 9
    with pytest.raises(ValueError, match="label 9 outside"):
        fastkd.DistillLoss("ats", backend="torch")(z, v, y)
    # not checked: the row is NaN (never an index; issue 18 item 15)
    assert fastkd.DistillLoss("ats", backend="torch", check_labels=False)(z, v, y).isnan()
    assert fastkd.ats_loss(z, v, y, backend="torch", check_labels=False).isnan()
    # a checked call elsewhere is unaffected by an unchecked loss object
    with pytest.raises(ValueError, match="label 9 outside"):
        fastkd.ats_loss(z, v, y)
    with pytest.raises(TypeError, match="check_labels"):
        fastkd.DistillLoss("kd", check_labels="no")


def test_unchecked_label_on_triton_gives_nan_row():
    z, v, y = data()
    y[2] = 9
    out = fastkd.DistillLoss("dkd", backend="triton", check_labels=False)(z, v, y)
    assert math.isnan(out.item())


def test_no_process_wide_label_switch():
    import fastkd.losses.functional as F

    assert not hasattr(fastkd, "set_label_checks") and not hasattr(F, "set_label_checks")
    assert not hasattr(F, "_label_checks")


@pytest.mark.gpu
@pytest.mark.parametrize("method", sorted(METHODS))
def test_row_mask_and_topk_teacher_need_no_host_sync_on_cuda(method):
    """The loss layer's own work (mask folding, DIST's masked statistics, densifying a TopKTeacher)
    never synchronises with the host (torch backend: the fused kernel's launch is tested in tests/ops)."""
    z, v, y = (t.cuda() for t in data(64, 100))
    valid = torch.ones(64, dtype=torch.bool, device="cuda")
    valid[-5:] = False
    t = fastkd.compress_topk(v, y, 10)
    crit = fastkd.DistillLoss(method, backend="torch", check_labels=False, **METHODS[method])
    z.requires_grad_()
    crit(z, v, y, valid=valid)  # warm-up: kernel compilation may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for teacher in (v, t):
            crit(z, teacher, y, valid=valid).backward()
            crit.last_terms
    finally:
        torch.cuda.set_sync_debug_mode(0)
