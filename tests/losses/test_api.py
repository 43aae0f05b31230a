"""The public loss API (torch backend): reductions, shapes, dtypes, gradients against the
closed forms of methods.md, DistillLoss, backend selection and input validation."""
import logging
import math

import pytest
import torch
import torch.nn.functional as tF

import fastkd
from fastkd import _compat
from fastkd.losses import reference as ref

D = torch.float64


def rand(*shape, scale=3.0, seed=0, dtype=D):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=D) * scale).to(dtype)


def labels(*shape, c, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, c, shape, generator=g)


# ---------------------------------------------------------------- gradients vs closed forms
def test_kd_gradient_closed_form():
    z, v, T = rand(6, 9).requires_grad_(), rand(6, 9, seed=1), 3.0
    fastkd.kd_loss(z, v, T, backend="torch").backward()
    expect = T * (torch.softmax(z / T, -1) - torch.softmax(v / T, -1)) / 6
    torch.testing.assert_close(z.grad, expect)


def test_ats_gradient_closed_form():
    z, v, y = rand(7, 8).requires_grad_(), rand(7, 8, seed=1), labels(7, c=8)
    y[3] = -100
    tt, to, s = 4.0, 1.5, 2.0
    fastkd.ats_loss(z, v, y, tt, to, s, backend="torch").backward()
    q = ref.ats_teacher_log_probs(v, y, tt, to).exp()
    g = s * (torch.softmax(z / s, -1) - q) / 6  # 6 rows are not ignored
    g[3] = 0
    torch.testing.assert_close(z.grad, g)


def test_dkd_gradient_closed_form():
    z, v, y = rand(5, 7).requires_grad_(), rand(5, 7, seed=2), labels(5, c=7)
    T, a, b = 2.0, 1.0, 8.0
    fastkd.dkd_loss(z, v, y, a, b, T, backend="torch").backward()
    with torch.no_grad():
        on = tF.one_hot(y, 7).bool()
        ps, pt = torch.softmax(z / T, -1), torch.softmax(v / T, -1)
        ps_y, pt_y = ps[on], pt[on]
        d = (ps_y - pt_y)[:, None]
        ps_hat = torch.where(on, 0.0, ps / (1 - ps_y)[:, None])
        pt_hat = torch.where(on, 0.0, pt / (1 - pt_y)[:, None])
        tckd = torch.where(on, T * d, -T * ps_hat * d)  # methods.md: p^s_i is the non-target softmax
        nckd = torch.where(on, 0.0, T * (ps_hat - pt_hat))
        expect = (a * tckd + b * nckd) / 5
    torch.testing.assert_close(z.grad, expect)


def test_ce_gradient_through_distill_loss():
    z, y = rand(4, 6).requires_grad_(), labels(4, c=6)
    eps = 0.1
    fastkd.DistillLoss("ce", ce_weight=1.0, kd_weight=0.0, label_smoothing=eps, backend="torch")(z, None, y).backward()
    target = (1 - eps) * tF.one_hot(y, 6) + eps / 6
    torch.testing.assert_close(z.grad, (torch.softmax(z, -1) - target) / 4)


def test_teacher_gets_no_gradient():
    z, v, y = rand(3, 5).requires_grad_(), rand(3, 5, seed=1).requires_grad_(), labels(3, c=5)
    for fn in (lambda: fastkd.kd_loss(z, v), lambda: fastkd.ats_loss(z, v, y), lambda: fastkd.dkd_loss(z, v, y),
               lambda: fastkd.isats_loss(z, v, y), lambda: fastkd.dist_loss(z, v)):
        fn().backward()
    assert v.grad is None and z.grad is not None


# ---------------------------------------------------------------- reductions, shapes, dtypes
def test_reductions_and_leading_dims():
    z, v, y = rand(2, 3, 6), rand(2, 3, 6, seed=1), labels(2, 3, c=6)
    y[0, 1] = -100
    none = fastkd.ats_loss(z, v, y, reduction="none")
    assert none.shape == (2, 3) and none[0, 1] == 0
    torch.testing.assert_close(fastkd.ats_loss(z, v, y, reduction="sum"), none.sum())
    torch.testing.assert_close(fastkd.ats_loss(z, v, y), none.sum() / 5)
    flat = fastkd.ats_loss(z.reshape(6, 6), v.reshape(6, 6), y.reshape(6), reduction="none")
    torch.testing.assert_close(none.reshape(6), flat)
    kd_none = fastkd.kd_loss(z, v, reduction="none")
    assert kd_none.shape == (2, 3)
    torch.testing.assert_close(fastkd.kd_loss(z, v), kd_none.mean())  # kd: mean over all rows


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_compute_in_fp32(dtype):
    z, v, y = rand(8, 10, dtype=dtype), rand(8, 10, seed=1, dtype=dtype), labels(8, c=10)
    for fn in (fastkd.kd_loss, lambda a, b: fastkd.dkd_loss(a, b, y), lambda a, b: fastkd.ats_loss(a, b, y)):
        out = fn(z, v)
        assert out.dtype == torch.float32
        exact = fn(z.double(), v.double())  # same (rounded) inputs, fp64 math
        torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-6)


def test_all_rows_ignored_gives_zero_and_zero_grad():
    z, v = rand(4, 5).requires_grad_(), rand(4, 5, seed=1)
    y = torch.full((4,), -100)
    for method in ("kd", "ats", "isats", "dkd"):
        z.grad = None
        loss = fastkd.DistillLoss(method, backend="torch")(z, v, y)
        loss.backward()
        assert loss.item() == 0.0 and torch.equal(z.grad, torch.zeros_like(z))
    assert fastkd.dkd_loss(z, v, y).item() == 0.0


def test_nan_row_is_reported_not_hidden():
    z, v = rand(3, 4), rand(3, 4, seed=1)
    v[1, 2] = math.nan
    rows = fastkd.kd_loss(z, v, reduction="none")
    assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2]]).all()
    assert torch.isnan(fastkd.kd_loss(z, v))


# ---------------------------------------------------------------- DistillLoss
@pytest.mark.parametrize("method,params,fn", [
    ("kd", {"temperature": 2.0}, lambda z, v, y: fastkd.kd_loss(z, v, 2.0)),
    ("ats", {"tau_target": 3.0, "tau_other": 1.5}, lambda z, v, y: fastkd.ats_loss(z, v, y, 3.0, 1.5)),
    ("isats", {"tau_target": 3.0}, lambda z, v, y: fastkd.isats_loss(z, v, y, 3.0)),
    ("dkd", {"alpha": 1.0, "beta": 2.0, "temperature": 4.0}, lambda z, v, y: fastkd.dkd_loss(z, v, y, 1.0, 2.0, 4.0)),
    ("dist", {"beta": 1.0, "gamma": 2.0}, lambda z, v, y: fastkd.dist_loss(z, v, 1.0, 2.0)),
])
def test_distill_loss_is_weighted_sum(method, params, fn):
    z, v, y = rand(6, 7), rand(6, 7, seed=1), labels(6, c=7)
    crit = fastkd.DistillLoss(method, ce_weight=0.3, kd_weight=0.7, label_smoothing=0.1, **params)
    expect = 0.3 * tF.cross_entropy(z, y, label_smoothing=0.1) + 0.7 * fn(z, v, y)
    torch.testing.assert_close(crit(z, v, y), expect)
    torch.testing.assert_close(crit.last_terms["ce"], tF.cross_entropy(z, y, label_smoothing=0.1))
    torch.testing.assert_close(crit.last_terms["kd"], fn(z, v, y))


@pytest.mark.parametrize("method", ["kd", "ats", "dkd", "dist"])
def test_zero_ce_weight_drops_an_infinite_ce(method):
    """ce_weight=0: a row whose label class the student masks (CE = +inf) must not turn the
    loss into 0 * inf = NaN; the loss is the KD term alone (as on the fused backend)."""
    z, v, y = rand(4, 6), rand(4, 6, seed=1), labels(4, c=6)
    z[0, y[0]] = v[0, y[0]] = -math.inf  # masked in both: KD stays finite, CE is +inf
    z.requires_grad_()
    crit = fastkd.DistillLoss(method, ce_weight=0.0, kd_weight=0.7, backend="torch")
    out = crit(z, v, y)
    kd = {"kd": lambda: fastkd.kd_loss(z, v), "ats": lambda: fastkd.ats_loss(z, v, y),
          "dkd": lambda: fastkd.dkd_loss(z, v, y), "dist": lambda: fastkd.dist_loss(z, v)}[method]()
    assert torch.isfinite(out)
    torch.testing.assert_close(out, 0.7 * kd)
    out.backward()
    assert torch.isfinite(z.grad).all()


def test_distill_loss_kd_skips_ignored_rows():
    z, v, y = rand(5, 6), rand(5, 6, seed=1), labels(5, c=6)
    y[0] = -100
    crit = fastkd.DistillLoss("kd", ce_weight=0.0, kd_weight=1.0)
    torch.testing.assert_close(crit(z, v, y), fastkd.kd_loss(z[1:], v[1:]))


def test_dkd_warmup_in_distill_loss():
    z, v, y = rand(4, 5), rand(4, 5, seed=1), labels(4, c=5)
    crit = fastkd.DistillLoss("dkd", ce_weight=0.0, kd_weight=1.0, warmup_epochs=4)
    full = fastkd.dkd_loss(z, v, y)
    crit.set_epoch(0)
    assert crit(z, v, y).item() == 0.0
    crit.set_epoch(1)
    torch.testing.assert_close(crit(z, v, y), 0.25 * full)
    crit.set_epoch(10)
    torch.testing.assert_close(crit(z, v, y), full)


def test_ce_method_needs_no_teacher_and_others_do():
    z, y = rand(3, 4), labels(3, c=4)
    torch.testing.assert_close(fastkd.DistillLoss("ce", ce_weight=1.0)(z, None, y), tF.cross_entropy(z, y))
    with pytest.raises(ValueError, match="needs teacher_logits"):
        fastkd.DistillLoss("kd")(z, None, y)


# ---------------------------------------------------------------- backends
def test_auto_falls_back_to_torch_on_cpu_and_says_so_once(caplog, monkeypatch):
    monkeypatch.setattr(_compat, "_said_once", set())
    z, v = rand(3, 4), rand(3, 4, seed=1)
    with caplog.at_level(logging.INFO, logger="fastkd"):
        a = fastkd.kd_loss(z, v, backend="auto")
        fastkd.kd_loss(z, v, backend="auto")
    msgs = [r.message for r in caplog.records if "backend 'auto'" in r.message]
    assert len(msgs) == 1 and "reference" in msgs[0]
    torch.testing.assert_close(a, fastkd.kd_loss(z, v, backend="torch"))


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="backend='triton' cannot run here.*TRITON_INTERPRET"):
        fastkd.kd_loss(rand(2, 3), rand(2, 3), backend="triton")


# ---------------------------------------------------------------- validation
Z, V, Y = rand(4, 5), rand(4, 5, seed=1), labels(4, c=5)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: fastkd.kd_loss(Z, rand(4, 6)), ValueError, "class count mismatch.*5.*6"),
    (lambda: fastkd.kd_loss(Z, rand(3, 5)), ValueError, "shape mismatch"),
    (lambda: fastkd.kd_loss(Z.long(), V), TypeError, "floating"),
    (lambda: fastkd.kd_loss([1.0], V), TypeError, "torch.Tensor"),
    (lambda: fastkd.kd_loss(rand(4, 1), rand(4, 1)), ValueError, "at least 2"),
    (lambda: fastkd.kd_loss(Z, V, temperature=0), ValueError, r"temperature must be a number in \[0.001, 100\], got 0"),
    (lambda: fastkd.kd_loss(Z, V, temperature=-1.0), ValueError, "temperature"),
    (lambda: fastkd.kd_loss(Z, V, temperature=float("nan")), ValueError, "temperature"),
    (lambda: fastkd.kd_loss(Z, V, reduction="mean"), ValueError, "unknown reduction 'mean'"),
    (lambda: fastkd.kd_loss(Z, V, backend="cuda"), ValueError, "unknown backend 'cuda'"),
    (lambda: fastkd.ats_loss(Z, V, Y.float()), TypeError, "integer class indices"),
    (lambda: fastkd.ats_loss(Z, V, Y[:3]), ValueError, r"target shape \(3,\)"),
    (lambda: fastkd.ats_loss(Z, V, torch.tensor([0, 1, 5, 2])), ValueError, r"label 5 outside \[0, 5\)"),
    (lambda: fastkd.ats_loss(Z, V, torch.tensor([0, -1, 2, 2])), ValueError, "label -1 outside"),
    (lambda: fastkd.ats_loss(Z, V, Y, tau_target=0.0), ValueError, "tau_target"),
    (lambda: fastkd.ats_loss(Z, V, Y, tau_other=-2.0), ValueError, "tau_other"),
    (lambda: fastkd.ats_loss(Z, V, Y, student_temperature=0), ValueError, "student_temperature"),
    (lambda: fastkd.isats_loss(Z, V, Y, candidates=[1.0, 0.0]), ValueError, "candidate"),
    (lambda: fastkd.isats_loss(Z, V, Y, candidates=[]), ValueError, "at least one"),
    (lambda: fastkd.dkd_loss(Z, V, Y, temperature=0), ValueError, "temperature"),
    (lambda: fastkd.dkd_loss(Z, V, Y, beta=-1), ValueError, "beta"),
    (lambda: fastkd.DistillLoss("fitnet"), ValueError, "unknown method 'fitnet'"),
    (lambda: fastkd.DistillLoss("kd", tau_other=2.0), ValueError, "unknown parameter.*tau_other.*'kd'"),
    (lambda: fastkd.DistillLoss("kd", backend="xla"), ValueError, "unknown backend"),
    (lambda: fastkd.DistillLoss("kd", temperature=0), ValueError, "temperature"),
    (lambda: fastkd.DistillLoss("kd", label_smoothing=1.5), ValueError, "label_smoothing"),
])
def test_bad_input_is_a_clear_error(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_ignore_index_is_not_out_of_range():
    y = torch.tensor([0, -100, 2, 4])
    assert torch.isfinite(fastkd.ats_loss(Z, V, y))
    y2 = torch.tensor([0, 7, 2, 4])
    assert torch.isfinite(fastkd.ats_loss(Z, V, y2, ignore_index=7))


def test_label_checks_can_be_disabled():
    # unchecked, an out-of-range label makes its row NaN (never an index; issue 18 item 15)
    rows = fastkd.ats_loss(Z, V, torch.tensor([0, 1, 9, 2]), backend="torch", check_labels=False, reduction="none")
    assert rows.isnan().tolist() == [False, False, True, False]


# ---------------------------------------------------------------- documentation
@pytest.mark.parametrize("fn", [fastkd.kd_loss, fastkd.ats_loss, fastkd.isats_loss, fastkd.dkd_loss,
                                fastkd.dist_loss, fastkd.cross_entropy, fastkd.DistillLoss])
def test_public_functions_are_documented(fn):
    doc = fn.__doc__
    for section in ("Args", "Returns", "Raises", "Example"):
        assert section in doc, (fn.__name__, section)
    if fn is fastkd.DistillLoss:
        assert "mdistiller" in doc and "torchdistill" in doc and "all rows" in doc
        assert "batchmean" in fastkd.kd_loss.__doc__ and "triton" in fastkd.kd_loss.__doc__


def test_docstring_examples_run():
    import doctest

    for fn in (fastkd.kd_loss, fastkd.ats_loss, fastkd.isats_loss, fastkd.dkd_loss, fastkd.dist_loss,
               fastkd.cross_entropy, fastkd.DistillLoss):
        examples = doctest.DocTestParser().get_examples(fn.__doc__)
        assert examples, fn.__name__
        scope = {"torch": torch, "fastkd": fastkd}
        for ex in examples:
            exec(compile(ex.source, fn.__name__, "exec"), scope)


@pytest.mark.parametrize("epoch, exc", [(float("nan"), ValueError), (float("inf"), ValueError), ("3", TypeError),
                                        (True, TypeError), (None, TypeError)])
def test_set_epoch_refuses_what_is_not_a_finite_number(epoch, exc):
    # Before: "3" and True were taken as 3.0 and 1.0, and NaN made every DKD loss NaN (warm-up
    # weight min(nan / W, 1) = nan) without naming the cause.
    crit = fastkd.DistillLoss("dkd", warmup_epochs=20)
    with pytest.raises(exc, match="epoch"):
        crit.set_epoch(epoch)
    crit.set_epoch(5)
    assert crit.effective_kd_weight() == pytest.approx(0.5 * 5 / 20)
