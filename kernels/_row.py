"""Per-row building blocks of the fused KD kernels (``@triton.jit``): load a chunk, fold it into
the row statistics, turn statistics into normalisers and CE / TCKD, compute a chunk's KL terms
and gradient, store the row's outputs and reduce the batch. :mod:`.kd_softmax_kl` composes them
into its kernels; the math is in that module's docstring."""
from __future__ import annotations

import triton
import triton.language as tl

from ._isats import _isats_reduce, _isats_select, _isats_update
from ._math import _div, _log_or_zero, _lse_merge, _lse_reduce, _lse_update
from ._modes import (COUNT_FIXED, COUNT_IN_KERNEL, METHOD_ATS, METHOD_CE, METHOD_DKD, METHOD_ISATS,
                     REDUCE_BATCHMEAN, REDUCE_NONE)
from ._llm import _llm_kl_and_grad
from ._modes import is_ats_family, is_row_sum_divergence, one_teacher_temperature, reads_teacher_label


@triton.jit
def _load_chunk(z_row, v_row, cols, mask, METHOD: tl.constexpr):
    """Student and teacher logits of one chunk as fp32, -inf outside ``mask`` (v = z for CE)."""
    z = tl.load(z_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
    if METHOD != METHOD_CE:
        v = tl.load(v_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
    else:
        v = z
    return z, v


@triton.jit
def _stats_init(CAND_P2: tl.constexpr):
    """Empty row statistics: (mz, sz, zmean, ms, ss, mt, st, M, S1, S2), see _stats_update."""
    NEG_INF: tl.constexpr = float("-inf")
    S = tl.zeros([CAND_P2], dtype=tl.float32)
    return NEG_INF, 0.0, 0.0, NEG_INF, 0.0, NEG_INF, 0.0, NEG_INF, S, S


@triton.jit
def _stats_update(z, v, cols, y, in_row, C, stats, temps, cand_ptr, METHOD: tl.constexpr, HAS_TARGET: tl.constexpr,
                  SMOOTH: tl.constexpr, REUSE_CE: tl.constexpr, S_UNIT: tl.constexpr, T_UNIT: tl.constexpr,
                  NUM_CAND: tl.constexpr, CAND_P2: tl.constexpr):
    """Fold one chunk (z, v: [BLOCK] fp32, -inf outside the row) into the row statistics.

    (mz, sz, zmean): LSE(z) state and mean(z) for CE, the mean as a sum of z/C (its partial sums
    never exceed max|z|: rows near fp32's maximum do not overflow; as the reference).  (ms, ss): LSE state of the student's
    KD logits w = z/s (non-target classes only for DKD).  (mt, st): LSE state of the teacher's
    u (non-target only for DKD).  (M, S1, S2): ISATS candidate sums.  temps = (s, tau_tt, tau_to).
    """
    mz, sz, zmean, ms, ss, mt, st, M, S1, S2 = stats
    s, tau_tt, tau_to = temps
    is_y = cols == y  # never true for an ignored / out-of-range label or a missing target
    if HAS_TARGET:
        mz, sz = _lse_update(mz, sz, z)
        if SMOOTH:
            zmean += tl.sum(tl.where(in_row, tl.math.div_rn(z, C.to(tl.float32)), 0.0), axis=0)
    if METHOD == METHOD_DKD:  # non-target classes at temperature T
        ms, ss = _lse_update(ms, ss, tl.where(is_y, float("-inf"), _div(z, s, S_UNIT)))
        mt, st = _lse_update(mt, st, tl.where(is_y, float("-inf"), _div(v, tau_to, T_UNIT)))
    elif METHOD != METHOD_CE:
        if not REUSE_CE:
            ms, ss = _lse_update(ms, ss, _div(z, s, S_UNIT))
        if one_teacher_temperature(METHOD):
            mt, st = _lse_update(mt, st, _div(v, tau_to, T_UNIT))
        elif METHOD == METHOD_ATS:
            mt, st = _lse_update(mt, st, _div(v, tl.where(is_y, tau_tt, tau_to), T_UNIT))
        else:
            M, S1, S2 = _isats_update(M, S1, S2, tl.where(is_y, float("-inf"), v), cand_ptr, NUM_CAND=NUM_CAND,
                                       CAND_P2=CAND_P2)
    return mz, sz, zmean, ms, ss, mt, st, M, S1, S2


@triton.jit
def _terms_and_grad(z, v, cols, y, in_row, g_ptrs, norms, scales, temps, coefs, METHOD: tl.constexpr, REUSE_CE: tl.constexpr, S_UNIT: tl.constexpr,
                    T_UNIT: tl.constexpr, CE_GRAD: tl.constexpr, KD_GRAD: tl.constexpr, WRITE_GRAD: tl.constexpr):
    """The row's KL partial sum over one chunk (NCKD for DKD) and the chunk's gradient.

    ``norms`` = (mz, lsz, ms, lss, mt, lst): normalisers as (shift, log shifted sum) of CE's z,
    the student's w = z/s and the teacher's u (both non-target only for DKD); log-probabilities
    are ``(x - m) - ls`` like ``torch.log_softmax`` (``x - (m + ls)`` would round the normaliser
    at the logits' magnitude). scales = (ce_scale, kd_scale, grad_nan): the weights times the
    batchmean 1/count (0 for skipped rows), and the bad-label flag; temps = (s, tau_tt, the
    row's tau_other); coefs = (alpha, beta, eps, eps / C, d = p^s_y - p^t_y for DKD).
    """
    mz, lsz, ms, lss, mt, lst = norms
    ce_scale, kd_scale, grad_nan = scales
    s, tau_tt, tau_to = temps
    alpha, beta, eps, eps_c, d = coefs
    is_y = cols == y
    kl = 0.0
    g = tl.zeros_like(z)
    if METHOD != METHOD_CE:
        if REUSE_CE:  # the same expression as CE's log-softmax below: one exp serves both
            lps = (z - ms) - lss
        else:
            lps = (_div(z, s, S_UNIT) - ms) - lss  # DKD: log phat^s (meaningful on c != y)
        if is_ats_family(METHOD):
            u = _div(v, tl.where(is_y, tau_tt, tau_to), T_UNIT)
        else:
            u = _div(v, tau_to, T_UNIT)
        lpt = (u - mt) - lst  # DKD: log phat^t
        pt = tl.exp(lpt)
        # 0 * log 0 = 0 (also where the student masks the same class; a NaN stays NaN). Both
        # logs are zeroed where pt == 0 *before* subtracting, so -inf - -inf is never formed.
        absent = pt == 0.0
        term = pt * (tl.where(absent, 0.0, lpt) - tl.where(absent, 0.0, lps))
        if METHOD == METHOD_DKD:
            term = tl.where(is_y, 0.0, term)
        kl = tl.sum(tl.where(in_row, term, 0.0), axis=0)
        if is_row_sum_divergence(METHOD):  # d: the row sum of the gradient (._llm)
            kl, g_llm = _llm_kl_and_grad(lps, lpt, in_row, s, beta, d, METHOD=METHOD)
        if KD_GRAD:
            ps = tl.exp(lps)
            if is_row_sum_divergence(METHOD):
                gk = g_llm
            elif METHOD == METHOD_DKD:
                gk = tl.where(is_y, s * alpha * d, s * (beta * (ps - pt) - alpha * d * ps))
            else:
                gk = s * (ps - pt)
            # A row that does not count (scale 0) gets exactly 0, whatever it holds (0 * NaN = NaN).
            g += tl.where(kd_scale == 0.0, 0.0, kd_scale * gk)
    if CE_GRAD:
        p = tl.exp((z - mz) - lsz)
        g += tl.where(ce_scale == 0.0, 0.0, ce_scale * (p - tl.where(is_y, 1.0 - eps, 0.0) - eps_c))
    if WRITE_GRAD:
        g = tl.where(grad_nan, float("nan"), g)
        tl.store(g_ptrs, g.to(g_ptrs.dtype.element_ty), mask=in_row)
    return kl


@triton.jit
def _row_label(z_row, v_row, y_ptr, row, stride_y, ignore_index, C, METHOD: tl.constexpr,
               HAS_TARGET: tl.constexpr):
    """(y, bad, row_on, z_y, v_y): the label (-1 = none), out-of-range flag, row counted, label logits."""
    if HAS_TARGET:
        y = tl.load(y_ptr + row * stride_y).to(tl.int64)
        ignored = y == ignore_index
        bad = ((y < 0) | (y >= C)) & (ignored == 0)  # out of range: the row becomes NaN, no OOB read
        y_safe = tl.where(bad | ignored, 0, y)
        z_y = tl.load(z_row + y_safe).to(tl.float32)
        row_on = ignored == 0
    else:
        y = tl.full((), -1, tl.int64)  # matches no column
        bad = False
        row_on = True
        z_y = 0.0
    if reads_teacher_label(METHOD):
        v_y = tl.load(v_row + y_safe).to(tl.float32)
    else:
        v_y = 0.0
    return y, bad, row_on, z_y, v_y


@triton.jit
def _batch_count(y_ptr, stride_y, count_ptr, N, ignore_index, fixed_count, REDUCE: tl.constexpr,
                 COUNT_MODE: tl.constexpr, BLOCK_N: tl.constexpr):
    """The batchmean denominator (rows not ignored), fp32 (1.0 for the other reductions)."""
    count = 1.0
    if REDUCE == REDUCE_BATCHMEAN:
        if COUNT_MODE == COUNT_FIXED:
            count = fixed_count
        elif COUNT_MODE == COUNT_IN_KERNEL:
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
    return tl.maximum(count, 1.0)


@triton.jit
def _row_scalars(stats, z_y, v_y, C, eps, temps, tau_max, alpha, cand_ptr, METHOD: tl.constexpr,
                 HAS_TARGET: tl.constexpr, SMOOTH: tl.constexpr, REUSE_CE: tl.constexpr, S_UNIT: tl.constexpr,
                 T_UNIT: tl.constexpr, NUM_CAND: tl.constexpr, CAND_P2: tl.constexpr):
    """From the row statistics: (ce, norms, row_to, d, kd_extra). ``norms`` as _terms_and_grad
    takes them; row_to: the row's tau_other (ISATS: the chosen candidate); d and kd_extra =
    alpha * TCKD for DKD."""
    mz, sz, zmean, ms, ss, mt, st, M, S1, S2 = stats
    s, tau_tt, tau_to = temps
    ce = 0.0
    lsz = _log_or_zero(sz, HAS_TARGET)
    if HAS_TARGET:
        ce = (mz - z_y) + lsz
        if SMOOTH:
            ce = (1.0 - eps) * ce + eps * ((mz - zmean) + lsz)
    if REUSE_CE:
        ms = mz
        ss = sz
    lss = _log_or_zero(ss, METHOD != METHOD_CE)  # DKD: the student's non-target normaliser
    lst = _log_or_zero(st, METHOD != METHOD_CE and METHOD != METHOD_ISATS)  # DKD: non-target
    row_to = tau_to
    d = 0.0
    kd_extra = 0.0
    if METHOD == METHOD_ISATS:
        row_to, mt, lst = _isats_select(M, S1, S2, v_y, tau_tt, tau_max, C, cand_ptr, NUM_CAND=NUM_CAND,
                                         CAND_P2=CAND_P2)
    if METHOD == METHOD_DKD:
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
    return ce, (mz, lsz, ms, lss, mt, lst), row_to, d, kd_extra


@triton.jit
def _row_outputs(row, ce, kl, kd_extra, s, beta, bad, row_on, ce_w, kd_w, ce_ptr, kd_ptr, rows_ptr,
                 METHOD: tl.constexpr, HAS_TARGET: tl.constexpr):
    """Store the row's unweighted CE and KD and its weighted loss."""
    kd = 0.0
    if METHOD == METHOD_DKD:
        kd = s * s * (kd_extra + beta * kl)
    elif METHOD != METHOD_CE:
        kd = s * s * kl
    ce = tl.where(bad, float("nan"), tl.where(row_on, ce, 0.0))
    if HAS_TARGET:  # without labels every row is on
        kd = tl.where(row_on, kd, 0.0)
    kd = tl.where(bad, float("nan"), kd)
    # A zero weight drops its term entirely (0 * inf would otherwise be NaN).
    loss_row = tl.where(ce_w == 0.0, 0.0, ce_w * ce) + tl.where(kd_w == 0.0, 0.0, kd_w * kd)
    tl.store(ce_ptr + row, ce)
    tl.store(kd_ptr + row, kd)
    tl.store(rows_ptr + row, tl.where(bad, float("nan"), loss_row))


@triton.jit
def _reduce_rows(rows_ptr, loss_ptr, counter_ptr, N, count, REDUCE: tl.constexpr, BLOCK_N: tl.constexpr):
    """After this program's row store: the program drawing the last ticket sums the N row losses
    in a fixed order (deterministic) and resets the counter."""
    if REDUCE != REDUCE_NONE:
        tl.debug_barrier()  # every thread's row stores happen before the release below
        ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
        if ticket == N - 1:
            total = 0.0
            for start in range(0, N, BLOCK_N):
                idx = start + tl.arange(0, BLOCK_N)
                # .cg: read from L2, never a stale L1 line, the other programs' row losses.
                total += tl.sum(tl.load(rows_ptr + idx, mask=idx < N, other=0.0, cache_modifier=".cg"), axis=0)
            if REDUCE == REDUCE_BATCHMEAN:
                total = tl.math.div_rn(total, count)
            tl.store(loss_ptr, total)
            tl.atomic_xchg(counter_ptr, 0)



STATS_SCALARS: tl.constexpr = tl.constexpr(8)  # a statistics record: (mz, sz, zmean, ms, ss, mt, st, M), S1, S2


@triton.constexpr_function
def stats_record(cand_p2):
    """Floats in one statistics record (the split path's scratch layout): the ``STATS_SCALARS``
    scalars, then S1 and S2 (``cand_p2`` each). The launcher sizes the scratch with it, the
    kernels address the records with it (a compile-time constant inside a kernel)."""
    return STATS_SCALARS.value + 2 * cand_p2


@triton.jit
def _stats_store(p, stats, CAND_P2: tl.constexpr):
    """Store row statistics at ``p``: the record of :func:`stats_record`."""
    mz, sz, zmean, ms, ss, mt, st, M, S1, S2 = stats
    tl.store(p, mz)
    tl.store(p + 1, sz)
    tl.store(p + 2, zmean)
    tl.store(p + 3, ms)
    tl.store(p + 4, ss)
    tl.store(p + 5, mt)
    tl.store(p + 6, st)
    tl.store(p + 7, M)
    ci = tl.arange(0, CAND_P2)
    tl.store(p + STATS_SCALARS + ci, S1)
    tl.store(p + STATS_SCALARS + CAND_P2 + ci, S2)


@triton.jit
def _stats_load(p, CAND_P2: tl.constexpr):
    """Row statistics stored by another program at ``p`` (read from L2, never a stale L1 line)."""
    ci = tl.arange(0, CAND_P2)
    return (tl.load(p, cache_modifier=".cg"), tl.load(p + 1, cache_modifier=".cg"),
            tl.load(p + 2, cache_modifier=".cg"), tl.load(p + 3, cache_modifier=".cg"),
            tl.load(p + 4, cache_modifier=".cg"), tl.load(p + 5, cache_modifier=".cg"),
            tl.load(p + 6, cache_modifier=".cg"), tl.load(p + 7, cache_modifier=".cg"),
            tl.load(p + STATS_SCALARS + ci, cache_modifier=".cg"),
            tl.load(p + STATS_SCALARS + CAND_P2 + ci, cache_modifier=".cg"))


@triton.jit
def _stats_merge(p, S, cand_ptr, METHOD: tl.constexpr, NUM_CAND: tl.constexpr, CAND_P2: tl.constexpr,
                 S_P2: tl.constexpr):
    """Merge the S slices' statistics stored at ``p`` (S records of :func:`stats_record` floats)
    in one vectorised, fixed-order reduction (deterministic)."""
    KS: tl.constexpr = stats_record(CAND_P2)
    k = tl.arange(0, S_P2)
    on = k < S
    q = p + k * KS
    NEG_INF: tl.constexpr = float("-inf")
    mz, sz = _lse_reduce(tl.load(q, on, NEG_INF, cache_modifier=".cg"), tl.load(q + 1, on, 0.0, cache_modifier=".cg"))
    zmean = tl.sum(tl.load(q + 2, on, 0.0, cache_modifier=".cg"), axis=0)
    ms, ss = _lse_reduce(tl.load(q + 3, on, NEG_INF, cache_modifier=".cg"),
                         tl.load(q + 4, on, 0.0, cache_modifier=".cg"))
    mt, st = _lse_reduce(tl.load(q + 5, on, NEG_INF, cache_modifier=".cg"),
                         tl.load(q + 6, on, 0.0, cache_modifier=".cg"))
    M, S1, S2 = _stats_init(CAND_P2)[7:]
    if METHOD == METHOD_ISATS:
        ci = tl.arange(0, CAND_P2)
        q2 = q[:, None] + STATS_SCALARS + ci[None, :]
        M, S1, S2 = _isats_reduce(tl.load(q + 7, on, NEG_INF, cache_modifier=".cg"),
                                  tl.load(q2, on[:, None], 0.0, cache_modifier=".cg"),
                                  tl.load(q2 + CAND_P2, on[:, None], 0.0, cache_modifier=".cg"),
                                  cand_ptr, NUM_CAND=NUM_CAND, CAND_P2=CAND_P2)
    return mz, sz, zmean, ms, ss, mt, st, M, S1, S2
