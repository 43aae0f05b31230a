"""The language-model divergences: generalised JSD (Liger's beta) and reverse KL, in the reference,
the functional API and DistillLoss (the fused kernel's conformance tests are in tests/ops)."""
import math

import pytest
import torch

import fastkd
from fastkd.losses import reference as ref


def data(n=6, c=9, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, c, generator=g, dtype=torch.float64) * 2).to(dtype)
    v = (torch.randn(n, c, generator=g, dtype=torch.float64) * 2).to(dtype)
    y = torch.randint(0, c, (n,), generator=g)
    return z, v, y


def test_jsd_is_liger_generalised_jsd_with_t_squared():
    """beta KL(P||M) + (1-beta) KL(Q||M), M = beta P + (1-beta) Q, P teacher, Q student, times T^2,
    written out with probabilities (not log space) on moderate logits."""
    z, v, _ = data()
    for beta in (0.1, 0.5, 0.9):
        for T in (1.0, 2.5):
            q, p = torch.softmax(z / T, -1), torch.softmax(v / T, -1)
            m = beta * p + (1 - beta) * q
            expect = T * T * (beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1))
            torch.testing.assert_close(ref.jsd(z, v, beta, T), expect)


def test_jsd_end_points_are_forward_and_reverse_kl():
    z, v, _ = data(seed=1)
    torch.testing.assert_close(ref.jsd(z, v, 0.0, 2.0), ref.kd(z, v, 2.0))
    torch.testing.assert_close(ref.jsd(z, v, 1.0, 2.0), ref.rkl(z, v, 2.0))
    q, p = torch.log_softmax(z / 2, -1), torch.log_softmax(v / 2, -1)
    torch.testing.assert_close(ref.rkl(z, v, 2.0), 4 * (q.exp() * (q - p)).sum(-1))
    # the symmetric JSD is symmetric and bounded by log 2 (at T = 1)
    torch.testing.assert_close(ref.jsd(z, v, 0.5), ref.jsd(v, z, 0.5))
    assert (ref.jsd(z * 50, v * 50, 0.5) <= math.log(2) + 1e-12).all()


def test_jsd_gradient_is_exact_at_large_logits_and_masked_classes():
    """log M in log space: logits at +-1e3 keep a finite value and gradient; classes masked in both
    contribute 0 and get a zero (never NaN) gradient."""
    z, v, _ = data(seed=2)
    z = (z * 500).requires_grad_()
    v = v * 500
    z2 = z.detach().clone()
    z2[:, :2] = -math.inf
    v2 = v.clone()
    v2[:, :2] = -math.inf
    z2.requires_grad_()
    for zz, vv in ((z, v), (z2, v2)):
        out = ref.jsd(zz, vv, 0.3, 1.0).sum()
        (g,) = torch.autograd.grad(out, zz)
        assert torch.isfinite(out) and torch.isfinite(g).all()
    assert torch.equal(g[:, :2], torch.zeros_like(g[:, :2]))


@pytest.mark.parametrize("method", ["jsd", "rkl"])
def test_functional_token_ignore_index_and_distill_loss(method):
    """Token-level ignore_index (-100) as Hugging Face and Liger use it: those rows count for nothing."""
    z, v, y = data(8, 11, seed=3, dtype=torch.float32)
    y[[1, 6]] = -100
    fn = fastkd.jsd_loss if method == "jsd" else fastkd.rkl_loss
    params = {"beta": 0.25, "temperature": 2.0} if method == "jsd" else {"temperature": 2.0}
    keep = y != -100
    torch.testing.assert_close(fn(z, v, target=y, **params), fn(z[keep], v[keep], **params))
    rows = fn(z, v, target=y, reduction="none", **params)
    assert rows[1] == 0 and rows[6] == 0
    crit = fastkd.DistillLoss(method, ce_weight=0.3, kd_weight=0.7, **params)
    expect = 0.3 * fastkd.cross_entropy(z, y) + 0.7 * fn(z, v, target=y, **params)
    torch.testing.assert_close(crit(z, v, y), expect)


def test_jsd_beta_is_checked():
    z, v, _ = data(dtype=torch.float32)
    for bad in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match=r"beta must be a finite number in \[0, 1\]"):
            fastkd.jsd_loss(z, v, beta=bad)
        with pytest.raises(ValueError, match=r"beta must be a finite number in \[0, 1\]"):
            fastkd.DistillLoss("jsd", beta=bad)
    with pytest.raises(TypeError, match="beta must be a number"):
        fastkd.jsd_loss(z, v, beta="0.5")
