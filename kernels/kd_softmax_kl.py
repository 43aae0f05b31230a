"""Fused knowledge-distillation loss: one pass over raw logits, loss and gradient together.

Math (``shared/spec/methods.md``; :mod:`fastkd.losses.reference` is the executable spec)
-----------------------------------------------------------------------------------------
Per row, with student logits ``z``, teacher logits ``v`` (C values each) and label ``y``:

* CE (label smoothing ``eps``): ``LSE(z) - (1-eps) z_y - eps mean(z)``;
  gradient ``sm(z) - (1-eps) e_y - eps/C``.
* ``kd``, ``ats``, ``isats``: the teacher target is ``q = sm(u)`` with ``u_c = v_c / tau_c``
  (``tau_c = T`` everywhere for ``kd``; ``tau_target`` on the label and ``tau_other``
  elsewhere for ATS; ISATS picks ``tau_other`` per row from a candidate grid). The student
  uses one temperature ``s`` (``T`` for ``kd``): ``KD = s^2 sum_c q_c (log q_c - log sm(z/s)_c)``,
  gradient ``s (sm(z/s) - q)``.
* ``dkd``: with ``w = z/T``, ``u = v/T`` and the non-target log-normalisers
  ``LSE_nt = LSE_{c != y}``: ``log p_y = x_y - LSE``, ``log(1 - p_y) = LSE_nt - LSE`` (never the
  log of a rounded probability), ``TCKD = KL([p^t_y, 1-p^t_y] || [p^s_y, 1-p^s_y])``,
  ``NCKD = sum_{c != y} p^t_c (log p^t_c - log p^s_c)`` over the renormalised non-target
  distributions (hats). With ``d = p^s_y - p^t_y`` the gradient of
  ``T^2 (alpha TCKD + beta NCKD)`` is ``T alpha d`` on ``y`` and
  ``T (beta (phat^s_c - phat^t_c) - alpha d phat^s_c)`` elsewhere.
* The row's loss is ``ce_weight * CE + kd_weight * KD``; ``batchmean`` divides by the number
  of rows whose label is not ``ignore_index`` (all rows when there are no labels), so every
  gradient row is written already divided by that count.

ISATS inside the same pass. For a candidate ``t``, ``max_{c != y} v_c / t`` equals
``(max_{c != y} v_c) / t``, so one running wrong-class maximum ``M`` serves every candidate, and
``S1(t) = sum_{c != y} exp((v_c - M)/t)``, ``S2(t) = sum_{c != y} exp(2 (v_c - M)/t)`` are
carried as ``[NUM_CAND]`` vectors (rescaled when ``M`` grows). From them: the wrong-class mean
and variance of ``q`` for every candidate, the selection (ties -> first candidate; no candidate
keeps the label on top -> the largest, exactly :func:`reference.isats_select_tau`), and the
chosen candidate's teacher normaliser ``LSE(u) = logaddexp(v_y/tau_target, M/t + log S1(t))``
without another pass. The variance is formed as ``r^2 ((C-1) S2 - S1^2) / ((C-1) Z)^2``, which is
exactly 0 in the degenerate ties (C = 2, all wrong-class logits equal), as in the reference.

Memory traffic (what makes this fast)
-------------------------------------
The loss is memory-bound: the minimum is one read of ``z``, one read of ``v`` and one write of
the gradient (``3 N C`` elements; an eager PyTorch KD + CE forward/backward moves ~15-20x that
through ``log_softmax``/``softmax``/``kl_div`` temporaries and their backward). Every gradient
entry needs the row's normalisers, known only after the whole row has been seen, so:

* rows that fit one block (``C <= MAX_SINGLE``) are loaded once into registers; statistics,
  loss terms and gradient are computed from the registers: exactly the minimal traffic;
* longer rows run two sweeps over column chunks in the same program: sweep 1 keeps online
  (rescaled) max/sum statistics, sweep 2 re-reads the chunks, computes the loss terms with the
  final normalisers and writes the gradient. Sweep 2 walks the row backwards, so the chunks
  read last in sweep 1 (the ones most likely still in L2) are re-read first. Where the rows in
  flight outgrow L2 (128256 bf16 classes: 513 KB per (z, v) row pair) the re-read comes from
  DRAM: about 5 units of traffic against the minimal 3 (measured on an H100: 55 % of the
  device-to-device copy bandwidth at 8192 x 128256, 19x eager, 2.1x torch.compile).

Besides the gradient (student's shape and dtype) there are only O(N) buffers (per-row CE, KD
and weighted loss). The scalar loss is reduced in the same launch, deterministically: every
program stores its row's loss, then takes a ticket from an atomic counter; the program that
draws the last ticket sums the N row losses in a fixed order (so the value does not depend on
scheduling, unlike an atomic float sum) and resets the counter for the next launch.
``batchmean`` needs the count of non-ignored rows before any gradient row can be written:
for N <= ``COUNT_IN_KERNEL_MAX`` every program counts the labels itself (the ImageNet shape,
256 x 1000, is then a single kernel launch for loss and gradient); larger batches count them
with one tiny PyTorch reduction on the device (no host synchronisation).

Backward only scales the saved gradient by ``grad_output``, in place. Whether ``grad_output``
is exactly 1 is decided on the device (a tiny kernel whose programs read it and return), so
there is no host synchronisation and the common case touches no gradient memory.

Numerics. All arithmetic is fp32 whatever the input dtype (fp32, bf16, fp16; fp64 inputs go to
the fp64 reference); the gradient is stored in the student's dtype; row offsets are 64-bit.
Log-probabilities are formed like ``torch.log_softmax``, ``(x - max) - log(sum)``, never
``x - LSE`` (which rounds the normaliser at the logits' magnitude); temperatures divide (IEEE,
as PyTorch's ``x / T``) rather than multiply by a rounded reciprocal; and the kernel is compiled
without FMA contraction, so both sweeps round identically and the compiled kernel rounds like
the interpreter that runs the CPU tests. ``-inf`` logits are masked classes with the reference's
``0 * log 0 = 0`` convention; a label outside [0, C) (label check off) makes its row NaN and is
never used as an address.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import _compat

__all__ = ["fused_distill", "KDSoftmaxKLFunction", "METHOD_IDS", "config_for", "MAX_SINGLE", "CHUNK"]

METHOD_IDS = {"ce": 0, "kd": 1, "ats": 2, "isats": 3, "dkd": 4}
REDUCE_IDS = {"none": 0, "sum": 1, "batchmean": 2}

# Rows up to MAX_SINGLE classes are processed from registers in one read; longer rows in
# chunks of CHUNK columns (two sweeps; with PREFETCH the next chunk's loads are issued before
# the current chunk's math). Tests and benchmarks may override these (see
# :func:`override_blocks`); numbers never depend on them beyond fp32 summation order.
# CHUNK / CHUNK_WARPS / PREFETCH: the best of a sweep on an H100 (triton 3.6) at 4096 x 32000
# and 8192 x 128256 bf16 (benchmarks/results/kernels-*.md); 4096 columns x 8 warps spills.
MAX_SINGLE = 8192
CHUNK = 2048
CHUNK_WARPS = 4
PREFETCH = True
# batchmean with N <= this many rows: each program counts the valid labels itself.
COUNT_IN_KERNEL_MAX = 1024
_BLOCK_N = 1024  # label / row-loss chunk for the in-kernel count and the final reduction

_overrides: dict = {}


# =============================================================================================
# Triton kernels
# =============================================================================================
@triton.jit
def _lse_update(m, s, x):
    """Online log-sum-exp: fold chunk ``x`` ([BLOCK], -inf = absent) into running (max, sum)."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    # A running max of -inf (nothing seen yet, or all masked) would give exp(-inf - -inf) = NaN.
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    s_new = s * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref), axis=0)
    return m_new, s_new


@triton.jit
def _div(x, tau, UNIT: tl.constexpr):
    """x / tau correctly rounded (IEEE division, as PyTorch's ``x / T``); x itself when tau == 1.

    Division, not multiplication by 1/tau: two roundings instead of one shift 1e4-sized logits
    by up to an ulp (~1e-3), which a near-one-hot KL multiplies by the logit gap.
    """
    if UNIT:
        out = x
    else:
        out = tl.math.div_rn(x, tau)
    return out


@triton.jit
def _lse_merge(m, ls, x):
    """Fold one more logit ``x`` into a normaliser held as (max m, log of the shifted sum ls)."""
    m_new = tl.maximum(m, x)
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, tl.log(tl.exp(m - m_ref + ls) + tl.exp(x - m_ref))


@triton.jit
def _pick(vec, i, IDX):
    """Element ``i`` of a small register vector ``vec`` (``IDX`` = its arange)."""
    return tl.sum(tl.where(IDX == i, vec, 0.0), axis=0)


@triton.jit
def _isats_update(M, S1, S2, vm, cand_ptr, NUM_CAND: tl.constexpr, CAND_P2: tl.constexpr):
    """Fold teacher chunk ``vm`` (-inf on the label column and outside the row) into the
    wrong-class max ``M`` and the per-candidate sums ``S1[t] = sum exp((v-M)/t)``,
    ``S2[t] = sum exp(2 (v-M)/t)`` ([CAND_P2] vectors, rescaled when M grows)."""
    ci = tl.arange(0, CAND_P2)
    M_new = tl.maximum(M, tl.max(vm, axis=0))
    M_ref = tl.where(M_new == float("-inf"), 0.0, M_new)
    for i in tl.static_range(NUM_CAND):
        inv_t = 1.0 / tl.load(cand_ptr + i)
        r = tl.exp((M - M_ref) * inv_t)
        e = tl.exp((vm - M_ref) * inv_t)
        s1 = _pick(S1, i, ci) * r + tl.sum(e, axis=0)
        s2 = _pick(S2, i, ci) * (r * r) + tl.sum(e * e, axis=0)
        S1 = tl.where(ci == i, s1, S1)
        S2 = tl.where(ci == i, s2, S2)
    return M_new, S1, S2


@triton.jit
def _isats_select(M, S1, S2, v_y, tau_tt, tau_max, C, cand_ptr, NUM_CAND: tl.constexpr, CAND_P2: tl.constexpr):
    """Per-row ISATS choice -> (tau_other, teacher normaliser as (shift, log shifted sum)).

    Maximises the population variance of q's C-1 wrong-class probabilities subject to
    ``v_y / tau_t >= M / t``; ties keep the first candidate; if no candidate qualifies the
    largest one (``tau_max``) is used. Mirrors :func:`reference.isats_select_tau`.
    """
    ci = tl.arange(0, CAND_P2)
    a = tl.math.div_rn(v_y, tau_tt)
    n_wrong = (C - 1).to(tl.float32)
    best_var = -float("inf")
    best_t = tau_max
    best_m = 0.0
    best_ls = 0.0
    found = False
    default_m = 0.0
    default_ls = 0.0
    u_y = a  # exactly as sweep 2 computes the label column of u
    for i in tl.static_range(NUM_CAND):
        t = tl.load(cand_ptr + i)
        b = tl.math.div_rn(M, t)
        s1 = _pick(S1, i, ci)
        s2 = _pick(S2, i, ci)
        # Shift by max(a, b): one of exp(a - mt), exp(b - mt) is 1, so Z >= 1 (no overflow).
        mt = tl.maximum(a, b)
        mt = tl.where(mt == float("-inf"), 0.0, mt)
        ea = tl.exp(a - mt)
        r = tl.exp(b - mt)
        z = ea + s1 * r
        # var = r^2 ((C-1) S2 - S1^2) / ((C-1) Z)^2. In this form the degenerate ties (C = 2, or
        # all wrong-class logits equal: every exp term is exactly 1) give exactly 0 for every
        # candidate, as in the fp64 reference, so the tie rule picks the same candidate.
        var = (r * r) * (n_wrong * s2 - s1 * s1) / ((n_wrong * z) * (n_wrong * z))
        # Normaliser of u (u_y = v_y/tau_target, u_c = v_c/t) as (shift, log shifted sum), with
        # the shift computed exactly like sweep 2 computes u, so the arg-max column gives
        # u - shift = 0 exactly.
        u_m = b  # M / t exactly as sweep 2 computes the arg-max column
        sh = tl.maximum(u_m, u_y)
        sh = tl.where(sh == float("-inf"), 0.0, sh)
        ls = tl.log(s1 * tl.exp(u_m - sh) + tl.exp(u_y - sh))
        better = (a >= b) & (var > best_var)
        best_var = tl.where(better, var, best_var)
        best_t = tl.where(better, t, best_t)
        best_m = tl.where(better, sh, best_m)
        best_ls = tl.where(better, ls, best_ls)
        found = found | better
        default_m = tl.where(t == tau_max, sh, default_m)
        default_ls = tl.where(t == tau_max, ls, default_ls)
    return best_t, tl.where(found, best_m, default_m), tl.where(found, best_ls, default_ls)


@triton.jit
def _load_chunk(z_row, v_row, cols, mask, METHOD: tl.constexpr):
    """Student and teacher logits of one chunk as fp32, -inf outside ``mask`` (v = z for CE)."""
    z = tl.load(z_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
    if METHOD != 0:
        v = tl.load(v_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
    else:
        v = z
    return z, v


@triton.jit
def _stats_update(
    z, v, cols, y, in_row,
    mz, sz, zsum, ms, ss, mt, st, M, S1, S2,
    s, tau_tt, tau_to, cand_ptr,
    METHOD: tl.constexpr, HAS_TARGET: tl.constexpr, SMOOTH: tl.constexpr, REUSE_CE: tl.constexpr,
    S_UNIT: tl.constexpr, T_UNIT: tl.constexpr, NUM_CAND: tl.constexpr, CAND_P2: tl.constexpr,
):
    """Sweep 1 on one chunk: fold z, v ([BLOCK] fp32, -inf outside the row) into the row stats.

    (mz, sz, zsum): LSE(z) state and sum(z) for CE.  (ms, ss): LSE state of the student's
    KD logits w = z/s (non-target classes only for DKD).  (mt, st): LSE state of the teacher's
    u (non-target only for DKD).  (M, S1, S2): ISATS candidate sums.
    """
    is_y = cols == y  # never true for an ignored / out-of-range label or a missing target
    if HAS_TARGET:
        mz, sz = _lse_update(mz, sz, z)
        if SMOOTH:
            zsum += tl.sum(tl.where(in_row, z, 0.0), axis=0)
    if METHOD == 4:  # dkd: non-target classes at temperature T
        ms, ss = _lse_update(ms, ss, tl.where(is_y, float("-inf"), _div(z, s, S_UNIT)))
        mt, st = _lse_update(mt, st, tl.where(is_y, float("-inf"), _div(v, tau_to, T_UNIT)))
    elif METHOD != 0:
        if not REUSE_CE:
            ms, ss = _lse_update(ms, ss, _div(z, s, S_UNIT))
        if METHOD == 1:
            mt, st = _lse_update(mt, st, _div(v, tau_to, T_UNIT))
        elif METHOD == 2:
            mt, st = _lse_update(mt, st, _div(v, tl.where(is_y, tau_tt, tau_to), T_UNIT))
        else:  # isats
            M, S1, S2 = _isats_update(M, S1, S2, tl.where(is_y, float("-inf"), v), cand_ptr, NUM_CAND, CAND_P2)
    return mz, sz, zsum, ms, ss, mt, st, M, S1, S2


@triton.jit
def _terms_and_grad(
    z, v, cols, y, in_row, g_ptrs,
    mz, lsz, ms, lss, mt, lst, d, ce_scale, kd_scale, grad_nan,
    s, tau_tt, tau_to, alpha, beta, eps_c, eps, C,
    METHOD: tl.constexpr, REUSE_CE: tl.constexpr, S_UNIT: tl.constexpr, T_UNIT: tl.constexpr,
    CE_GRAD: tl.constexpr, KD_GRAD: tl.constexpr, WRITE_GRAD: tl.constexpr,
):
    """Sweep 2 on one chunk: the row's KL partial sum (NCKD for DKD) and the gradient chunk.

    Normalisers come as (shift m, log of the shifted sum ls) and log-probabilities are formed
    as ``(x - m) - ls``, like ``torch.log_softmax``: ``x - (m + ls)`` would round the
    normaliser at the logits' magnitude first (1e4-sized logits would lose ~1e-4 absolute).
    (mz, lsz): CE on z; (ms, lss): the student's w = z/s; (mt, lst): the teacher's u (both
    over the non-target classes for DKD). ``d = p^s_y - p^t_y`` (DKD only);
    ``ce_scale``/``kd_scale`` already hold the loss weights, the batchmean 1/count and 0 for
    skipped rows; ``grad_nan`` marks a bad label.
    """
    is_y = cols == y
    kl = 0.0
    g = tl.zeros_like(z)
    if METHOD != 0:
        if REUSE_CE:  # the same expression as CE's log-softmax below: one exp serves both
            lps = (z - ms) - lss
        else:
            lps = (_div(z, s, S_UNIT) - ms) - lss  # DKD: log phat^s (meaningful on c != y)
        if METHOD == 2 or METHOD == 3:    # ats / isats (isats: tau_to is the row's chosen tau_other)
            u = _div(v, tl.where(is_y, tau_tt, tau_to), T_UNIT)
        else:
            u = _div(v, tau_to, T_UNIT)
        lpt = (u - mt) - lst              # DKD: log phat^t
        pt = tl.exp(lpt)
        # 0 * log 0 = 0 (also where the student masks the same class); a NaN stays NaN.
        term = tl.where(pt == 0.0, 0.0, pt * (lpt - lps))
        if METHOD == 4:
            term = tl.where(is_y, 0.0, term)
        kl = tl.sum(tl.where(in_row, term, 0.0), axis=0)
        if KD_GRAD:
            ps = tl.exp(lps)
            if METHOD == 4:
                gk = tl.where(is_y, s * alpha * d, s * (beta * (ps - pt) - alpha * d * ps))
            else:
                gk = s * (ps - pt)
            g += kd_scale * gk
    if CE_GRAD:
        p = tl.exp((z - mz) - lsz)
        g += ce_scale * (p - tl.where(is_y, 1.0 - eps, 0.0) - eps_c)
    if WRITE_GRAD:
        g = tl.where(grad_nan, float("nan"), g)
        tl.store(g_ptrs, g.to(g_ptrs.dtype.element_ty), mask=in_row)
    return kl


@triton.jit
def _kd_fused_kernel(
    z_ptr,          # (N, C) student logits, fp32/bf16/fp16; row stride stride_zn, unit column stride
    stride_zn,      # elements between student rows
    v_ptr,          # (N, C) teacher logits (any float dtype; unused for METHOD == ce)
    stride_vn,      # elements between teacher rows
    y_ptr,          # (N,) integer labels (unused when HAS_TARGET is False)
    stride_y,       # elements between labels
    grad_ptr,       # (N, C) contiguous, student dtype: d(loss)/dz, written when WRITE_GRAD
    ce_ptr,         # (N,) fp32 out: per-row unweighted CE (0 for ignored rows / no target)
    kd_ptr,         # (N,) fp32 out: per-row unweighted KD term (0 for skipped rows)
    rows_ptr,       # (N,) fp32 out: ce_w * CE + kd_w * KD per row (the output for reduction none)
    loss_ptr,       # (1,) fp32 out: the reduced loss (REDUCE sum / batchmean)
    counter_ptr,    # (1,) int32 ticket counter; 0 before the launch, reset to 0 by the last program
    count_ptr,      # (1,) int64 number of non-ignored rows (COUNT_MODE == 2)
    cand_ptr,       # (NUM_CAND,) fp32 ISATS candidate temperatures, in the user's order
    N,              # rows
    C,              # classes
    ignore_index,   # label value that skips a row
    fixed_count,    # fp32 batchmean denominator when COUNT_MODE == 0 (N without labels)
    ce_w,           # CE weight in the row loss
    kd_w,           # KD weight in the row loss
    eps,            # label smoothing
    s,              # student temperature of the KD term (T for kd / dkd)
    tau_tt,         # teacher temperature on the label column (ATS / ISATS tau_target; T for kd / dkd)
    tau_to,         # teacher temperature elsewhere (T for kd / dkd, tau_other for ATS)
    tau_max,        # largest ISATS candidate (the fallback choice)
    alpha,          # DKD TCKD weight
    beta,           # DKD NCKD weight
    METHOD: tl.constexpr,       # 0 ce, 1 kd, 2 ats, 3 isats, 4 dkd
    HAS_TARGET: tl.constexpr,   # labels given: CE computed, label-dependent rows skipped
    SMOOTH: tl.constexpr,       # eps != 0
    REUSE_CE: tl.constexpr,     # the KD student logits are z itself (s == 1, not DKD, labels given)
    S_UNIT: tl.constexpr,       # s == 1: no division of z
    T_UNIT: tl.constexpr,       # tau_tt == tau_to == 1 (not ISATS): no division of v
    CE_GRAD: tl.constexpr,      # CE enters the gradient (labels given and ce_w != 0)
    KD_GRAD: tl.constexpr,      # the KD term enters the gradient (METHOD != ce and kd_w != 0)
    WRITE_GRAD: tl.constexpr,   # store the gradient at all
    REDUCE: tl.constexpr,       # 0 none, 1 sum, 2 batchmean
    COUNT_MODE: tl.constexpr,   # batchmean count: 0 fixed_count, 1 count labels here, 2 read count_ptr
    NUM_CAND: tl.constexpr,     # ISATS candidates (1 when unused)
    CAND_P2: tl.constexpr,      # next power of two >= NUM_CAND
    BLOCK: tl.constexpr,        # columns per chunk (the whole row when SINGLE)
    SINGLE: tl.constexpr,       # C <= BLOCK: one read, everything from registers
    PREFETCH: tl.constexpr,     # chunked path: load chunk k+1 into registers while computing chunk k
    BLOCK_N: tl.constexpr,      # chunk of labels / row losses for counting and the final sum
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_zn
    v_row = v_ptr + row * stride_vn
    g_row = grad_ptr + row * C
    NEG_INF: tl.constexpr = float("-inf")
    C_f = C.to(tl.float32)
    eps_c = tl.math.div_rn(eps, C_f)  # label smoothing mass per class

    # ---- the row's label and flags ------------------------------------------------------
    if HAS_TARGET:
        y = tl.load(y_ptr + row * stride_y).to(tl.int64)
        ignored = y == ignore_index
        bad = (y < 0) | (y >= C)
        bad = bad & (ignored == 0)          # out of range: this row becomes NaN, no OOB read
        y_safe = tl.where(bad | ignored, 0, y)
        z_y = tl.load(z_row + y_safe).to(tl.float32)
        row_on = ignored == 0
    else:
        y = tl.full((), -1, tl.int64)        # matches no column
        bad = False
        row_on = True
        z_y = 0.0
    if METHOD >= 2:
        v_y = tl.load(v_row + y_safe).to(tl.float32)
    else:
        v_y = 0.0

    # ---- batchmean denominator ----------------------------------------------------------
    if REDUCE == 2:
        if COUNT_MODE == 0:
            count = fixed_count
        elif COUNT_MODE == 1:
            n_valid = 0
            for start in range(0, N, BLOCK_N):
                idx = start + tl.arange(0, BLOCK_N)
                lab = tl.load(y_ptr + idx.to(tl.int64) * stride_y, mask=idx < N, other=0)
                # Mask explicitly: ``other=ignore_index`` wraps in a narrow label dtype (uint8:
                # -100 -> 156) and would count the lanes past N as valid rows.
                n_valid += tl.sum(((lab != ignore_index) & (idx < N)).to(tl.int32), axis=0)
            count = n_valid.to(tl.float32)
        else:
            count = tl.load(count_ptr).to(tl.float32)
        inv_count = tl.math.div_rn(1.0, tl.maximum(count, 1.0))
    else:
        inv_count = 1.0

    # ---- sweep 1: row statistics ---------------------------------------------------------
    mz = NEG_INF
    sz = 0.0
    zsum = 0.0
    ms = NEG_INF
    ss = 0.0
    mt = NEG_INF
    st = 0.0
    M = NEG_INF
    S1 = tl.zeros([CAND_P2], dtype=tl.float32)
    S2 = tl.zeros([CAND_P2], dtype=tl.float32)
    cols0 = tl.arange(0, BLOCK)
    if SINGLE:
        in_row = cols0 < C
        z, v = _load_chunk(z_row, v_row, cols0, in_row, METHOD)
        mz, sz, zsum, ms, ss, mt, st, M, S1, S2 = _stats_update(
            z, v, cols0, y, in_row, mz, sz, zsum, ms, ss, mt, st, M, S1, S2,
            s, tau_tt, tau_to, cand_ptr, METHOD, HAS_TARGET, SMOOTH, REUSE_CE, S_UNIT, T_UNIT, NUM_CAND, CAND_P2)
    else:
        n_chunks = tl.cdiv(C, BLOCK)
        if PREFETCH:
            z_nx, v_nx = _load_chunk(z_row, v_row, cols0, cols0 < C, METHOD)
        for k in range(0, n_chunks):
            cols = k * BLOCK + cols0
            in_row = cols < C
            if PREFETCH:  # issue chunk k+1's loads before the math on chunk k
                z, v = z_nx, v_nx
                nxt = cols + BLOCK
                z_nx, v_nx = _load_chunk(z_row, v_row, nxt, nxt < C, METHOD)
            else:
                z, v = _load_chunk(z_row, v_row, cols, in_row, METHOD)
            mz, sz, zsum, ms, ss, mt, st, M, S1, S2 = _stats_update(
                z, v, cols, y, in_row, mz, sz, zsum, ms, ss, mt, st, M, S1, S2,
                s, tau_tt, tau_to, cand_ptr, METHOD, HAS_TARGET, SMOOTH, REUSE_CE, S_UNIT, T_UNIT, NUM_CAND, CAND_P2)

    # ---- row scalars -----------------------------------------------------------------------
    # Normalisers as (shift, log shifted sum); see _terms_and_grad for why they stay split.
    ce = 0.0
    lsz = tl.log(sz)
    if HAS_TARGET:
        ce = (mz - z_y) + lsz
        if SMOOTH:
            ce = (1.0 - eps) * ce + eps * ((mz - tl.math.div_rn(zsum, C_f)) + lsz)
    if REUSE_CE:
        ms = mz
        ss = sz
    lss = tl.log(ss)                 # DKD: the student's non-target normaliser
    lst = tl.log(st)                 # DKD: the teacher's non-target normaliser
    row_to = tau_to
    d = 0.0
    kd_extra = 0.0
    if METHOD == 3:
        row_to, mt, lst = _isats_select(M, S1, S2, v_y, tau_tt, tau_max, C, cand_ptr, NUM_CAND, CAND_P2)
    if METHOD == 4:
        # TCKD from log-sum-exp forms: log p_y = x_y - LSE, log(1 - p_y) = LSE_nt - LSE.
        ws_y = _div(z_y, s, S_UNIT)
        ut_y = _div(v_y, tau_to, T_UNIT)
        ms_all, lss_all = _lse_merge(ms, lss, ws_y)
        mt_all, lst_all = _lse_merge(mt, lst, ut_y)
        lps_y = (ws_y - ms_all) - lss_all
        lps_n = (ms - ms_all) + (lss - lss_all)
        lpt_y = (ut_y - mt_all) - lst_all
        lpt_n = (mt - mt_all) + (lst - lst_all)
        pt_y = tl.exp(lpt_y)
        pt_n = tl.exp(lpt_n)
        tckd = tl.where(pt_y == 0.0, 0.0, pt_y * (lpt_y - lps_y)) + tl.where(pt_n == 0.0, 0.0, pt_n * (lpt_n - lps_n))
        d = tl.exp(lps_y) - pt_y
        kd_extra = alpha * tckd

    if HAS_TARGET:
        kd_on = row_on
    else:
        kd_on = True
    ce_scale = tl.where(row_on, ce_w * inv_count, 0.0)
    kd_scale = tl.where(kd_on, kd_w * inv_count, 0.0)

    # ---- sweep 2: loss terms with the final normalisers, gradient ------------------------
    if SINGLE:
        kl = _terms_and_grad(
            z, v, cols0, y, in_row, g_row + cols0, mz, lsz, ms, lss, mt, lst, d, ce_scale, kd_scale, bad,
            s, tau_tt, row_to, alpha, beta, eps_c, eps, C,
            METHOD, REUSE_CE, S_UNIT, T_UNIT, CE_GRAD, KD_GRAD, WRITE_GRAD)
    else:
        # Backwards: the chunks read last in sweep 1 are the likeliest to still be in L2.
        kl = 0.0
        if PREFETCH:
            last = (n_chunks - 1) * BLOCK + cols0
            z_nx, v_nx = _load_chunk(z_row, v_row, last, last < C, METHOD)
        for k in range(0, n_chunks):
            cols = (n_chunks - 1 - k) * BLOCK + cols0
            in_row = cols < C
            if PREFETCH:
                z, v = z_nx, v_nx
                nxt = cols - BLOCK
                z_nx, v_nx = _load_chunk(z_row, v_row, nxt, (nxt >= 0) & (nxt < C), METHOD)
            else:
                z, v = _load_chunk(z_row, v_row, cols, in_row, METHOD)
            kl += _terms_and_grad(
                z, v, cols, y, in_row, g_row + cols, mz, lsz, ms, lss, mt, lst, d, ce_scale, kd_scale, bad,
                s, tau_tt, row_to, alpha, beta, eps_c, eps, C,
                METHOD, REUSE_CE, S_UNIT, T_UNIT, CE_GRAD, KD_GRAD, WRITE_GRAD)

    # ---- per-row outputs -----------------------------------------------------------------
    kd = 0.0
    if METHOD == 4:
        kd = s * s * (kd_extra + beta * kl)
    elif METHOD != 0:
        kd = s * s * kl
    ce = tl.where(row_on, ce, 0.0)
    kd = tl.where(kd_on, kd, 0.0)
    ce = tl.where(bad, float("nan"), ce)
    kd = tl.where(bad, float("nan"), kd)
    # A zero weight drops its term entirely (0 * inf would otherwise be NaN).
    loss_row = tl.where(ce_w == 0.0, 0.0, ce_w * ce) + tl.where(kd_w == 0.0, 0.0, kd_w * kd)
    loss_row = tl.where(bad, float("nan"), loss_row)
    tl.store(ce_ptr + row, ce)
    tl.store(kd_ptr + row, kd)
    tl.store(rows_ptr + row, loss_row)

    # ---- in-launch deterministic reduction -----------------------------------------------
    if REDUCE != 0:
        tl.debug_barrier()  # every thread's row stores happen before the release below
        ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
        if ticket == N - 1:
            total = 0.0
            for start in range(0, N, BLOCK_N):
                idx = start + tl.arange(0, BLOCK_N)
                # .cg: read from L2, never a stale L1 line, the other programs' row losses.
                part = tl.load(rows_ptr + idx, mask=idx < N, other=0.0, cache_modifier=".cg")
                total += tl.sum(part, axis=0)
            if REDUCE == 2:
                total = tl.math.div_rn(total, tl.maximum(count, 1.0))
            tl.store(loss_ptr, total)
            tl.atomic_xchg(counter_ptr, 0)


@triton.jit
def _scale_grad_kernel(
    grad_ptr,     # (N, C) contiguous saved gradient, scaled in place
    go_ptr,       # grad_output: a scalar (stride_go = 0) or (N,) for reduction none
    stride_go,    # elements between grad_output entries (0 for a scalar)
    C,            # classes
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    go = tl.load(go_ptr + row * stride_go).to(tl.float32)
    if go != 1.0:  # decided on the device: grad_output == 1 costs no gradient traffic at all
        for start in range(0, C, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < C
            ptrs = grad_ptr + row * C + cols
            g = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
            tl.store(ptrs, (g * go).to(ptrs.dtype.element_ty), mask=mask)


# =============================================================================================
# Launcher
# =============================================================================================
@dataclass(frozen=True)
class Spec:
    """Everything about one fused call except the tensors."""

    method: str
    ce_weight: float
    kd_weight: float
    label_smoothing: float
    ignore_index: int
    reduction: str
    temperature: float = 1.0
    tau_target: float = 4.0
    tau_other: float = 2.0
    student_temperature: float = 1.0
    candidates: Optional[tuple] = None
    alpha: float = 1.0
    beta: float = 8.0


def override_blocks(max_single: Optional[int] = None, chunk: Optional[int] = None, warps: Optional[int] = None,
                    prefetch: Optional[bool] = None) -> None:
    """Force the single-block limit, or the chunked path's chunk width, warps per program and
    register prefetch (tests exercise the chunked path on small rows this way; benchmarks sweep
    them). ``None`` restores the default."""
    for key, val, lo in (("max_single", max_single, 16), ("chunk", chunk, 16), ("warps", warps, 1)):
        if val is None:
            _overrides.pop(key, None)
        elif val < lo or val & (val - 1):
            raise ValueError(f"{key} must be a power of two >= {lo}, got {val}")
        else:
            _overrides[key] = int(val)
    if prefetch is None:
        _overrides.pop("prefetch", None)
    else:
        _overrides["prefetch"] = bool(prefetch)


def config_for(C: int, method: str = "kd") -> tuple[int, bool, int]:
    """(BLOCK, SINGLE, num_warps) for a row of C classes."""
    # ISATS keeps 2 x NUM_CAND running sums and an unrolled candidate loop on top of the row:
    # at 8192 columns x 16 warps it would spill (checked by tests/ops' compile test).
    max_single = _overrides.get("max_single", MAX_SINGLE if method != "isats" else MAX_SINGLE // 2)
    if C <= max_single:
        block = max(16, triton.next_power_of_2(C))
        return block, True, 4 if block <= 1024 else 8 if block <= 4096 else 16
    block = _overrides.get("chunk", CHUNK)
    return block, False, _overrides.get("warps", CHUNK_WARPS if block == CHUNK else 4 if block <= 1024 else 8)


_counters: dict = {}
_candidate_tensors: dict = {}


def _candidates_tensor(candidates: tuple, device: torch.device) -> torch.Tensor:
    """The ISATS grid on the device, cached: no host-to-device copy per call (and none inside
    a CUDA-graph capture)."""
    key = (device, candidates)
    buf = _candidate_tensors.get(key)
    if buf is None:
        buf = torch.tensor(candidates, dtype=torch.float32, device=device)
        _candidate_tensors[key] = buf
    return buf


def _ticket_counter(device: torch.device) -> torch.Tensor:
    """A zeroed int32 counter per (device, stream); each launch leaves it at 0 again.

    Launches on one stream run one after another, so one counter per stream is race-free.
    """
    if device.type == "cuda":
        key = (device.index, torch.cuda.current_stream(device).cuda_stream)
    else:
        key = (device.type, None)
    buf = _counters.get(key)
    if buf is None:
        buf = torch.zeros(1, dtype=torch.int32, device=device)
        _counters[key] = buf
    return buf


def _launch(z: torch.Tensor, v: Optional[torch.Tensor], y: Optional[torch.Tensor], spec: Spec, write_grad: bool):
    N, C = z.shape
    dev = z.device
    method_id = METHOD_IDS[spec.method]
    reduce_id = REDUCE_IDS[spec.reduction]
    has_target = y is not None

    grad = torch.empty((N, C), dtype=z.dtype, device=dev) if write_grad else z.new_empty((1,))
    ce = torch.empty(N, dtype=torch.float32, device=dev)
    kd = torch.empty(N, dtype=torch.float32, device=dev)
    rows = torch.empty(N, dtype=torch.float32, device=dev)
    loss = torch.empty(1, dtype=torch.float32, device=dev)
    if N == 0:
        loss.zero_()
        return loss, rows, ce, kd, grad

    # ---- temperatures per method: student s, teacher on the label / elsewhere -----------
    if spec.method in ("kd", "dkd"):
        s = tau_tt = tau_to = float(spec.temperature)
    elif spec.method in ("ats", "isats"):
        s, tau_tt, tau_to = float(spec.student_temperature), float(spec.tau_target), float(spec.tau_other)
    else:
        s = tau_tt = tau_to = 1.0
    if spec.method == "isats":
        cands = _candidates_tensor(spec.candidates, dev)
        num_cand = len(spec.candidates)
        tau_max = float(max(spec.candidates))
    else:
        cands = loss  # placeholder pointer, never read
        num_cand = 1
        tau_max = 1.0

    # ---- batchmean count ---------------------------------------------------------------
    count_mode, fixed_count, count_buf = 0, 1.0, loss
    if reduce_id == 2:
        if not has_target:
            fixed_count = float(N)
        elif N <= COUNT_IN_KERNEL_MAX:
            count_mode = 1
        else:
            count_mode = 2
            count_buf = (y != spec.ignore_index).sum()

    block, single, warps = config_for(C, spec.method)
    _kd_fused_kernel[(N,)](
        z, z.stride(0),
        v if v is not None else z, v.stride(0) if v is not None else 0,
        y if has_target else z, y.stride(0) if has_target else 0,
        grad, ce, kd, rows, loss, _ticket_counter(dev), count_buf, cands,
        N, C, int(spec.ignore_index), fixed_count,
        float(spec.ce_weight), float(spec.kd_weight), float(spec.label_smoothing),
        s, tau_tt, tau_to, tau_max, float(spec.alpha), float(spec.beta),
        METHOD=method_id,
        HAS_TARGET=has_target,
        SMOOTH=spec.label_smoothing != 0,
        REUSE_CE=has_target and method_id in (1, 2, 3) and s == 1.0,
        S_UNIT=s == 1.0,
        T_UNIT=tau_tt == 1.0 and tau_to == 1.0 and method_id != 3,
        CE_GRAD=write_grad and has_target and spec.ce_weight != 0,
        KD_GRAD=write_grad and method_id != 0 and spec.kd_weight != 0,
        WRITE_GRAD=write_grad,
        REDUCE=reduce_id,
        COUNT_MODE=count_mode,
        NUM_CAND=num_cand,
        CAND_P2=max(2, triton.next_power_of_2(num_cand)),
        BLOCK=block,
        SINGLE=single,
        PREFETCH=_overrides.get("prefetch", PREFETCH),
        BLOCK_N=_BLOCK_N,
        num_warps=warps,
        # No FMA contraction. With it, the compiler contracted ``u - max`` differently in the
        # two sweeps (inside a select in one, not in the other), so sweep 2's log-probabilities
        # disagreed with sweep 1's normaliser by a product's rounding residual, which a
        # near-one-hot KL multiplies by the 1e4-sized logit gaps (seen on an H100: ATS at
        # +-1e4 logits off by 1e-4 relative). Without it the compiled kernel rounds exactly like
        # the interpreter that the CPU tests run; the kernel is memory-bound, so it costs nothing.
        enable_fp_fusion=False,
    )
    return loss, rows, ce, kd, grad


def _scale_grad_(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    N, C = grad.shape
    if N == 0:
        return
    go = grad_output.reshape(-1) if grad_output.dim() else grad_output.reshape(1)
    stride = go.stride(0) if go.numel() == N and grad_output.dim() else 0
    block = min(4096, max(16, triton.next_power_of_2(C)))
    _scale_grad_kernel[(N,)](grad, go, stride, C, BLOCK=block, num_warps=4 if block <= 1024 else 8)


# =============================================================================================
# Autograd
# =============================================================================================
class KDSoftmaxKLFunction(torch.autograd.Function):
    """loss, ce_rows, kd_rows = f(student, teacher, target, spec); gradient computed in forward."""

    @staticmethod
    def forward(ctx, student, teacher, target, spec: Spec):
        write_grad = bool(ctx.needs_input_grad[0])
        loss, rows, ce, kd, grad = _launch(student, teacher, target, spec, write_grad)
        ctx.mark_non_differentiable(ce, kd)
        ctx.spent = False
        if write_grad:
            ctx.save_for_backward(grad)
        out = rows if spec.reduction == "none" else loss.reshape(())
        return out, ce, kd

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        if ctx.spent:
            raise RuntimeError(
                "fastkd fused loss: backward ran twice through the same graph (retain_graph=True); "
                "the saved gradient is scaled in place by the first backward, so a second one is not supported"
            )
        if torch.is_grad_enabled():
            # create_graph=True: the saved gradient was computed in the forward kernel and has no
            # graph of its own, so a second derivative would silently be 0. Refuse instead.
            raise RuntimeError(
                "fastkd fused loss: higher-order gradients (create_graph=True) are not supported by the "
                "Triton backend; use backend='torch' for losses that need them"
            )
        ctx.spent = True
        (grad,) = ctx.saved_tensors
        _scale_grad_(grad, grad_loss)
        return grad, None, None, None


# =============================================================================================
# Public entry point (the contract in notes/CONTRACTS.md)
# =============================================================================================
def _check_spec(student, teacher, target, spec: Spec) -> None:
    if spec.method not in METHOD_IDS:
        raise ValueError(f"unknown method {spec.method!r} for the fused kernel; expected one of {', '.join(METHOD_IDS)}")
    if spec.reduction not in REDUCE_IDS:
        raise ValueError(f"unknown reduction {spec.reduction!r}; expected one of {', '.join(REDUCE_IDS)}")
    if student.dim() != 2:
        raise ValueError(f"student logits must be 2-D (N, C), got shape {tuple(student.shape)}")
    N, C = student.shape
    if C < 2:
        raise ValueError(f"student logits have {C} class(es); at least 2 are needed")
    if C > 262_144:
        raise ValueError(f"student logits have {C} classes; the fused kernel supports at most 262144")
    if spec.method == "ce":
        if target is None:
            raise ValueError("method 'ce' needs target labels")
    else:
        if teacher is None:
            raise ValueError(f"method {spec.method!r} needs teacher logits")
        if tuple(teacher.shape) != (N, C):
            raise ValueError(f"teacher logits shape {tuple(teacher.shape)} does not match student {(N, C)}")
        if teacher.device != student.device:
            raise ValueError(f"device mismatch: student on {student.device}, teacher on {teacher.device}")
    if target is None:
        if spec.method != "kd":
            raise ValueError(f"method {spec.method!r} needs target labels (only 'kd' runs without them)")
        if spec.ce_weight != 0:
            raise ValueError(f"ce_weight={spec.ce_weight} needs target labels; pass target or ce_weight=0")
    else:
        if target.dim() != 1 or target.shape[0] != N:
            raise ValueError(f"target must have shape ({N},), got {tuple(target.shape)}")
        if target.dtype.is_floating_point or target.dtype == torch.bool:
            raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}")
    if spec.method == "isats" and not spec.candidates:
        raise ValueError("method 'isats' needs a non-empty candidates tuple")


def _unit_columns(name: str, x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Rows may be strided freely; columns must be contiguous. Otherwise copy, and say so once."""
    if x is None or x.shape[-1] <= 1 or x.stride(-1) == 1:
        return x
    _compat.log_once(
        f"fastkd: fused KD kernel copies {name} (column stride {x.stride(-1)} != 1) to a contiguous "
        "tensor; numbers are unchanged, only speed and memory differ"
    )
    return x.contiguous()


def _reference_fallback(student, teacher, target, spec: Spec):
    """fp64 inputs: the kernels compute in fp32, so fp64 goes through the fp64 reference."""
    from ..losses import reference as ref

    _compat.log_once(
        "fastkd: backend 'triton' computes in fp32; float64 inputs use the float64 PyTorch reference "
        "instead (same numbers as backend 'torch', only speed differs)"
    )
    z = student
    if target is not None:
        ce = ref.cross_entropy(z, target, spec.label_smoothing, spec.ignore_index)
        valid = target != spec.ignore_index
    else:
        ce = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        valid = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
    m = spec.method
    if m == "ce":
        kd = torch.zeros_like(ce)
    elif m == "kd":
        kd = torch.where(valid, ref.kd(z, teacher, spec.temperature), torch.zeros_like(ce))
    elif m == "ats":
        kd = ref.ats(z, teacher, target, spec.tau_target, spec.tau_other, spec.student_temperature, spec.ignore_index)
    elif m == "isats":
        kd = ref.isats(z, teacher, target, spec.tau_target, spec.candidates, spec.student_temperature,
                       spec.ignore_index)
    else:
        kd = ref.dkd(z, teacher, target, spec.alpha, spec.beta, spec.temperature, spec.ignore_index)
    ce_part = ce * spec.ce_weight if spec.ce_weight else torch.zeros_like(ce)
    kd_part = kd * spec.kd_weight if spec.kd_weight else torch.zeros_like(kd)
    rows = ce_part + kd_part
    parts = {"ce": ce.detach(), "kd": kd.detach()}
    if spec.reduction == "none":
        return rows, parts
    total = rows.sum()
    if spec.reduction == "sum":
        return total, parts
    return total / valid.sum().clamp_min(1).to(total.dtype), parts


def fused_distill(student, teacher, target, *, method, ce_weight, kd_weight, label_smoothing, ignore_index,
                  reduction, temperature=1.0, tau_target=4.0, tau_other=2.0, student_temperature=1.0,
                  candidates=None, alpha=1.0, beta=8.0):
    """``ce_weight * CE + kd_weight * KD`` per row, reduced, with the gradient computed in the
    same launch (see the module docstring). Returns ``(loss, parts)``: ``loss`` fp32, a scalar
    or ``(N,)`` for ``reduction="none"``, differentiable w.r.t. ``student``; ``parts`` holds the
    detached per-row unweighted terms ``{"ce": (N,), "kd": (N,)}``.
    """
    if method == "isats" and candidates is None:
        from ..losses.reference import isats_default_candidates

        candidates = isats_default_candidates(tau_target)
    spec = Spec(method=method, ce_weight=float(ce_weight), kd_weight=float(kd_weight),
                label_smoothing=float(label_smoothing), ignore_index=int(ignore_index), reduction=reduction,
                temperature=float(temperature), tau_target=float(tau_target), tau_other=float(tau_other),
                student_temperature=float(student_temperature),
                candidates=tuple(float(c) for c in candidates) if candidates is not None else None,
                alpha=float(alpha), beta=float(beta))
    _check_spec(student, teacher, target, spec)
    if teacher is not None:
        teacher = teacher.detach()
    if student.dtype == torch.float64 or (teacher is not None and teacher.dtype == torch.float64):
        return _reference_fallback(student, teacher, target, spec)
    if not torch.is_grad_enabled():
        # Under no_grad, needs_input_grad still follows student.requires_grad: without this
        # the kernel would write an (N, C) gradient nobody can use (e.g. a loss logged under no_grad).
        student = student.detach()
    student = _unit_columns("student logits", student)
    teacher = _unit_columns("teacher logits", teacher)
    out, ce, kd = KDSoftmaxKLFunction.apply(student, teacher, target, spec)
    return out, {"ce": ce, "kd": kd}
