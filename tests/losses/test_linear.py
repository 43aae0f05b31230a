"""fastkd.fused_linear_distill / FusedLinearDistillLoss against DistillLoss on the full logits.

Both backends chunk (the triton one runs the fused kernel per chunk, in Triton's interpreter on a
CPU machine); each is compared with the fp64 PyTorch reference on ``hidden @ weight.T + bias``,
for every teacher form (dense logits, TopKTeacher, a teacher head) and every row-local method,
at chunk boundaries, all-ignored chunks, N = 1, with and without bias, in fp32 and bf16.
"""
import math

import pytest
import torch

import fastkd
from fastkd.losses import linear as LIN

II = -100
PARAMS = {
    "kd": dict(temperature=2.0),
    "jsd": dict(beta=0.3, temperature=1.5),
    "rkl": dict(temperature=1.5),
    "ats": dict(tau_target=3.0, tau_other=1.5),
    "isats": dict(tau_target=3.0, candidates=(1.0, 2.0, 3.0)),
    "dkd": dict(beta=2.0, temperature=2.0),
    "ce": {},
}
BACKENDS = ["torch", "triton"]
MANTISSA = {torch.float32: 23, torch.bfloat16: 7, torch.float64: 52}


def make(N=13, H=8, V=50, Ht=6, seed=0, dtype=torch.float32, ignored=(2, 3), device="cpu"):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)

    h, W, b = r(N, H), r(V, H, scale=0.7), r(V, scale=0.5)
    th, tw, tb = r(N, Ht), r(V, Ht, scale=0.9), r(V, scale=0.5)
    y = torch.randint(0, V, (N,), generator=g)
    for i in ignored:
        y[i] = II
    return h, W, b, (th, tw, tb), y.to(device)


def teacher_form(form, head, y, k=5):
    th, tw, tb = head
    dense = torch.nn.functional.linear(th, tw, tb)
    if form == "dense":
        return dense, dense
    if form == "head":
        return head, dense
    t = fastkd.compress_topk(dense, y, k)
    return t, fastkd.losses.densify(t, y).to(dense.dtype)


def reference(method, h, W, b, v, y, params, dtype=None):
    """DistillLoss on the full logits (torch backend), the loss and the three gradients."""
    leaves = [t.detach().clone().to(dtype or t.dtype).requires_grad_() if t is not None else None for t in (h, W, b)]
    hh, WW, bb = leaves
    logits = torch.nn.functional.linear(hh, WW, bb)
    crit = fastkd.DistillLoss(method, backend="torch", **params)
    loss = crit(logits, v.to(dtype or v.dtype) if v is not None else None, y)
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None])
    return loss.detach(), grads


def fused(method, h, W, b, teacher, y, params, backend, chunk, grad_out=None):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (h, W, b)]
    hh, WW, bb = leaves
    loss = fastkd.fused_linear_distill(hh, WW, teacher, y, method=method, bias=bb, chunk_size=chunk, backend=backend,
                                       **params)
    assert loss.dtype == torch.float32 and loss.shape == ()
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None], grad_out)
    for got, t in zip(grads, [t for t in leaves if t is not None]):
        assert got.dtype == t.dtype and got.shape == t.shape
    return loss.detach(), grads


def close(name, got, exact, same_dtype, dtype):
    """Error against fp64 at most 4x the same-dtype PyTorch error, plus a unit in the last place of
    the scale for 16-bit results (the chunked weight gradient is summed in a different order)."""
    got, exact, same_dtype = got.double(), exact.double(), same_dtype.double()
    scale = exact.abs().max().item()
    err, err_t = (got - exact).abs().max().item(), (same_dtype - exact).abs().max().item()
    tol = 4 * err_t + 1e-6 * scale + 1e-12
    if dtype != torch.float32 and scale > 0:
        tol += 2.0 ** (math.floor(math.log2(scale)) - MANTISSA[dtype])
    assert err <= tol, f"{name}: error {err:.3e} > {tol:.3e} (torch {dtype} error {err_t:.3e}, scale {scale:.3e})"


def compare(method, h, W, b, teacher, v_dense, y, params, backend, chunk, dtype=torch.float32, grad_out=None):
    loss, grads = fused(method, h, W, b, teacher, y, params, backend, chunk, grad_out)
    exact_loss, exact_grads = reference(method, h.double(), W.double(), b.double() if b is not None else None,
                                        v_dense.double() if v_dense is not None else None, y, params)
    td_loss, td_grads = reference(method, h, W, b, v_dense, y, params)
    go = 1.0 if grad_out is None else float(grad_out)
    close(f"{method}/{backend}/loss", loss, exact_loss, td_loss, dtype)
    for name, got, e, t in zip(("hidden", "weight", "bias"), grads, exact_grads, td_grads):
        close(f"{method}/{backend}/grad_{name}", got, e * go, t.double() * go, dtype)
    return loss, grads


# --------------------------------------------------------------------------------------------
# every teacher form x method x backend
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["dense", "topk", "head"])
@pytest.mark.parametrize("method", sorted(PARAMS))
def test_matches_distill_loss_on_full_logits(method, form, backend):
    """N = 13 in chunks of 4 (the last partial), V = 50 (not a multiple of the kernel's block),
    two ignored rows, bias, CE + KD weighted, grad_output != 1."""
    h, W, b, head, y = make()
    teacher, dense = teacher_form(form, head, y)
    params = dict(ce_weight=0.3, kd_weight=0.7, **PARAMS[method]) if method != "ce" else dict(ce_weight=1.0)
    compare(method, h, W, b, teacher if method != "ce" else None, dense, y, params, backend, 4,
            grad_out=torch.tensor(1.7))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["kd", "jsd", "rkl", "dkd"])
def test_bf16_hidden_and_weights(method, backend):
    """bf16 logits as nn.Linear forms them, fp32 math, gradients in bf16 (weight and bias summed
    over chunks in fp32)."""
    h, W, b, head, y = make(N=11, V=70, dtype=torch.bfloat16, seed=1)
    teacher, dense = teacher_form("dense", head, y)
    compare(method, h, W, b, teacher, dense, y, dict(ce_weight=0.5, kd_weight=0.5, **PARAMS[method]), backend, 3,
            dtype=torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunk_edges_all_ignored_chunk_n1_and_no_bias(backend):
    h, W, _, head, y = make(N=9, V=37, seed=2, ignored=(0, 1, 2, 7))
    teacher, dense = teacher_form("head", head, y)
    params = dict(ce_weight=0.2, kd_weight=0.8, beta=0.5)
    for chunk in (1, 3, 9, 64):  # chunk 3: rows 0-2 all ignored; chunk 64 > N
        compare("jsd", h, W, None, teacher, dense, y, params, backend, chunk)
    # N = 1 (one labelled row), and one ignored row: loss 0, zero gradients, no NaN
    compare("rkl", h[3:4], W, None, dense[3:4], dense[3:4], y[3:4], dict(ce_weight=0.5, kd_weight=0.5), backend, None)
    loss, grads = fused("kd", h[:1], W, None, dense[:1], y[:1], {}, backend, None)
    assert loss.item() == 0.0 and all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    yi = torch.full_like(y, II)
    loss, grads = fused("jsd", h, W, None, dense, yi, {}, backend, 2)
    assert loss.item() == 0.0 and all(torch.equal(g, torch.zeros_like(g)) for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_labels_every_row_counts(backend):
    h, W, b, head, y = make(N=7, V=40, seed=3, ignored=())
    _, dense = teacher_form("dense", head, y)
    for method in ("kd", "jsd", "rkl"):
        hh = h.detach().clone().requires_grad_()
        loss = fastkd.fused_linear_distill(hh, W, dense, None, method=method, bias=b, chunk_size=3, backend=backend,
                                           ce_weight=0.0, kd_weight=1.0)
        (g,) = torch.autograd.grad(loss, hh)
        h2 = h.double().requires_grad_()
        fn = {"kd": fastkd.kd_loss, "jsd": fastkd.jsd_loss, "rkl": fastkd.rkl_loss}[method]
        expect = fn(torch.nn.functional.linear(h2, W.double(), b.double()), dense.double())
        (g2,) = torch.autograd.grad(expect, h2)
        torch.testing.assert_close(loss.double(), expect, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g.double(), g2, rtol=1e-4, atol=1e-6)


def test_grad_reaches_an_nn_linear_weight_through_autograd_and_module_form():
    """The weight gradient is an ordinary autograd gradient (what DDP / FSDP hooks consume): it
    lands in lm_head.weight.grad and accumulates over two calls like any other."""
    h, _, _, head, y = make(N=10, H=8, V=30, seed=4)
    teacher, dense = teacher_form("topk", head, y)
    lm_head = torch.nn.Linear(8, 30)
    crit = fastkd.FusedLinearDistillLoss("jsd", beta=0.5, chunk_size=4, ce_weight=0.5, kd_weight=0.5)
    assert crit.method == "jsd" and crit.params == {"beta": 0.5, "temperature": 1.0}
    crit(h, lm_head.weight, teacher, y, bias=lm_head.bias).backward()
    first = lm_head.weight.grad.clone()
    ref_head = torch.nn.Linear(8, 30)
    ref_head.load_state_dict(lm_head.state_dict())
    fastkd.DistillLoss("jsd", beta=0.5, backend="torch")(ref_head(h), dense, y).backward()
    torch.testing.assert_close(first, ref_head.weight.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(lm_head.bias.grad, ref_head.bias.grad, rtol=1e-5, atol=1e-7)
    crit(h, lm_head.weight, teacher, y, bias=lm_head.bias).backward()
    torch.testing.assert_close(lm_head.weight.grad, 2 * first)


def test_no_grad_gives_the_loss_only():
    h, W, b, head, y = make(seed=5)
    _, dense = teacher_form("dense", head, y)
    with torch.no_grad():
        loss = fastkd.fused_linear_distill(h.requires_grad_(), W, dense, y, method="kd", bias=b, backend="torch")
    assert not loss.requires_grad
    torch.testing.assert_close(loss, fastkd.DistillLoss("kd", backend="torch")(h.detach() @ W.T + b, dense, y))


def test_peak_logits_are_one_chunk(monkeypatch):
    """At most chunk_size x V student logits at once: every head GEMM the loss runs is one chunk."""
    h, W, b, head, y = make(N=20, V=50, seed=6)
    shapes = []
    real = torch.nn.functional.linear

    def spy(x, w, bias=None):
        out = real(x, w, bias)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(LIN.nn.functional, "linear", spy)
    fastkd.fused_linear_distill(h.requires_grad_(), W, head, y, method="rkl", bias=b, chunk_size=6, backend="torch")
    assert shapes == [(6, 50)] * 6 + [(2, 50)] * 2  # student and teacher logits of 4 chunks (6, 6, 6, 2)


def test_the_torch_backend_keeps_autograd_temporaries_of_a_row_block_only():
    """The torch backend runs the reference's autograd on an eighth of a chunk's rows at a time:
    every logits-shaped tensor saved for its backward has at most that many rows (a whole chunk
    would keep about fifteen chunk-sized temporaries)."""
    h, W, b, head, y = make(N=40, V=50, seed=6)
    rows = []

    def pack(t):
        if t.dim() == 2 and t.shape[1] == 50:
            rows.append(t.shape[0])
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fastkd.fused_linear_distill(h.requires_grad_(), W, head, y, method="jsd", bias=b, chunk_size=16,
                                           backend="torch")
    assert rows and max(rows) == 2, rows  # an eighth of the 16-row chunk
    loss.backward()
    h2 = h.detach().clone().requires_grad_()
    _, dense = teacher_form("dense", head, y)
    full = fastkd.DistillLoss("jsd", backend="torch")(h2 @ W.T + b, dense, y)
    full.backward()
    torch.testing.assert_close(loss, full)
    torch.testing.assert_close(h.grad, h2.grad)


def test_default_chunk_size_follows_liger_with_a_floor():
    assert LIN.default_chunk_size(8192, 4096, 128256) == 256  # Liger's rule: chunk x V ~ N x H
    assert LIN.default_chunk_size(8192, 8192, 32000) == 2048
    assert LIN.default_chunk_size(8192, 256, 32000) == 131    # the floor: 4 M logits per chunk
    assert LIN.default_chunk_size(1024, 256, 32000) == 131
    assert LIN.default_chunk_size(1, 4096, 128256) == 1       # never more than N rows
    assert LIN.default_chunk_size(100, 1000, 10) == 100


def test_errors_are_clear():
    h, W, b, head, y = make(seed=7)
    _, dense = teacher_form("dense", head, y)
    f = fastkd.fused_linear_distill
    with pytest.raises(ValueError, match="hidden has 8 features but weight is"):
        f(h, W[:, :5], dense, y)
    with pytest.raises(ValueError, match="bias has 49 entries"):
        f(h, W, dense, y, bias=b[:49])
    with pytest.raises(ValueError, match=r"teacher logits must be \(N, V\) = \(13, 50\)"):
        f(h, W, dense[:5], y)
    with pytest.raises(ValueError, match="labels must be"):
        f(h, W, dense, y[:5])
    with pytest.raises(ValueError, match="pass ce_weight=0"):
        f(h, W, dense, None)
    with pytest.raises(ValueError, match="method 'ats' needs labels"):
        f(h, W, dense, None, method="ats", ce_weight=0.0)
    with pytest.raises(ValueError, match="batch-level term"):
        f(h, W, dense, y, method="dist")
    with pytest.raises(ValueError, match="a TopKTeacher needs labels"):
        f(h, W, fastkd.compress_topk(dense, y, 3), None, ce_weight=0.0)
    with pytest.raises(TypeError, match="teacher must be"):
        f(h, W, "logits", y)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        f(h, W, dense, y, chunk_size=0)
    with pytest.raises(ValueError, match="unknown parameter"):
        f(h, W, dense, y, method="kd", beta=0.5)
    with pytest.raises(ValueError, match="outside"):
        f(h, W, dense, torch.full_like(y, 50))


def test_readme_example_runs_and_equals_distill_loss():
    """The README's "Distilling a language model's head" example, read from between its markers."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = re.search(r"<!-- llm-head-example -->\s*```python\n(.*?)```\s*<!-- /llm-head-example -->", readme, re.S)
    assert block, "README.md lost the llm-head-example block"
    code = block.group(1)
    assert len(code.strip().splitlines()) <= 13
    torch.manual_seed(0)
    ns = {}
    exec(compile(code, "README.md:llm-head-example", "exec"), ns)
    h, y, teacher, lm_head, hidden = ns["h"], ns["y"], ns["teacher"], ns["lm_head"], ns["hidden"]
    assert torch.isfinite(ns["loss"]) and hidden.grad is not None and lm_head.weight.grad is not None
    assert (y == -100).sum() == 2 * 3  # the shifted prompt tokens
    W = lm_head.weight.detach().clone().requires_grad_()
    hh = h.detach().clone().requires_grad_()
    expect = fastkd.DistillLoss("jsd", beta=0.5, backend="torch")(hh @ W.T, fastkd.losses.densify(teacher, y), y)
    expect.backward()
    torch.testing.assert_close(ns["loss"].detach(), expect.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lm_head.weight.grad, W.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(hidden.grad[:, :-1].reshape(-1, h.shape[1]), hh.grad, rtol=1e-5, atol=1e-7)
    assert torch.equal(hidden.grad[:, -1], torch.zeros_like(hidden.grad[:, -1]))


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["kd", "jsd", "rkl"])
def test_gpu_fused_kernel_per_chunk_matches_the_reference(method):
    """Compiled: bf16, V = 40000 (the kernel's chunked path), a teacher head, N not a multiple of the chunk."""
    dev = torch.device("cuda")
    h, W, b, head, y = make(N=300, H=64, V=40000, Ht=48, seed=9, dtype=torch.bfloat16, device=dev)
    teacher, dense = teacher_form("head", head, y)
    compare(method, h, W, b, teacher, dense, y, dict(ce_weight=0.5, kd_weight=0.5, **PARAMS[method]), "triton", 96,
            dtype=torch.bfloat16)


@pytest.mark.parametrize("method", ["kd", "jsd", "rkl"])
@pytest.mark.parametrize("temperature", [1e-3, 100.0])
def test_row_blocks_match_full_logits_at_the_temperature_limits(method, temperature):
    """fp64, 37 rows in 16-row chunks (row blocks of 2, a last chunk of 5): the torch backend's
    value and gradients equal DistillLoss on the full logits at both ends of the temperature range."""
    g = torch.Generator().manual_seed(11)
    h = torch.randn(37, 8, generator=g, dtype=torch.float64)
    W = torch.randn(50, 8, generator=g, dtype=torch.float64)
    v = torch.randn(37, 50, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 50, (37,), generator=g)
    y[:3] = II
    h1, W1 = h.clone().requires_grad_(), W.clone().requires_grad_()
    got = fastkd.fused_linear_distill(h1, W1, v, y, method=method, temperature=temperature, chunk_size=16,
                                      backend="torch")
    got.backward()
    h2, W2 = h.clone().requires_grad_(), W.clone().requires_grad_()
    want = fastkd.DistillLoss(method, temperature=temperature, backend="torch")(h2 @ W2.T, v, y)
    want.backward()
    assert torch.isfinite(got)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(W1.grad, W2.grad, rtol=1e-12, atol=1e-14)
