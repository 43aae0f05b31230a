"""Compressed teacher rows (docs/methods.md §10): compress_topk, densify, and every loss
accepting a TopKTeacher in place of teacher logits."""
import math

import pytest
import torch

import fastkd
from fastkd.losses import TopKTeacher, compress_topk, densify

BACKENDS = ["torch", "triton"]


def data(n=6, c=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g) * 2
    v = torch.randn(n, c, generator=g) * 3
    y = torch.randint(0, c, (n,), generator=g)
    return z, v, y


def explicit_dense(v, y, k, ignore_index=-100):
    """v' by the definition, row by row in fp64 (independent of the implementation)."""
    out = torch.empty_like(v, dtype=torch.float64)
    for r in range(v.shape[0]):
        row = v[r].double()
        S = set(row.topk(k).indices.tolist())
        if int(y[r]) != ignore_index:
            S.add(int(y[r]))
        absent = [c for c in range(v.shape[1]) if c not in S]
        f = (torch.logsumexp(row[absent], 0) - math.log(len(absent))).item() if absent else 0.0
        out[r] = torch.tensor([row[c].item() if c in S else f for c in range(v.shape[1])], dtype=torch.float64)
    return out


def test_compressed_row_matches_the_definition_and_keeps_the_label():
    _, v, y = data()
    y[1] = -100
    t = compress_topk(v, y, 3)
    assert t.values.shape == (6, 3) and t.indices.dtype == torch.int64 and t.num_classes == 12
    assert t.fill.dtype == torch.float32 and t.shape == (6, 12)
    dense = densify(t, y)
    torch.testing.assert_close(dense.double(), explicit_dense(v, y, 3), rtol=1e-6, atol=1e-6)
    for r in range(6):
        if r != 1:
            assert dense[r, y[r]] == v[r, y[r]]  # the label's logit is kept exactly


def test_mass_outside_the_kept_set_is_preserved_at_t1():
    _, v, y = data(8, 50, seed=3)
    t = compress_topk(v, y, 5)
    dense = densify(t, y)
    p, q = torch.softmax(v.double(), -1), torch.softmax(dense.double(), -1)
    kept = torch.zeros_like(v, dtype=torch.bool).scatter_(1, t.indices, True).scatter_(1, y[:, None], True)
    torch.testing.assert_close(q[kept], p[kept], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(torch.where(kept, 0, q).sum(-1), torch.where(kept, 0, p).sum(-1), rtol=1e-6, atol=1e-9)


def test_k_at_least_c_minus_1_reproduces_the_dense_row_exactly():
    _, v, y = data(5, 9)
    for k in (8, 9):
        assert torch.equal(densify(compress_topk(v, y, k), y), v)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kd_on_a_topk_teacher_equals_kd_on_its_dense_row(backend):
    z, v, y = data()
    t = compress_topk(v, y, 4)
    dense = explicit_dense(v, y, 4).float()
    for T in (1.0, 4.0):
        torch.testing.assert_close(fastkd.kd_loss(z, t, T, backend=backend, target=y),
                                   fastkd.kd_loss(z, dense, T, backend=backend), rtol=1e-5, atol=1e-6)
    for method, fn in (("ats", fastkd.ats_loss), ("dkd", fastkd.dkd_loss)):
        torch.testing.assert_close(fn(z, t, y, backend=backend), fn(z, dense, y, backend=backend),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["kd", "isats", "dkd", "dist", "jsd", "rkl"])
def test_distill_loss_takes_a_topk_teacher(method):
    z, v, y = data()
    valid = torch.tensor([True, True, False, True, True, True])
    t = compress_topk(v, y, 4)
    crit = fastkd.DistillLoss(method, backend="torch")
    zg = z.clone().requires_grad_()
    out = crit(zg, t, y, valid=valid)
    out.backward()
    zd = z.clone().requires_grad_()
    ref_out = crit(zd, densify(t, y), y, valid=valid)
    ref_out.backward()
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(zg.grad, zd.grad)


def test_topk_teacher_errors_are_clear():
    z, v, y = data()
    t = compress_topk(v, y, 4)
    with pytest.raises(ValueError, match="built without label_index, so it needs target="):
        fastkd.kd_loss(z, t._replace(label_index=None))
    with pytest.raises(ValueError, match=r"stands for teacher logits \(6, 12\)"):
        fastkd.kd_loss(z[:, :10], t, target=y % 10)
    with pytest.raises(ValueError, match="k must be an integer in"):
        compress_topk(v, y, 13)
    with pytest.raises(ValueError, match="indices must be an int64"):
        densify(t._replace(indices=t.indices.int()), y)
    with pytest.raises(TypeError, match="needs integer labels"):
        densify(t._replace(label_index=None), None)
    with pytest.raises(ValueError, match="label_index must be None or an int64"):
        densify(t._replace(label_index=t.label_index.int()))
    assert isinstance(t, TopKTeacher) and t.device == z.device


@pytest.mark.parametrize("backend", BACKENDS)
def test_compressed_teacher_carries_its_labels(backend):
    # issue 18 item 17: kd_loss(z, compress_topk(v, y, k)) asked for target= although KD reads no label.
    z, v, y = data()
    y[2] = -100
    t = compress_topk(v, y, 4)
    assert t.label_index.tolist() == [int(c) if i != 2 else -1 for i, c in enumerate(y)]
    dense = explicit_dense(v, y, 4).float()
    torch.testing.assert_close(densify(t).double(), dense.double(), rtol=1e-6, atol=1e-6)
    for T in (1.0, 4.0):
        torch.testing.assert_close(fastkd.kd_loss(z, t, T, backend=backend),
                                   fastkd.kd_loss(z, dense, T, backend=backend), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fastkd.dist_loss(z, t, backend=backend), fastkd.dist_loss(z, dense, backend=backend))
    # target= still works for one built without label_index (e.g. from a teacher cache)
    bare = t._replace(label_index=None)
    torch.testing.assert_close(fastkd.kd_loss(z, bare, 2.0, backend=backend, target=y),
                               fastkd.kd_loss(z, dense, 2.0, backend=backend), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(densify(bare, y), densify(t))
    # the stored labels are the ones label_logit belongs to: a target passed along is not read
    torch.testing.assert_close(fastkd.ats_loss(z, t, y, backend=backend), fastkd.ats_loss(z, dense, y, backend=backend),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(densify(t, (y + 1) % 12), densify(t))
