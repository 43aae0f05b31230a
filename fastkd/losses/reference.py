"""Pure-PyTorch reference of every loss in fastkd: the executable form of docs/methods.md.

Everything here works on 2-D logits ``(N, C)`` (the public API flattens leading dimensions),
upcasts to at least fp32 before any exponential or reduction, and returns **per-row** values
(shape ``(N,)``, dtype fp32 or fp64) unless a function says otherwise. Reductions and input
validation live in :mod:`fastkd.losses.functional`; this module assumes valid inputs.

Conventions shared with the Triton kernels (the kernels are tested against this file):

* A row whose label equals ``ignore_index`` contributes 0 to CE and to every label-dependent KD
  term (ATS, ISATS, DKD), and gets a zero gradient, whatever its logits hold (NaN included: such
  rows are replaced by zeros with ``torch.where`` before any arithmetic, :func:`zero_rows`).
* A label outside ``[0, C)`` that is not ``ignore_index`` (possible only with the label check off)
  is never used as an index: it makes its row's loss and gradient NaN (:func:`label_rows`).
* ``-inf`` logits are "masked" classes. A class whose teacher probability is exactly 0
  contributes 0 to a KL sum (``0 * log 0 = 0``), also where the student logit is ``-inf`` at
  the same place. A class the teacher gives mass but the student masks makes the row ``+inf``.
* NaN in a row's logits makes that row's loss NaN (it is never hidden); other rows are untouched.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from .._isats_grid import isats_default_candidates

__all__ = [
    "upcast",
    "zero_rows",
    "label_rows",
    "cross_entropy",
    "kd",
    "ats_teacher_log_probs",
    "ats",
    "isats_default_candidates",
    "isats_select_tau",
    "isats",
    "dkd_parts",
    "dkd",
    "dkd_warmup_weight",
    "kd_term_rows",
    "rkl",
    "jsd",
    "dist",
    "tolerant_gap",
    "tolerant_teacher_loss",
    "linear_cka",
]


def upcast(x: Tensor) -> Tensor:
    """fp16/bf16 -> fp32; fp32 and fp64 are kept (fp64 is how tests build the exact reference)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _valid_rows(target: Tensor, ignore_index: int) -> Tensor:
    return target != ignore_index


def _bad_labels(target: Tensor, C: int, ignore_index: int) -> Tensor:
    """Rows whose label is neither ``ignore_index`` nor a class in ``[0, C)``."""
    return ((target < 0) | (target >= C)) & (target != ignore_index)


def _safe_target(target: Tensor, ignore_index: int, C: int) -> Tensor:
    """Labels usable for gather: ignored rows and labels outside ``[0, C)`` point at class 0 (an
    out-of-range label is never used as an index; the callers mask or poison those rows)."""
    off = (target == ignore_index) | (target < 0) | (target >= C)
    return torch.where(off, torch.zeros_like(target), target).long()


def zero_rows(x: Tensor, keep: Optional[Tensor]) -> Tensor:
    """``x`` (N, C) with the rows outside ``keep`` (N,) replaced by zeros (``torch.where``, not a
    product with 0): a row left out contributes exactly 0 to the loss and its gradient is exactly 0,
    whatever it held (NaN included)."""
    if keep is None:
        return x
    return torch.where(keep[:, None], x, torch.zeros((), dtype=x.dtype, device=x.device))


def fill_rows(x: Tensor, keep: Optional[Tensor]) -> Tensor:
    """``x`` (N, C) with the rows outside ``keep`` replaced by ``0, 1, ..., C-1``: a fixed finite row
    that is not constant, so a z-score (:func:`standardize`) of it and its gradient are finite; the
    rows' own values (NaN included) get exactly zero gradient through the ``torch.where``."""
    if keep is None:
        return x
    fill = torch.arange(x.shape[-1], dtype=x.dtype, device=x.device)
    return torch.where(keep[:, None], x, fill)


def label_rows(x: Tensor, target: Tensor, ignore_index: int) -> Tensor:
    """``x`` (N, C) as a label-reading loss uses it: rows labelled ``ignore_index`` zeroed
    (:func:`zero_rows`), rows with a label outside ``[0, C)`` made NaN so that their loss and
    gradient are NaN, as in the fused kernels (reachable only with the label check off)."""
    x = zero_rows(x, target != ignore_index)
    bad = _bad_labels(target, x.shape[-1], ignore_index)
    # An addition, not a where: the NaN row's gradient is then NaN too (a where would give 0).
    return x + torch.where(bad, math.nan, 0.0).to(x.dtype)[:, None]


def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """sum_i p_i (log p_i - log q_i) per row with the 0 * log 0 = 0 convention."""
    p = log_p.exp()
    # ``p == 0`` (not ``p > 0``): a NaN probability must stay NaN, never be zeroed away.
    terms = torch.where(p == 0, torch.zeros_like(p), p * (log_p - log_q))
    return terms.sum(-1)


# --------------------------------------------------------------------------------------------
# 1. Cross-entropy
# --------------------------------------------------------------------------------------------
def cross_entropy(z: Tensor, target: Tensor, label_smoothing: float = 0.0, ignore_index: int = -100) -> Tensor:
    """Per-row CE = LSE(z) - sum_i t_i z_i with target t = (1-eps) e_y + eps/C; ignored rows 0."""
    z = label_rows(upcast(z), target, ignore_index)
    C = z.shape[-1]
    valid = _valid_rows(target, ignore_index)
    y = _safe_target(target, ignore_index, C)
    lse = torch.logsumexp(z, dim=-1)
    z_y = z.gather(-1, y[:, None]).squeeze(-1)
    ce = lse - z_y
    if label_smoothing:
        eps = float(label_smoothing)
        # (1-eps)(LSE - z_y) + eps * (LSE - mean(z)): the smoothed target's CE. The mean as a sum
        # of z/C: its partial sums never exceed max|z|, so rows near fp32's maximum cannot overflow.
        ce = (1.0 - eps) * ce + eps * (lse - (z / C).sum(-1))
    return torch.where(valid, ce, torch.zeros_like(ce))


# --------------------------------------------------------------------------------------------
# 2. Vanilla KD
# --------------------------------------------------------------------------------------------
def kd(z: Tensor, v: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-row T^2 * KL(sm(v/T) || sm(z/T))."""
    z, v = upcast(z), upcast(v)
    T = float(temperature)
    log_ps = torch.log_softmax(z / T, dim=-1)
    log_pt = torch.log_softmax(v / T, dim=-1)
    return T * T * _kl_rows(log_pt, log_ps)


# --------------------------------------------------------------------------------------------
# 3. ATS and ISATS
# --------------------------------------------------------------------------------------------
def ats_teacher_log_probs(v: Tensor, target: Tensor, tau_target, tau_other, ignore_index: int = -100) -> Tensor:
    """log q with q = sm(v_c / tau_c), tau_c = tau_target on the label, tau_other elsewhere.

    ``tau_other`` may be a float or a per-row tensor of shape (N,) (ISATS). Ignored rows are
    computed with class 0 as their "target" (their value is masked out by the callers).
    """
    v = upcast(v)
    y = _safe_target(target, ignore_index, v.shape[-1])
    on_target = torch.zeros_like(v, dtype=torch.bool)
    on_target.scatter_(-1, y[:, None], True)
    if isinstance(tau_other, Tensor):
        tau_o = tau_other.to(v.dtype)[:, None]
    else:
        tau_o = torch.full((), float(tau_other), dtype=v.dtype, device=v.device)
    tau_t = torch.full((), float(tau_target), dtype=v.dtype, device=v.device)
    scaled = torch.where(on_target, v / tau_t, v / tau_o)
    return torch.log_softmax(scaled, dim=-1)


def ats(
    z: Tensor,
    v: Tensor,
    target: Tensor,
    tau_target: float = 4.0,
    tau_other=2.0,
    student_temperature: float = 1.0,
    ignore_index: int = -100,
) -> Tensor:
    """Per-row ATS = s^2 * KL(q || sm(z/s)); ignored rows 0. ``tau_other`` float or (N,)."""
    z = label_rows(upcast(z), target, ignore_index)
    v = label_rows(upcast(v), target, ignore_index)
    s = float(student_temperature)
    log_q = ats_teacher_log_probs(v, target, tau_target, tau_other, ignore_index).to(z.dtype)
    log_ps = torch.log_softmax(z / s, dim=-1)
    out = s * s * _kl_rows(log_q, log_ps)
    return torch.where(_valid_rows(target, ignore_index), out, torch.zeros_like(out))


def isats_select_tau(
    v: Tensor,
    target: Tensor,
    tau_target: float = 4.0,
    candidates: Optional[Sequence[float]] = None,
    ignore_index: int = -100,
) -> Tensor:
    """Per-row ``tau_other`` chosen from ``candidates`` (no gradient).

    Maximises the (population) variance of q's C-1 wrong-class probabilities subject to the
    true class staying q's arg-max (``v_y / tau_target >= max_{c != y} v_c / t``).
    Ties go to the first (in the given order) candidate. A row where no candidate keeps the
    label on top (the teacher is wrong) gets the largest candidate, the one closest to plain
    KD. Ignored rows get the largest candidate too (their loss is 0 regardless).
    """
    if candidates is None:
        candidates = isats_default_candidates(tau_target)
    v = upcast(v).detach()
    if v.dtype != torch.float64:
        v = v.double()
    N, C = v.shape
    y = _safe_target(target, ignore_index, C)
    on_target = torch.zeros_like(v, dtype=torch.bool)
    on_target.scatter_(-1, y[:, None], True)
    v_y = v.gather(-1, y[:, None]).squeeze(-1)
    v_wrong_max = torch.where(on_target, torch.full_like(v, -math.inf), v).amax(-1)
    best_var = torch.full((N,), -math.inf, dtype=v.dtype, device=v.device)
    best_tau = torch.full((N,), float(max(candidates)), dtype=v.dtype, device=v.device)
    for t in candidates:
        log_q = ats_teacher_log_probs(v, target, tau_target, float(t), ignore_index)
        q = log_q.exp()
        wrong = torch.where(on_target, torch.zeros_like(q), q)
        mean = wrong.sum(-1) / (C - 1)
        var = (torch.where(on_target, torch.zeros_like(q), (q - mean[:, None]) ** 2)).sum(-1) / (C - 1)
        ok = v_y / float(tau_target) >= v_wrong_max / float(t)
        better = ok & (var > best_var)
        best_var = torch.where(better, var, best_var)
        best_tau = torch.where(better, torch.full_like(best_tau, float(t)), best_tau)
    return best_tau


def isats(
    z: Tensor,
    v: Tensor,
    target: Tensor,
    tau_target: float = 4.0,
    candidates: Optional[Sequence[float]] = None,
    student_temperature: float = 1.0,
    ignore_index: int = -100,
) -> Tensor:
    """Per-row ISATS: ATS with each row's ``tau_other`` from :func:`isats_select_tau`."""
    v = label_rows(upcast(v), target, ignore_index)
    tau = isats_select_tau(v, target, tau_target, candidates, ignore_index)
    return ats(z, v, target, tau_target, tau.to(upcast(z).dtype), student_temperature, ignore_index)


# --------------------------------------------------------------------------------------------
# 4. DKD
# --------------------------------------------------------------------------------------------
def dkd_parts(z: Tensor, v: Tensor, target: Tensor, temperature: float = 4.0, ignore_index: int = -100):
    """Per-row (TCKD, NCKD), both without the T^2 factor, through log-sum-exp forms on max-shifted
    logits: ``log p_y = x_y - LSE(x)`` and ``log(1 - p_y) = LSE_{c != y}(x) - LSE(x)`` with
    ``x = z/T - max(z/T)`` (docs/methods.md §4); never the log of a rounded probability."""
    z, v = label_rows(upcast(z), target, ignore_index), label_rows(upcast(v), target, ignore_index)
    T = float(temperature)
    y = _safe_target(target, ignore_index, z.shape[-1])
    on_target = torch.zeros_like(z, dtype=torch.bool)
    on_target.scatter_(-1, y[:, None], True)

    def split(x):
        x = x / T
        # Shift each row by its (detached) max first: every quantity below is then formed from
        # differences of nearby numbers, so the result is shift invariant (a row at logit scale
        # 3e38 is as exact as one at scale 1) and ``x_y - LSE`` never cancels two huge values.
        # The loss is invariant to the shift, so detaching it leaves the gradient exact.
        m = x.detach().amax(-1, keepdim=True)
        x = x - torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        lse = torch.logsumexp(x, dim=-1)
        x_nt = torch.where(on_target, torch.full_like(x, -math.inf), x)
        lse_nt = torch.logsumexp(x_nt, dim=-1)
        log_p_y = x.gather(-1, y[:, None]).squeeze(-1) - lse
        log_1m_p_y = lse_nt - lse
        log_hat = x_nt - lse_nt[:, None]  # log p^ over non-target classes (-inf on y)
        return log_p_y, log_1m_p_y, log_hat

    s_y, s_ny, s_hat = split(z)
    t_y, t_ny, t_hat = split(v)
    b_t = torch.stack([t_y, t_ny], -1)
    b_s = torch.stack([s_y, s_ny], -1)
    tckd = _kl_rows(b_t, b_s)
    nckd = _kl_rows(t_hat, s_hat)
    valid = _valid_rows(target, ignore_index)
    zero = torch.zeros_like(tckd)
    return torch.where(valid, tckd, zero), torch.where(valid, nckd, zero)


def dkd(
    z: Tensor,
    v: Tensor,
    target: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    ignore_index: int = -100,
) -> Tensor:
    """Per-row DKD = T^2 (alpha TCKD + beta NCKD) (the warm-up weight is applied by callers)."""
    tckd, nckd = dkd_parts(z, v, target, temperature, ignore_index)
    T = float(temperature)
    return T * T * (float(alpha) * tckd + float(beta) * nckd)


def dkd_warmup_weight(epoch: float, warmup_epochs: float) -> float:
    """min(epoch / warmup, 1); no warm-up (``warmup_epochs <= 0``) gives 1."""
    if warmup_epochs <= 0:
        return 1.0
    return float(min(max(epoch, 0.0) / warmup_epochs, 1.0))


# --------------------------------------------------------------------------------------------
# 4b. Reverse KL and the generalised Jensen-Shannon divergence (the LLM distillation losses)
# --------------------------------------------------------------------------------------------
def _kl_rows_masked(log_p: Tensor, log_q: Tensor) -> Tensor:
    """:func:`_kl_rows` whose *gradient* is also exact where ``p == 0``: both logs are zeroed
    there before they are subtracted, so ``-inf - -inf`` is never formed (not even in a branch
    that ``torch.where`` discards, whose NaN would otherwise reach the gradient of ``p``)."""
    p = log_p.exp()
    absent = p == 0
    zero = torch.zeros_like(p)
    return (p * (torch.where(absent, zero, log_p) - torch.where(absent, zero, log_q))).sum(-1)


def rkl(z: Tensor, v: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-row reverse KL ``T^2 * KL(sm(z/T) || sm(v/T))`` (student first: mode seeking).

    Gradient w.r.t. z: ``T * p_s * (log p_s - log p_t - KL)`` (the row's KL enters every class).
    A class the student gives mass and the teacher masks (``-inf``) makes the row ``+inf``.
    """
    z, v = upcast(z), upcast(v)
    T = float(temperature)
    log_ps = torch.log_softmax(z / T, dim=-1)
    log_pt = torch.log_softmax(v / T, dim=-1)
    return T * T * _kl_rows_masked(log_ps, log_pt)


def jsd(z: Tensor, v: Tensor, beta: float = 0.5, temperature: float = 1.0) -> Tensor:
    """Per-row generalised Jensen-Shannon divergence, Liger-Kernel's convention, times ``T^2``.

    With ``P = sm(v/T)`` (teacher), ``Q = sm(z/T)`` (student) and ``M = beta P + (1 - beta) Q``:
    ``JSD_beta = beta KL(P || M) + (1 - beta) KL(Q || M)``. ``beta = 0.5`` is the symmetric JSD.
    The end points are defined apart (as Liger does), not as limits (both limits are 0):
    ``beta = 0`` is the forward KL ``KL(P || Q)`` (= :func:`kd`), ``beta = 1`` the reverse KL
    ``KL(Q || P)`` (= :func:`rkl`). ``log M`` is formed in log space (``logaddexp``), so rows at
    large logit magnitudes keep their exact value.
    """
    b = float(beta)
    if b == 0.0:
        return kd(z, v, temperature)
    if b == 1.0:
        return rkl(z, v, temperature)
    z, v = upcast(z), upcast(v)
    T = float(temperature)
    log_ps = torch.log_softmax(z / T, dim=-1)
    log_pt = torch.log_softmax(v / T, dim=-1)
    a = log_pt + math.log(b)
    c = log_ps + math.log1p(-b)
    # Where both distributions are 0, log M is -inf; the inputs of logaddexp are made finite
    # there first (its gradient at (-inf, -inf) is NaN, which would reach the student's gradient).
    both = torch.isneginf(a.detach()) & torch.isneginf(c.detach())
    zero = torch.zeros_like(a)
    log_m = torch.where(both, torch.full_like(a, -math.inf),
                        torch.logaddexp(torch.where(both, zero, a), torch.where(both, zero, c)))
    return T * T * (b * _kl_rows_masked(log_pt, log_m) + (1.0 - b) * _kl_rows_masked(log_ps, log_m))


STANDARDIZE_EPS = 1e-7


def standardize(x: Tensor) -> Tensor:
    """Logit standardisation (Sun et al. 2024, docs/methods.md §11): each row z-scored over the
    classes, ``(x - mean) / (std + 1e-7)`` with the unbiased (C - 1) std, as the authors' code does.
    Computed in fp32 (fp64 for fp64 input); the gradient flows through mean and std."""
    x = upcast(x)
    if x.shape[-1] < 2:
        raise ValueError(f"logit standardisation needs at least 2 classes (the unbiased std over classes), "
                         f"got {x.shape[-1]}")
    return (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + STANDARDIZE_EPS)


def kd_term_rows(method: str, z: Tensor, v: Tensor, target: Tensor, ignore_index: int = -100, **params) -> Tensor:
    """Per-row KD term of a row-local method (kd, ats, isats, dkd, jsd, rkl) with DistillLoss's row
    convention: rows labelled ``ignore_index`` give 0, also for plain ``kd``. ``params`` are the
    method's keywords of :data:`fastkd.losses.methods.METHOD_TABLE` (without ``warmup_epochs``);
    ``standardize=True`` z-scores both rows first (:func:`standardize`)."""
    if params.pop("standardize", False):  # left-out rows become a fixed finite row first (a NaN row's
        keep = _valid_rows(target, ignore_index)  # z-score would put NaN in the gradient)
        z, v = standardize(fill_rows(z, keep)), standardize(fill_rows(v, keep))
    if method == "kd":
        rows = kd(label_rows(upcast(z), target, ignore_index), label_rows(upcast(v), target, ignore_index),
                  params["temperature"])
        return torch.where(_valid_rows(target, ignore_index), rows, torch.zeros_like(rows))
    if method in ("jsd", "rkl"):  # label-free: left-out rows are zeroed first (exactly 0, zero gradient, even if NaN)
        keep = _valid_rows(target, ignore_index)
        z, v = zero_rows(upcast(z), keep), zero_rows(upcast(v), keep)
        rows = jsd(z, v, params["beta"], params["temperature"]) if method == "jsd" else rkl(z, v, params["temperature"])
        return torch.where(keep, rows, torch.zeros_like(rows))
    if method == "ats":
        return ats(z, v, target, params["tau_target"], params["tau_other"], params["student_temperature"],
                   ignore_index)
    if method == "isats":
        return isats(z, v, target, params["tau_target"], params.get("candidates"), params["student_temperature"],
                     ignore_index)
    if method == "dkd":
        return dkd(z, v, target, params["alpha"], params["beta"], params["temperature"], ignore_index)
    raise ValueError(f"no per-row KD term for method {method!r} (row-local methods: kd, ats, isats, dkd, jsd, rkl)")


# --------------------------------------------------------------------------------------------
# 5. DIST
# --------------------------------------------------------------------------------------------
def _pearson(a: Tensor, b: Tensor, dim: int, eps: float = 1e-8) -> Tensor:
    a = a - a.mean(dim, keepdim=True)
    b = b - b.mean(dim, keepdim=True)
    return (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim) + eps)


def dist(zs: Tensor, zt: Tensor, beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0,
         valid: Optional[Tensor] = None) -> Tensor:
    """DIST as one scalar: tau^2 (beta (1 - mean_b rho_rows) + gamma (1 - mean_c rho_cols)).

    ``valid`` (optional ``(N,)`` bool): only these rows enter either term (the inter-class mean
    and the column statistics of the intra-class correlations), computed as masked sums on the
    device, without a host synchronisation. No valid row gives 0 (and a zero gradient).

    This is also what backend ``triton`` computes: DIST has no fused kernel, because its
    intra-class term correlates *columns* over the whole batch, so no row's gradient can be
    written before statistics of every row are known (a fused version needs three dependent
    sweeps over N x C and at least two launches, for a loss that is a few microseconds of work at
    the ImageNet shape 256 x 1000).
    """
    zs, zt = upcast(zs), upcast(zt)
    if valid is None and zs.shape[0] == 0:
        valid = torch.ones(0, dtype=torch.bool, device=zs.device)  # an empty batch: 0, never NaN
    zs, zt = zero_rows(zs, valid), zero_rows(zt, valid)
    tau = float(temperature)
    ys = torch.softmax(zs / tau, dim=-1)
    yt = torch.softmax(zt / tau, dim=-1)
    if valid is None:
        inter = 1.0 - _pearson(ys, yt, dim=1).mean()
        intra = 1.0 - _pearson(ys, yt, dim=0).mean()
        return tau * tau * (float(beta) * inter + float(gamma) * intra)
    keep = valid.reshape(-1, 1)
    n = valid.sum().to(ys.dtype)
    denom = n.clamp_min(1)
    zero = torch.zeros((), dtype=ys.dtype, device=ys.device)
    inter = 1.0 - torch.where(valid, _pearson(ys, yt, dim=1), zero).sum() / denom
    ys_c = torch.where(keep, ys - torch.where(keep, ys, zero).sum(0, keepdim=True) / denom, zero)
    yt_c = torch.where(keep, yt - torch.where(keep, yt, zero).sum(0, keepdim=True) / denom, zero)
    rho = (ys_c * yt_c).sum(0) / (ys_c.norm(dim=0) * yt_c.norm(dim=0) + 1e-8)
    intra = 1.0 - rho.mean()
    loss = tau * tau * (float(beta) * inter + float(gamma) * intra)
    return torch.where(n > 0, loss, zero)


# --------------------------------------------------------------------------------------------
# 6. Tolerant teacher (our reconstruction: the paper's exact term is not available to us)
# --------------------------------------------------------------------------------------------
def tolerant_gap(z: Tensor, k: int = 5) -> Tensor:
    """Per-row top-1 logit minus the mean of the next ``k-1`` largest logits.

    Our reconstruction of the "tolerant teacher" (Yang et al. 2018) confidence-gap term; the
    paper's exact term is not available to us. Needs ``2 <= k <= C``.
    """
    z = upcast(z)
    top = z.topk(k, dim=-1).values
    return top[:, 0] - top[:, 1:].mean(-1)


def tolerant_teacher_loss(
    logits: Tensor,
    target: Tensor,
    eta: float = 0.5,
    k: int = 5,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
) -> Tensor:
    """Teacher-training loss CE + eta * gap, mean over non-ignored rows (scalar)."""
    ce = cross_entropy(logits, target, label_smoothing, ignore_index)
    gap = tolerant_gap(label_rows(upcast(logits), target, ignore_index), k)
    valid = _valid_rows(target, ignore_index)
    per_row = torch.where(valid, ce + float(eta) * gap, torch.zeros_like(ce))
    return per_row.sum() / valid.sum().clamp_min(1)


# --------------------------------------------------------------------------------------------
# 8. Linear CKA (for DPK's mixing ratio)
# --------------------------------------------------------------------------------------------
def linear_cka(x: Tensor, y: Tensor, eps: float = 1e-12) -> Tensor:
    """||X^T Y||_F^2 / (||X^T X||_F ||Y^T Y||_F) on column-centred X (n, p), Y (n, q)."""
    x = upcast(x).flatten(1)
    y = upcast(y).flatten(1)
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    if x.shape[0] < max(x.shape[1], y.shape[1]):
        # Same value through the n x n Gram matrices: ||X^T Y||_F^2 = <XX^T, YY^T>_F and
        # ||X^T X||_F = ||X X^T||_F. Cheaper when features are wider than the batch.
        kx, ky = x @ x.T, y @ y.T
        return (kx * ky).sum() / (kx.norm() * ky.norm() + eps)
    num = (x.T @ y).square().sum()
    den = (x.T @ x).norm() * (y.T @ y).norm()
    return num / (den + eps)
