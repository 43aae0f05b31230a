"""Dark-knowledge metrics against hand computation (numpy / scipy in float64)."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from fastkd.analysis import metrics as M


def logits_and_labels(n=9, c=7, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g, dtype=torch.float64) * scale, torch.randint(0, c, (n,), generator=g)


def numpy_stats(v, y, taus):
    """Hand computation: soft label from per-class temperatures, then the wrong-class numbers."""
    out = {m: [] for m in M.METRICS}
    for row, label, tau in zip(v, y, taus):
        s = row / tau
        q = np.exp(s - s.max())
        q /= q.sum()
        wrong = np.delete(q, label)
        hat = wrong / wrong.sum()
        out["wrong_mean"].append((1 - q[label]) / (len(q) - 1))
        out["wrong_var"].append(np.var(wrong))  # population variance (ddof=0)
        out["wrong_std"].append(np.std(wrong))
        out["wrong_entropy"].append(-(hat * np.log(hat)).sum())
        out["target_prob"].append(q[label])
    return {k: np.array(v) for k, v in out.items()}


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_wrong_class_stats_match_numpy(temperature):
    v, y = logits_and_labels()
    got = M.wrong_class_stats(v, y, M.SoftLabel(temperature=temperature))
    taus = np.full(v.shape, temperature)
    want = numpy_stats(v.numpy(), y.numpy(), taus)
    for m in M.METRICS:
        np.testing.assert_allclose(got[m].numpy(), want[m], rtol=1e-10, atol=1e-15, err_msg=m)


def test_wrong_class_stats_under_ats_match_numpy():
    v, y = logits_and_labels(seed=1)
    got = M.wrong_class_stats(v, y, M.SoftLabel(tau_target=4.0, tau_other=2.0))
    taus = np.full(v.shape, 2.0)
    taus[np.arange(len(y)), y.numpy()] = 4.0
    want = numpy_stats(v.numpy(), y.numpy(), taus)
    for m in M.METRICS:
        np.testing.assert_allclose(got[m].numpy(), want[m], rtol=1e-10, atol=1e-15, err_msg=m)


def test_wrong_class_stats_by_hand():
    # q = (1/2, 1/4, 1/8, 1/8), label 0: wrong = (1/4, 1/8, 1/8), renormalised (1/2, 1/4, 1/4).
    q = torch.tensor([[0.5, 0.25, 0.125, 0.125]], dtype=torch.float64)
    got = M.wrong_class_stats(q.log(), torch.tensor([0]))
    mean = (0.25 + 0.125 + 0.125) / 3
    var = ((0.25 - mean) ** 2 + 2 * (0.125 - mean) ** 2) / 3
    assert got["target_prob"].item() == pytest.approx(0.5)
    assert got["wrong_mean"].item() == pytest.approx(mean)
    assert got["wrong_var"].item() == pytest.approx(var)
    assert got["wrong_std"].item() == pytest.approx(math.sqrt(var))
    assert got["wrong_entropy"].item() == pytest.approx(0.5 * math.log(2) + 2 * 0.25 * math.log(4))


def test_uniform_wrong_classes_have_zero_spread_and_max_entropy():
    v = torch.tensor([[5.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    got = M.wrong_class_stats(v, torch.tensor([0]), M.SoftLabel(temperature=2.0))
    assert got["wrong_var"].item() == pytest.approx(0.0, abs=1e-30)
    assert got["wrong_entropy"].item() == pytest.approx(math.log(5))


def test_confident_teacher_keeps_tiny_wrong_class_mass():
    # q_y rounds to 1 in float64, yet the wrong-class mean is e^-100 / (1 + 2 e^-100), not 0.
    v = torch.tensor([[100.0, 0.0, 0.0]])
    got = M.wrong_class_stats(v, torch.tensor([0]))
    assert got["wrong_mean"].item() == pytest.approx(math.exp(-100) / (1 + 2 * math.exp(-100)), rel=1e-12)
    assert got["wrong_entropy"].item() == pytest.approx(math.log(2))


def test_float32_and_half_logits_are_measured_in_float64():
    v, y = logits_and_labels(seed=2)
    for dtype in (torch.float32, torch.bfloat16):
        got = M.wrong_class_stats(v.to(dtype), y)
        ref = M.wrong_class_stats(v.to(dtype).double(), y)
        for m in M.METRICS:
            assert got[m].dtype == torch.float64
            torch.testing.assert_close(got[m], ref[m], rtol=0, atol=0)


def test_average_ranks_match_scipy_with_ties():
    x = torch.tensor([[3.0, 1.0, 3.0, 2.0, 3.0, 0.0], [1.0, 1.0, 1.0, 1.0, 2.0, 2.0]])
    for row, ranks in zip(x.numpy(), M.average_ranks(x).numpy()):
        np.testing.assert_allclose(ranks, stats.rankdata(row))


def test_wrong_class_logits_drop_the_label_column():
    v = torch.arange(12.0).reshape(3, 4)
    y = torch.tensor([0, 2, 3])
    want = torch.tensor([[1.0, 2, 3], [4, 5, 7], [8, 9, 10]])
    torch.testing.assert_close(M.wrong_class_logits(v, y), want)


def test_wrong_class_spearman_matches_scipy():
    a, y = logits_and_labels(n=12, c=9, seed=3)
    b = a + 2.0 * logits_and_labels(n=12, c=9, seed=4)[0]
    b[0, :4] = b[0, 4]  # ties inside a row
    got = M.wrong_class_spearman(a, b, y).numpy()
    for i in range(12):
        keep = np.arange(9) != y[i].item()
        want = stats.spearmanr(a[i].numpy()[keep], b[i].numpy()[keep]).statistic
        assert got[i] == pytest.approx(want, abs=1e-12)


def test_spearman_undefined_for_constant_wrong_logits():
    a = torch.tensor([[1.0, 2.0, 2.0, 2.0], [0.0, 1.0, 2.0, 3.0]])
    b = torch.tensor([[0.0, 3.0, 2.0, 1.0], [0.0, 3.0, 2.0, 1.0]])
    y = torch.tensor([0, 0])
    rho = M.wrong_class_spearman(a, b, y)
    assert math.isnan(rho[0].item())
    assert rho[1].item() == pytest.approx(-1.0)
    pair = M.PairMeter()
    pair.update(a, b, y)
    res = pair.result()
    assert (res["spearman"], res["spearman_rows"], res["spearman_undefined"]) == (pytest.approx(-1.0), 1, 1)


def test_top1_agreement_and_kl_match_numpy():
    a, _ = logits_and_labels(n=10, c=6, seed=5)
    b, _ = logits_and_labels(n=10, c=6, seed=6)
    b[:3] = a[:3] * 2  # same arg-max on the first three rows
    agree = M.top1_agreement(a, b).numpy()
    np.testing.assert_array_equal(agree, a.numpy().argmax(1) == b.numpy().argmax(1))
    assert agree[:3].all()
    T = 2.0
    pa = np.exp(a.numpy() / T) / np.exp(a.numpy() / T).sum(1, keepdims=True)
    pb = np.exp(b.numpy() / T) / np.exp(b.numpy() / T).sum(1, keepdims=True)
    np.testing.assert_allclose(M.kl_rows(a, b, T).numpy(), (pa * np.log(pa / pb)).sum(1), rtol=1e-10)


def test_meters_stream_to_the_full_data_set_means():
    v, y = logits_and_labels(n=50, c=10, seed=7)
    w = v + logits_and_labels(n=50, c=10, seed=8)[0]
    soft = [M.SoftLabel(temperature=1.0), M.SoftLabel(temperature=4.0), M.SoftLabel(tau_target=4.0, tau_other=2.0)]
    meter, pair = M.TeacherMeter(soft), M.PairMeter(temperature=1.0)
    for lo in range(0, 50, 16):  # batches of 16, 16, 16, 2
        meter.update(v[lo:lo + 16], y[lo:lo + 16])
        pair.update(v[lo:lo + 16], w[lo:lo + 16], y[lo:lo + 16])
    res = meter.result()
    assert res["num_samples"] == 50 and res["num_classes"] == 10
    assert res["accuracy"] == pytest.approx((v.argmax(1) == y).double().mean().item())
    assert list(res["settings"]) == ["T=1", "T=4", "ATS(4,2)"]
    for sl in soft:
        full = M.wrong_class_stats(v, y, sl)
        for m in M.METRICS:
            assert res["settings"][sl.name][m] == pytest.approx(full[m].mean().item(), rel=1e-12)
    p = pair.result()
    assert p["spearman"] == pytest.approx(M.wrong_class_spearman(v, w, y).mean().item(), rel=1e-12)
    assert p["top1_agreement"] == pytest.approx(M.top1_agreement(v, w).double().mean().item())
    assert p["kl_ab"] == pytest.approx(M.kl_rows(v, w).mean().item(), rel=1e-12)
    assert p["kl_ba"] == pytest.approx(M.kl_rows(w, v).mean().item(), rel=1e-12)


def test_bad_input_is_named():
    v, y = logits_and_labels(n=4, c=5)
    with pytest.raises(ValueError, match="label 5"):
        M.wrong_class_stats(v, torch.tensor([0, 1, 5, 2]))
    with pytest.raises(ValueError, match="2-D"):
        M.wrong_class_stats(v[0], y[:1])
    with pytest.raises(TypeError, match="integer"):
        M.wrong_class_stats(v, y.double())
    with pytest.raises(ValueError, match="at least 3"):
        M.wrong_class_spearman(v[:, :2], v[:, :2], torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="tau_target >= tau_other"):
        M.parse_ats("2,4")
    with pytest.raises(ValueError, match="positive"):
        M.parse_temperatures("1,0,4")
    with pytest.raises(ValueError, match="numbers"):
        M.parse_temperatures("1,two")
    with pytest.raises(ValueError, match="empty"):
        M.TeacherMeter([M.SoftLabel(temperature=1.0)]).result()
    assert M.parse_temperatures("1, 2,4") == [1.0, 2.0, 4.0]
    assert M.parse_ats("none") is None
    assert M.parse_ats("4,2").name == "ATS(4,2)"


@pytest.mark.gpu
def test_metrics_on_cuda_match_cpu():
    v, y = logits_and_labels(n=300, c=1000, seed=9)
    w = v + logits_and_labels(n=300, c=1000, seed=10)[0]
    soft = [M.SoftLabel(temperature=2.0), M.SoftLabel(tau_target=4.0, tau_other=2.0)]
    for sl in soft:
        cpu, gpu = M.wrong_class_stats(v, y, sl), M.wrong_class_stats(v.cuda().float(), y.cuda(), sl)
        for m in M.METRICS:
            torch.testing.assert_close(gpu[m].cpu(), M.wrong_class_stats(v.float(), y, sl)[m], rtol=1e-9, atol=1e-15)
            torch.testing.assert_close(gpu[m].cpu(), cpu[m], rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(M.wrong_class_spearman(v.cuda(), w.cuda(), y.cuda()).cpu(),
                               M.wrong_class_spearman(v, w, y), rtol=1e-12, atol=1e-12)
    meter = M.TeacherMeter(soft)
    for lo in range(0, 300, 128):
        meter.update(v[lo:lo + 128].cuda(), y[lo:lo + 128].cuda())
    res = meter.result()
    for sl in soft:
        assert res["settings"][sl.name]["wrong_std"] == pytest.approx(
            M.wrong_class_stats(v, y, sl)["wrong_std"].mean().item(), rel=1e-9)


# --------------------------------------------------------------------------------------------
# ATS regime diagnostic
# --------------------------------------------------------------------------------------------
def test_ats_label_on_top_matches_a_brute_force_count_over_the_grid():
    from fastkd.losses import reference as ref

    g = torch.Generator().manual_seed(3)
    # raw logits with an offset (ATS is not shift-invariant: the diagnostic must use them as they are)
    v = torch.randn(300, 7, generator=g) * 2.5 + 0.7
    y = torch.randint(0, 7, (300,), generator=g)
    meter = M.LabelOnTopMeter()
    meter.update(v[:120], y[:120])
    meter.update(v[120:], y[120:])
    got = meter.result()["ats_label_on_top"]
    assert len(got) == 30 and set(got) == {f"{a},{b}" for a in range(1, 7) for b in range(1, 6)}
    for a in range(1, 7):
        for b in range(1, 6):
            count = 0
            for i in range(300):  # one row at a time: the soft label's arg-max is the label
                q = ref.ats_teacher_log_probs(v[i:i + 1].double(), y[i:i + 1], float(a), float(b))
                count += int(q.argmax(1).item() == y[i].item())
            assert got[f"{a},{b}"] == count / 300
    assert max(got.values()) - min(got.values()) > 0.2  # the grid points differ on this data


def test_wrong_to_target_ratio_is_the_regime_condition_for_centred_logits():
    g = torch.Generator().manual_seed(4)
    v = torch.randn(400, 9, generator=g) * 3
    v = v - v.mean(1, keepdim=True)
    y = torch.randint(0, 9, (400,), generator=g)
    ratio = M.wrong_to_target_ratio(v, y)
    positive = v.gather(1, y[:, None]).squeeze(1) > 0
    for a, b in ((4.0, 2.0), (3.0, 1.0), (5.0, 4.0)):
        on_top = M.ats_label_on_top(v, y, a, b)
        assert torch.equal(on_top[positive], ratio[positive] < b / a)
    meter = M.LabelOnTopMeter((4.0,), (2.0,))
    meter.update(v, y)
    r = meter.result()["wrong_target_ratio"]
    want = torch.quantile(ratio[positive], torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)).tolist()
    assert [r["q05"], r["q50"], r["q95"]] == pytest.approx(want)
    assert r["nonpositive_target"] == pytest.approx((~positive).double().mean().item())


def test_parse_ats_grid():
    assert M.parse_ats_grid("1,2:3") == ((1.0, 2.0), (3.0,))
    assert M.parse_ats_grid("none") is None
    with pytest.raises(ValueError, match="TAU_TARGETS:TAU_OTHERS"):
        M.parse_ats_grid("1,2,3")
    with pytest.raises(ValueError, match="positive"):
        M.parse_ats_grid("1,-2:3")


def _meters():
    return [
        (M.TeacherMeter([M.SoftLabel(temperature=2.0), M.SoftLabel(tau_target=4.0, tau_other=2.0)]), 1),
        (M.PairMeter(temperature=2.0), 2),
        (M.LabelOnTopMeter(), 1),
    ]


def _update(meter, n_logits, v, w, y):
    meter.update(v, w, y) if n_logits == 2 else meter.update(v, y)


def test_meters_update_without_reading_values_on_the_host(monkeypatch):
    """The module promises no host synchronisation until result(): update() must not read a
    tensor's value in Python (item/int/float/bool/tolist), which on CUDA would sync every batch."""
    v, y = logits_and_labels(n=64, c=30, seed=3)
    w = logits_and_labels(n=64, c=30, seed=4)[0]
    for meter, k in _meters():
        with monkeypatch.context() as mp:
            for name in ("item", "tolist", "__int__", "__float__", "__bool__", "__index__"):
                def refuse(*_a, _name=name, **_k):
                    raise AssertionError(f"update() read a value on the host via Tensor.{_name}")
                mp.setattr(torch.Tensor, name, refuse)
            _update(meter, k, v, w, y)
            _update(meter, k, v, w, y)
        meter.result()


def test_meters_report_out_of_range_labels_in_result():
    v, y = logits_and_labels(n=40, c=30, seed=5)
    w = logits_and_labels(n=40, c=30, seed=6)[0]
    bad = y.clone()
    bad[7] = 30
    for meter, k in _meters():
        _update(meter, k, v, w, bad)
        with pytest.raises(ValueError, match=r"1 target label\(s\) outside \[0, 30\)"):
            meter.result()
    with pytest.raises(ValueError, match="label 30, outside"):
        M.wrong_class_stats(v, bad)


@pytest.mark.gpu
def test_meters_update_does_not_synchronise_on_cuda():
    v, y = logits_and_labels(n=256, c=100, seed=7)
    w = logits_and_labels(n=256, c=100, seed=8)[0]
    v, w, y = v.cuda(), w.cuda(), y.cuda()
    for meter, k in _meters():
        _update(meter, k, v, w, y)  # first call may allocate constants
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            _update(meter, k, v, w, y)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        meter.result()
