"""The reference losses against hand computation, torch.nn.functional and the identities of
methods.md, in float64."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as tF

from fastkd.losses import reference as ref

D = torch.float64


def rand(*shape, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=D) * scale


def labels(n, c, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, c, (n,), generator=g)


# ---------------------------------------------------------------- CE
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_cross_entropy_matches_torch(eps):
    z, y = rand(13, 7), labels(13, 7)
    y[[2, 5]] = -100
    rows = ref.cross_entropy(z, y, eps, -100)
    ours = rows.sum() / (y != -100).sum()
    theirs = tF.cross_entropy(z, y, label_smoothing=eps, ignore_index=-100)
    torch.testing.assert_close(ours, theirs)
    assert rows[2] == 0 and rows[5] == 0


def test_cross_entropy_by_hand():
    z = torch.tensor([[1.0, 2.0, 0.5]], dtype=D)
    y = torch.tensor([1])
    lse = math.log(math.exp(1.0) + math.exp(2.0) + math.exp(0.5))
    assert ref.cross_entropy(z, y).item() == pytest.approx(lse - 2.0, rel=1e-12)
    eps = 0.2
    target = [eps / 3, 1 - eps + eps / 3, eps / 3]
    expect = -sum(t * (zi - lse) for t, zi in zip(target, [1.0, 2.0, 0.5]))
    assert ref.cross_entropy(z, y, eps).item() == pytest.approx(expect, rel=1e-12)


# ---------------------------------------------------------------- KD
@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_kd_matches_kl_div(T):
    z, v = rand(9, 11), rand(9, 11, seed=3)
    ours = ref.kd(z, v, T).mean()
    theirs = tF.kl_div(tF.log_softmax(z / T, -1), tF.softmax(v / T, -1), reduction="batchmean") * T * T
    torch.testing.assert_close(ours, theirs)


def test_kd_by_hand_two_classes():
    z = torch.tensor([[0.0, 1.0]], dtype=D)
    v = torch.tensor([[2.0, -1.0]], dtype=D)
    T = 2.0
    pt = np.exp(np.array([1.0, -0.5])) / np.exp(np.array([1.0, -0.5])).sum()
    ps = np.exp(np.array([0.0, 0.5])) / np.exp(np.array([0.0, 0.5])).sum()
    expect = T * T * float((pt * np.log(pt / ps)).sum())
    assert ref.kd(z, v, T).item() == pytest.approx(expect, rel=1e-12)


def test_kd_one_pass_form():
    """methods.md's one-pass form: KL = sum p_t (v - z)/T - LSE(v/T) + LSE(z/T)."""
    z, v, T = rand(6, 20), rand(6, 20, seed=9), 3.0
    pt = torch.softmax(v / T, -1)
    one_pass = (pt * (v - z) / T).sum(-1) - torch.logsumexp(v / T, -1) + torch.logsumexp(z / T, -1)
    torch.testing.assert_close(ref.kd(z, v, T), T * T * one_pass)


def test_kd_masked_classes_and_nan():
    z, v = rand(3, 6), rand(3, 6, seed=2)
    z[0, 2] = v[0, 2] = -math.inf  # a class masked for both: contributes 0
    z[1, 0] = math.nan
    rows = ref.kd(z, v, 2.0)
    assert torch.isfinite(rows[0]) and torch.isnan(rows[1]) and torch.isfinite(rows[2])
    keep = [0, 1, 3, 4, 5]
    torch.testing.assert_close(rows[0], ref.kd(z[:1, keep], v[:1, keep], 2.0)[0])
    # the teacher gives mass where the student is masked: infinite divergence, not NaN
    z2, v2 = rand(1, 4), rand(1, 4, seed=5)
    z2[0, 1] = -math.inf
    assert ref.kd(z2, v2).item() == math.inf


# ---------------------------------------------------------------- ATS
def test_ats_equals_kd_when_temperatures_equal():
    z, v, y = rand(10, 9), rand(10, 9, seed=4), labels(10, 9)
    for T in (1.0, 2.5, 4.0):
        torch.testing.assert_close(ref.ats(z, v, y, T, T, T), ref.kd(z, v, T))


def test_ats_by_hand():
    z = torch.tensor([[0.5, -1.0, 2.0]], dtype=D)
    v = torch.tensor([[3.0, 1.0, -2.0]], dtype=D)
    y = torch.tensor([0])
    tt, to, s = 4.0, 2.0, 1.5
    scaled = np.array([3.0 / tt, 1.0 / to, -2.0 / to])
    q = np.exp(scaled) / np.exp(scaled).sum()
    ps = np.exp(np.array([0.5, -1.0, 2.0]) / s)
    ps /= ps.sum()
    expect = s * s * float((q * np.log(q / ps)).sum())
    assert ref.ats(z, v, y, tt, to, s).item() == pytest.approx(expect, rel=1e-12)


def test_ats_ignored_rows_are_zero():
    z, v, y = rand(4, 5), rand(4, 5, seed=1), labels(4, 5)
    y[1] = -100
    rows = ref.ats(z, v, y, 4.0, 2.0, 1.0)
    assert rows[1] == 0 and (rows[[0, 2, 3]] > 0).all()


# ---------------------------------------------------------------- ISATS
def test_isats_default_grid():
    g = ref.isats_default_candidates(4.0)
    assert len(g) == 16 and g[0] == pytest.approx(0.5) and g[-1] == pytest.approx(4.0)
    assert np.allclose(np.diff(g), (4.0 - 0.5) / 15)


def test_isats_selection_brute_force():
    N, C, tt = 40, 12, 4.0
    v, y = rand(N, C, scale=2.0, seed=11), labels(N, C, seed=11)
    # make most teachers right, so the constraint matters both ways
    v[torch.arange(N)[: N - 5], y[: N - 5]] += 4.0
    cands = ref.isats_default_candidates(tt)
    chosen = ref.isats_select_tau(v, y, tt, cands)
    vn, yn = v.numpy(), y.numpy()
    for i in range(N):
        best, best_t = -np.inf, max(cands)
        for t in cands:
            s = np.where(np.arange(C) == yn[i], vn[i] / tt, vn[i] / t)
            q = np.exp(s - s.max())
            q /= q.sum()
            w = np.delete(q, yn[i])
            ok = vn[i, yn[i]] / tt >= np.delete(vn[i], yn[i]).max() / t
            if ok and w.var() > best:
                best, best_t = w.var(), t
        assert chosen[i].item() == pytest.approx(best_t), i


def test_isats_variance_formula_of_spec():
    """The S1/S2/Zt form of methods.md gives the same wrong-class variance."""
    v, y, tt, t = rand(5, 8, seed=7), labels(5, 8, seed=7), 4.0, 1.3
    q = ref.ats_teacher_log_probs(v, y, tt, t).exp()
    on = tF.one_hot(y, 8).bool()
    w = q.masked_select(~on).view(5, 7)
    exp_w = torch.exp(v / t).masked_select(~on).view(5, 7)
    S1, S2 = exp_w.sum(-1), (exp_w**2).sum(-1)
    Zt = torch.exp(v.gather(1, y[:, None]).squeeze(1) / tt) + S1
    mean = S1 / (7 * Zt)
    var = S2 / (7 * Zt**2) - mean**2
    torch.testing.assert_close(w.var(-1, unbiased=False), var)
    torch.testing.assert_close(w.mean(-1), mean)


def test_isats_is_ats_with_chosen_tau():
    z, v, y = rand(6, 10), rand(6, 10, seed=8), labels(6, 10)
    tau = ref.isats_select_tau(v, y, 4.0)
    torch.testing.assert_close(ref.isats(z, v, y, 4.0), ref.ats(z, v, y, 4.0, tau))


# ---------------------------------------------------------------- DKD
def test_dkd_decomposition_identity():
    """KL(p_t || p_s) = TCKD + (1 - p_t,y) NCKD (docs/methods.md §4)."""
    z, v, y = rand(12, 9), rand(12, 9, seed=5), labels(12, 9)
    for T in (1.0, 4.0):
        tckd, nckd = ref.dkd_parts(z, v, y, T)
        pt_y = torch.softmax(v / T, -1).gather(1, y[:, None]).squeeze(1)
        torch.testing.assert_close(ref.kd(z, v, T) / (T * T), tckd + (1 - pt_y) * nckd)


def test_dkd_against_probability_form():
    """mdistiller's formulation (masks and probabilities), fine in float64."""
    z, v, y = rand(8, 6), rand(8, 6, seed=6), labels(8, 6)
    T, a, b = 4.0, 1.0, 8.0
    gt = tF.one_hot(y, 6).bool()
    ps, pt = torch.softmax(z / T, 1), torch.softmax(v / T, 1)
    bs = torch.stack([ps[gt], 1 - ps[gt]], 1)
    bt = torch.stack([pt[gt], 1 - pt[gt]], 1)
    tckd = (bt * (bt.log() - bs.log())).sum(1)
    log_ps_hat = tF.log_softmax(z / T - 1000.0 * gt, 1)
    pt_hat = tF.softmax(v / T - 1000.0 * gt, 1)
    nckd = torch.where(gt, 0.0, pt_hat * (pt_hat.log() - log_ps_hat)).sum(1)
    torch.testing.assert_close(ref.dkd(z, v, y, a, b, T), T * T * (a * tckd + b * nckd))


def test_dkd_warmup_weight():
    assert ref.dkd_warmup_weight(0, 20) == 0.0
    assert ref.dkd_warmup_weight(5, 20) == 0.25
    assert ref.dkd_warmup_weight(40, 20) == 1.0
    assert ref.dkd_warmup_weight(3, 0) == 1.0


# ---------------------------------------------------------------- DIST
def test_dist_against_corrcoef():
    zs, zt = rand(7, 5), rand(7, 5, seed=12)
    tau, beta, gamma = 2.0, 1.0, 2.0
    ys, yt = torch.softmax(zs / tau, 1), torch.softmax(zt / tau, 1)
    inter = 1 - torch.stack([torch.corrcoef(torch.stack([ys[i], yt[i]]))[0, 1] for i in range(7)]).mean()
    intra = 1 - torch.stack([torch.corrcoef(torch.stack([ys[:, c], yt[:, c]]))[0, 1] for c in range(5)]).mean()
    torch.testing.assert_close(ref.dist(zs, zt, beta, gamma, tau), tau**2 * (beta * inter + gamma * intra),
                               rtol=1e-6, atol=1e-7)


def test_dist_zero_for_identical_logits():
    z = rand(6, 8)
    same = ref.dist(z, z.clone()).item()
    # only the 1e-8 in the correlation's denominator keeps it above 0
    assert 0 <= same < 1e-4 and same < 1e-3 * ref.dist(z, rand(6, 8, seed=1)).item()


# ---------------------------------------------------------------- tolerant teacher, CKA
def test_tolerant_gap_by_hand():
    z = torch.tensor([[5.0, 1.0, 3.0, 2.0, 4.0, 0.0]], dtype=D)
    assert ref.tolerant_gap(z, k=5).item() == pytest.approx(5.0 - (4 + 3 + 2 + 1) / 4)
    assert ref.tolerant_gap(z, k=2).item() == pytest.approx(1.0)


def test_tolerant_teacher_loss_and_gradient():
    z = rand(5, 8).requires_grad_()
    y = labels(5, 8)
    loss = ref.tolerant_teacher_loss(z, y, eta=0.5, k=3)
    loss.backward()
    with torch.no_grad():
        top = z.topk(3, -1)
        expect = tF.cross_entropy(z, y) + 0.5 * (top.values[:, 0] - top.values[:, 1:].mean(-1)).mean()
        g = (torch.softmax(z, -1) - tF.one_hot(y, 8)) / 5
        gap_g = torch.zeros_like(z)
        gap_g.scatter_(1, top.indices[:, :1], 1.0)
        gap_g.scatter_(1, top.indices[:, 1:], -0.5)
        g += 0.5 * gap_g / 5
    torch.testing.assert_close(loss, expect)
    torch.testing.assert_close(z.grad, g)


def test_linear_cka_forms_and_invariances():
    x, y = rand(20, 6), rand(20, 9, seed=3)
    q, _ = torch.linalg.qr(rand(6, 6, seed=4))
    c = ref.linear_cka(x, y)
    assert 0 <= c.item() <= 1
    torch.testing.assert_close(ref.linear_cka(x @ q * 3.0, y), c)  # orthogonal + isotropic scale
    assert ref.linear_cka(x, x).item() == pytest.approx(1.0)
    # the Gram (n < p) branch and the feature branch agree
    xw, yw = rand(5, 30, seed=1), rand(5, 40, seed=2)
    xc, yc = xw - xw.mean(0), yw - yw.mean(0)
    direct = (xc.T @ yc).square().sum() / ((xc.T @ xc).norm() * (yc.T @ yc).norm())
    torch.testing.assert_close(ref.linear_cka(xw, yw), direct)
