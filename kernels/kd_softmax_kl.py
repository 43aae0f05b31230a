"""Fused knowledge-distillation loss: one pass over raw logits, loss and gradient together.

Math (docs/methods.md; :mod:`fastkd.losses.reference` is the executable spec)
-----------------------------------------------------------------------------------------
Per row, with student logits ``z``, teacher logits ``v`` (C values each) and label ``y``:

* CE (label smoothing ``eps``): ``LSE(z) - (1-eps) z_y - eps mean(z)``;
  gradient ``sm(z) - (1-eps) e_y - eps/C``.
* ``kd``, ``ats``, ``isats``: the teacher target is ``q = sm(u)`` with ``u_c = v_c / tau_c``
  (``tau_c = T`` everywhere for ``kd``; ``tau_target`` on the label and ``tau_other``
  elsewhere for ATS; ISATS picks ``tau_other`` per row from a candidate grid, see
  :mod:`._isats`). The student uses one temperature ``s`` (``T`` for ``kd``):
  ``KD = s^2 sum_c q_c (log q_c - log sm(z/s)_c)``, gradient ``s (sm(z/s) - q)``.
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

Memory traffic (what makes this fast)
-------------------------------------
The loss is memory-bound: the minimum is one read of ``z``, one read of ``v`` and one write of
the gradient (3 units of ``N C`` elements; eager PyTorch KD + CE forward/backward moves ~15-20x
that). Every gradient entry needs the row's normalisers, known only after the whole row has
been seen. Three paths (:mod:`._launch` chooses; an explicit ``LaunchConfig`` forces one):

* ``single`` (``C <= 8192``, ISATS 4096): the row is loaded once into registers; statistics,
  loss terms and gradient come from the registers: exactly the minimal 3 units.
* ``chunked``: one program per row, two sweeps over column chunks: sweep 1 keeps online max/sum
  statistics, sweep 2 re-reads the chunks backwards (the last read are likeliest in L2) and
  writes the gradient. With all rows in flight larger than L2 (128256 bf16 classes: 513 KB per
  (z, v) row pair, hundreds of rows in flight) the re-read comes from DRAM: 5 units (measured
  on an H100: 55 % of copy bandwidth at 8192 x 128256).
* ``split`` (opt-in, ``LaunchConfig(split=True)``, until it has run compiled and been measured on
  a GPU; see :mod:`._launch`): the row is cut
  into ``S`` slices of one register block. Work items are *statistics* items (read a slice,
  store its partial max/sum statistics: a few floats; the row's last one merges the S partial
  states in a fixed order and publishes them) and *gradient* items (read the published
  statistics, re-read the slice, write its gradient and partial KL). Every logit is read twice,
  so DRAM traffic is the minimal 3 units only if the re-read hits L2. Two separate kernels
  cannot achieve that (all of phase 1 finishes before phase 2 starts, so at 8192 x 128256 the
  re-read misses as in the chunked path: 5 units; their only gain is N x S programs instead of
  N). So one launch interleaves them: programs take work items from an atomic ticket in order,
  and the statistics items of row ``r`` come about ``lag`` items (default 512 slices of 4096
  columns: 8 MB of bf16 z and v) before its gradient items, well inside an H100's 50 MB L2:
  about 3 units from DRAM plus 2 from L2. A gradient item spins until its row's statistics
  are published; the items it waits for hold lower tickets, so they are running or done (the
  decoupled look-back argument): no deadlock whatever the scheduler. Under the interpreter
  the items run in ticket order and never wait. The row's outputs are written by its last
  gradient item (fixed-order sum of the partial KLs): numbers do not depend on scheduling.

Besides the gradient there are only O(N) buffers (per-row CE, KD, weighted loss; the split
path adds O(N S) statistics). The scalar loss is reduced in the same launch, deterministically:
every row's loss is stored, then a ticket is taken from an atomic counter; the program that
draws the last ticket sums the N row losses in a fixed order. ``batchmean`` needs the count of
non-ignored rows before any gradient is written: for N <= ``COUNT_IN_KERNEL_MAX`` (single and
chunked paths) every program counts the labels itself (256 x 1000 is then a single launch);
otherwise one tiny PyTorch reduction on the device counts them (no host synchronisation).
Backward only scales the saved gradient by ``grad_output`` in place, and skips that on the
device when ``grad_output == 1`` (no host synchronisation, no gradient traffic).

Numerics. All arithmetic is fp32 whatever the input dtype (fp32, bf16, fp16); the gradient is
stored in the student's dtype; row offsets are 64-bit. Log-probabilities are formed like
``torch.log_softmax``, ``(x - max) - log(sum)``, never ``x - LSE``; a tempered logit that enters
a log-probability is an IEEE division (as PyTorch's ``x / T``), never a product with a rounded
reciprocal (ISATS's candidate sums use the reciprocal; :mod:`._isats` says why that is harmless);
the kernel is compiled without FMA contraction, so both sweeps round identically and the
compiled kernel rounds like the interpreter that runs the CPU tests. ``-inf`` logits are masked
classes with the ``0 * log 0 = 0`` convention; a label outside [0, C) (label check off) makes
its row NaN and is never used as an address. Inputs arrive validated by
:mod:`fastkd.losses.functional` (which also routes float64 to the PyTorch reference).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import _compat
from .._isats_grid import isats_default_candidates
from . import _launch as L
from ._launch import LaunchConfig
from ._modes import COUNT_FIXED, COUNT_FROM_BUFFER, COUNT_IN_KERNEL, METHOD_IDS, REDUCE_BATCHMEAN, REDUCE_IDS
from ._isats import cand_p2
from ._llm import _llm_row_sum
from ._modes import (FLAG_CE_GRAD, FLAG_HAS_TARGET, FLAG_KD_GRAD, FLAG_REUSE_CE, FLAG_S_UNIT, FLAG_SMOOTH, FLAG_T_UNIT,
                     FLAG_WRITE_GRAD, has_flag, is_row_sum_divergence, pack_flags)
from ._row import (_batch_count, _load_chunk, _reduce_rows, _row_label, _row_outputs, _row_scalars, _stats_init,
                   _stats_load, _stats_merge, _stats_store, _stats_update, _terms_and_grad, stats_record)

__all__ = ["fused_distill", "KDSoftmaxKLFunction", "LaunchConfig", "METHOD_IDS", "REDUCE_IDS"]

# =============================================================================================
# Triton kernels
# =============================================================================================
@triton.jit
def _kd_fused_kernel(
    z_ptr,          # (N, C) student logits, fp32/bf16/fp16; row stride stride_zn, unit column stride
    stride_zn,      # elements between student rows
    v_ptr,          # (N, C) teacher logits (any float dtype; unused for METHOD_CE)
    stride_vn,      # elements between teacher rows
    y_ptr,          # (N,) integer labels (unused when HAS_TARGET is False)
    stride_y,       # elements between labels
    grad_ptr,       # (N, C) contiguous, student dtype: d(loss)/dz, written when WRITE_GRAD
    ce_ptr,         # (N,) fp32 out: per-row unweighted CE (0 for ignored rows / no target)
    kd_ptr,         # (N,) fp32 out: per-row unweighted KD term (0 for skipped rows)
    rows_ptr,       # (N,) fp32 out: ce_w * CE + kd_w * KD per row (the output for reduction none)
    loss_ptr,       # (1,) fp32 out: the reduced loss (REDUCE_SUM / REDUCE_BATCHMEAN)
    counter_ptr,    # (1,) int32 ticket counter; 0 before the launch, reset to 0 by the last program
    count_ptr,      # (1,) int64 number of non-ignored rows (COUNT_FROM_BUFFER)
    cand_ptr,       # (NUM_CAND,) fp32 ISATS candidate temperatures, in the user's order
    N,              # rows
    C,              # classes
    ignore_index,   # label value that skips a row
    fixed_count,    # fp32 batchmean denominator for COUNT_FIXED (N without labels)
    ce_w,           # CE weight in the row loss
    kd_w,           # KD weight in the row loss
    eps,            # label smoothing
    s,              # student temperature of the KD term (T for kd / dkd)
    tau_tt,         # teacher temperature on the label column (ATS / ISATS tau_target; T for kd / dkd)
    tau_to,         # teacher temperature elsewhere (T for kd / dkd, tau_other for ATS)
    tau_max,        # largest ISATS candidate (the fallback choice)
    alpha,          # DKD TCKD weight
    beta,           # DKD NCKD weight
    METHOD: tl.constexpr,       # METHOD_CE / _KD / _ATS / _ISATS / _DKD / _JSD / _RKL
    FLAGS: tl.constexpr,        # the boolean modes (._modes' FLAG_ bits), unpacked below
    REDUCE: tl.constexpr,       # REDUCE_NONE / _SUM / _BATCHMEAN
    COUNT_MODE: tl.constexpr,   # COUNT_FIXED / _IN_KERNEL / _FROM_BUFFER
    NUM_CAND: tl.constexpr,     # ISATS candidates (1 when unused)
    BLOCK: tl.constexpr,        # columns per chunk (the whole row when SINGLE)
    SINGLE: tl.constexpr,       # C <= BLOCK: one read, everything from registers
    PREFETCH: tl.constexpr,     # chunked path: load chunk k+1 into registers while computing chunk k
    BLOCK_N: tl.constexpr,      # chunk of labels / row losses for counting and the final sum
):
    """One program per row: the single-block and the chunked (two-sweep) paths."""
    HAS_TARGET: tl.constexpr = has_flag(FLAGS, FLAG_HAS_TARGET)
    SMOOTH: tl.constexpr = has_flag(FLAGS, FLAG_SMOOTH)
    REUSE_CE: tl.constexpr = has_flag(FLAGS, FLAG_REUSE_CE)
    S_UNIT: tl.constexpr = has_flag(FLAGS, FLAG_S_UNIT)
    T_UNIT: tl.constexpr = has_flag(FLAGS, FLAG_T_UNIT)
    CE_GRAD: tl.constexpr = has_flag(FLAGS, FLAG_CE_GRAD)
    KD_GRAD: tl.constexpr = has_flag(FLAGS, FLAG_KD_GRAD)
    WRITE_GRAD: tl.constexpr = has_flag(FLAGS, FLAG_WRITE_GRAD)
    CAND_P2: tl.constexpr = cand_p2(NUM_CAND)  # width of the ISATS candidate vectors
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_zn
    v_row = v_ptr + row * stride_vn
    g_row = grad_ptr + row * C
    temps = (s, tau_tt, tau_to)
    y, bad, row_on, z_y, v_y = _row_label(z_row, v_row, y_ptr, row, stride_y, ignore_index, C, METHOD=METHOD,
                                          HAS_TARGET=HAS_TARGET)
    count = _batch_count(y_ptr, stride_y, count_ptr, N, ignore_index, fixed_count, REDUCE=REDUCE,
                         COUNT_MODE=COUNT_MODE, BLOCK_N=BLOCK_N)
    inv_count = tl.math.div_rn(1.0, count)

    # ---- sweep 1: row statistics ---------------------------------------------------------
    stats = _stats_init(CAND_P2)
    cols0 = tl.arange(0, BLOCK)
    if SINGLE:
        in_row = cols0 < C
        z, v = _load_chunk(z_row, v_row, cols0, in_row, METHOD)
        stats = _stats_update(z, v, cols0, y, in_row, C, stats, temps, cand_ptr, METHOD=METHOD, HAS_TARGET=HAS_TARGET,
                              SMOOTH=SMOOTH, REUSE_CE=REUSE_CE, S_UNIT=S_UNIT, T_UNIT=T_UNIT, NUM_CAND=NUM_CAND,
                              CAND_P2=CAND_P2)
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
            stats = _stats_update(z, v, cols, y, in_row, C, stats, temps, cand_ptr, METHOD=METHOD,
                                  HAS_TARGET=HAS_TARGET, SMOOTH=SMOOTH, REUSE_CE=REUSE_CE, S_UNIT=S_UNIT,
                                  T_UNIT=T_UNIT, NUM_CAND=NUM_CAND, CAND_P2=CAND_P2)

    ce, norms, row_to, d, kd_extra = _row_scalars(stats, z_y, v_y, C, eps, temps, tau_max, alpha, cand_ptr,
                                                  METHOD=METHOD, HAS_TARGET=HAS_TARGET, SMOOTH=SMOOTH,
                                                  REUSE_CE=REUSE_CE, S_UNIT=S_UNIT, T_UNIT=T_UNIT, NUM_CAND=NUM_CAND,
                                                  CAND_P2=CAND_P2)
    scales = (tl.where(row_on, ce_w * inv_count, 0.0), tl.where(row_on, kd_w * inv_count, 0.0), bad)
    temps2 = (s, tau_tt, row_to)
    if is_row_sum_divergence(METHOD):
        # Their gradient holds a row sum over the final normalisers (._llm): one more sweep first.
        if SINGLE:
            d = _llm_row_sum(z, v, in_row, norms, s, tau_to, beta, METHOD=METHOD, REUSE_CE=REUSE_CE, S_UNIT=S_UNIT,
                             T_UNIT=T_UNIT)
        else:
            rsum = 0.0
            for k in range(0, tl.cdiv(C, BLOCK)):
                cols = k * BLOCK + cols0
                z_k, v_k = _load_chunk(z_row, v_row, cols, cols < C, METHOD)
                rsum += _llm_row_sum(z_k, v_k, cols < C, norms, s, tau_to, beta, METHOD=METHOD, REUSE_CE=REUSE_CE,
                                     S_UNIT=S_UNIT, T_UNIT=T_UNIT)
            d = rsum
    coefs = (alpha, beta, eps, tl.math.div_rn(eps, C.to(tl.float32)), d)  # eps / C: smoothing mass per class

    # ---- sweep 2: loss terms with the final normalisers, gradient ------------------------
    if SINGLE:
        kl = _terms_and_grad(z, v, cols0, y, in_row, g_row + cols0, norms, scales, temps2, coefs, METHOD=METHOD,
                             REUSE_CE=REUSE_CE, S_UNIT=S_UNIT, T_UNIT=T_UNIT, CE_GRAD=CE_GRAD, KD_GRAD=KD_GRAD,
                             WRITE_GRAD=WRITE_GRAD)
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
            kl += _terms_and_grad(z, v, cols, y, in_row, g_row + cols, norms, scales, temps2, coefs, METHOD=METHOD,
                                  REUSE_CE=REUSE_CE, S_UNIT=S_UNIT, T_UNIT=T_UNIT, CE_GRAD=CE_GRAD,
                                  KD_GRAD=KD_GRAD, WRITE_GRAD=WRITE_GRAD)

    _row_outputs(row, ce, kl, kd_extra, s, beta, bad, row_on, ce_w, kd_w, ce_ptr, kd_ptr, rows_ptr, METHOD=METHOD,
                 HAS_TARGET=HAS_TARGET)
    _reduce_rows(rows_ptr, loss_ptr, counter_ptr, N, count, REDUCE=REDUCE, BLOCK_N=BLOCK_N)


@triton.jit
def _kd_split_kernel(
    z_ptr, stride_zn, v_ptr, stride_vn, y_ptr, stride_y,   # as _kd_fused_kernel
    grad_ptr, ce_ptr, kd_ptr, rows_ptr, loss_ptr,           # as _kd_fused_kernel
    sync_ptr,       # (2 + 2N,) int32, zero before the launch: [work ticket, loss ticket,
                    #   N statistics items done per row, N gradient items done per row]
    stats_ptr,      # (N, S + 1, stats_record(cand_p2(NUM_CAND))) fp32 scratch: each slice's statistics, then
                    #   the row's
    klp_ptr,        # (N, S) fp32 scratch: each slice's partial KL
    count_ptr, cand_ptr,                                    # as _kd_fused_kernel
    N, C, ignore_index, fixed_count, ce_w, kd_w, eps,       # as _kd_fused_kernel
    s, tau_tt, tau_to, tau_max, alpha, beta,                # as _kd_fused_kernel
    S,              # slices per row (BLOCK columns each)
    LAG,            # rows between a row's statistics items and its gradient items (<= N)
    METHOD: tl.constexpr, FLAGS: tl.constexpr, REDUCE: tl.constexpr, COUNT_MODE: tl.constexpr,
    NUM_CAND: tl.constexpr, BLOCK_N: tl.constexpr,          # as _kd_fused_kernel
    BLOCK: tl.constexpr,        # columns per slice (one register block)
    S_P2: tl.constexpr,         # next power of two >= S
):
    """The split-row path (module docstring): grid (N + LAG) * 2S; work step t holds the S
    statistics items of row t, then the S gradient items of row t - LAG."""
    HAS_TARGET: tl.constexpr = has_flag(FLAGS, FLAG_HAS_TARGET)  # the flags as in _kd_fused_kernel
    SMOOTH: tl.constexpr = has_flag(FLAGS, FLAG_SMOOTH)
    REUSE_CE: tl.constexpr = has_flag(FLAGS, FLAG_REUSE_CE)
    S_UNIT: tl.constexpr = has_flag(FLAGS, FLAG_S_UNIT)
    T_UNIT: tl.constexpr = has_flag(FLAGS, FLAG_T_UNIT)
    CE_GRAD: tl.constexpr = has_flag(FLAGS, FLAG_CE_GRAD)
    KD_GRAD: tl.constexpr = has_flag(FLAGS, FLAG_KD_GRAD)
    WRITE_GRAD: tl.constexpr = has_flag(FLAGS, FLAG_WRITE_GRAD)
    CAND_P2: tl.constexpr = cand_p2(NUM_CAND)  # width of the ISATS candidate vectors
    # The ticket, not program_id, orders the work: a ticket is taken only by a running program.
    w = tl.atomic_add(sync_ptr, 1)
    step = w // (2 * S)
    item = w % (2 * S)
    is_stats = item < S
    row = tl.where(is_stats, step, step - LAG).to(tl.int64)
    sl = tl.where(is_stats, item, item - S)
    KS: tl.constexpr = stats_record(CAND_P2)  # floats per slice's statistics
    if (row >= 0) & (row < N):
        z_row = z_ptr + row * stride_zn
        v_row = v_ptr + row * stride_vn
        temps = (s, tau_tt, tau_to)
        cols = sl * BLOCK + tl.arange(0, BLOCK)
        in_row = cols < C
        y, bad, row_on, z_y, v_y = _row_label(z_row, v_row, y_ptr, row, stride_y, ignore_index, C, METHOD=METHOD,
                                              HAS_TARGET=HAS_TARGET)
        z, v = _load_chunk(z_row, v_row, cols, in_row, METHOD)
        row_stats = stats_ptr + row * (S + 1) * KS  # S slices' statistics, then the merged row's
        if is_stats:
            stats = _stats_update(z, v, cols, y, in_row, C, _stats_init(CAND_P2), temps, cand_ptr, METHOD=METHOD,
                                  HAS_TARGET=HAS_TARGET, SMOOTH=SMOOTH, REUSE_CE=REUSE_CE, S_UNIT=S_UNIT,
                                  T_UNIT=T_UNIT, NUM_CAND=NUM_CAND, CAND_P2=CAND_P2)
            _stats_store(row_stats + sl * KS, stats, CAND_P2)
            tl.debug_barrier()  # every thread's stores happen before the release below
            if tl.atomic_add(sync_ptr + 2 + row, 1, sem="acq_rel") == S - 1:  # the row's last: merge, publish
                stats = _stats_merge(row_stats, S, cand_ptr, METHOD=METHOD, NUM_CAND=NUM_CAND, CAND_P2=CAND_P2,
                                     S_P2=S_P2)
                _stats_store(row_stats + S * KS, stats, CAND_P2)
                tl.debug_barrier()
                tl.atomic_add(sync_ptr + 2 + row, 1, sem="release")  # S + 1: the row's statistics are ready
        else:
            # Wait for the row's statistics (its statistics items hold lower tickets: running or done).
            done = tl.atomic_add(sync_ptr + 2 + row, 0, sem="acquire")
            while done <= S:
                done = tl.atomic_add(sync_ptr + 2 + row, 0, sem="acquire")
            tl.debug_barrier()
            stats = _stats_load(row_stats + S * KS, CAND_P2)
            count = _batch_count(y_ptr, stride_y, count_ptr, N, ignore_index, fixed_count, REDUCE=REDUCE,
                                 COUNT_MODE=COUNT_MODE, BLOCK_N=BLOCK_N)
            inv_count = tl.math.div_rn(1.0, count)
            ce, norms, row_to, d, kd_extra = _row_scalars(stats, z_y, v_y, C, eps, temps, tau_max, alpha, cand_ptr,
                                                          METHOD=METHOD, HAS_TARGET=HAS_TARGET, SMOOTH=SMOOTH,
                                                          REUSE_CE=REUSE_CE, S_UNIT=S_UNIT, T_UNIT=T_UNIT,
                                                          NUM_CAND=NUM_CAND, CAND_P2=CAND_P2)
            ce_scale = tl.where(row_on, ce_w * inv_count, 0.0)
            kd_scale = tl.where(row_on, kd_w * inv_count, 0.0)
            eps_c = tl.math.div_rn(eps, C.to(tl.float32))
            kl = _terms_and_grad(z, v, cols, y, in_row, grad_ptr + row * C + cols, norms,
                                 (ce_scale, kd_scale, bad), (s, tau_tt, row_to), (alpha, beta, eps, eps_c, d),
                                 METHOD=METHOD, REUSE_CE=REUSE_CE, S_UNIT=S_UNIT, T_UNIT=T_UNIT, CE_GRAD=CE_GRAD,
                                 KD_GRAD=KD_GRAD, WRITE_GRAD=WRITE_GRAD)
            tl.store(klp_ptr + row * S + sl, kl)
            tl.debug_barrier()
            if tl.atomic_add(sync_ptr + 2 + N + row, 1, sem="acq_rel") == S - 1:  # the row's last item
                k = tl.arange(0, S_P2)
                kl = tl.sum(tl.load(klp_ptr + row * S + k, mask=k < S, other=0.0, cache_modifier=".cg"), axis=0)
                _row_outputs(row, ce, kl, kd_extra, s, beta, bad, row_on, ce_w, kd_w, ce_ptr, kd_ptr, rows_ptr,
                             METHOD=METHOD, HAS_TARGET=HAS_TARGET)
                _reduce_rows(rows_ptr, loss_ptr, sync_ptr + 1, N, count, REDUCE=REDUCE, BLOCK_N=BLOCK_N)


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
    """Everything about one fused call except the tensors and the launch configuration."""

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


def _temperatures(spec: Spec) -> tuple:
    """(s, tau_tt, tau_to): the student temperature and the teacher's on the label / elsewhere."""
    if spec.method in ("kd", "dkd", "jsd", "rkl"):
        return (float(spec.temperature),) * 3
    if spec.method in ("ats", "isats"):
        return float(spec.student_temperature), float(spec.tau_target), float(spec.tau_other)
    return 1.0, 1.0, 1.0


def _compile_time(spec: Spec, N: int, C: int, has_target: bool, write_grad: bool,
                  config: Optional[LaunchConfig] = None) -> tuple:
    """(plan, constexprs): the launch plan of an (N, C) call and its kernel's compile-time
    arguments. The one mapping from a call to a kernel variant: the launcher and
    :mod:`._compile_check` (which compiles the variants without a GPU) both use it."""
    plan = L.plan(C, spec.method, config, N)
    if plan.path == "split" and spec.method in ("jsd", "rkl"):
        # The split path writes each slice's gradient from the row's statistics alone; these
        # divergences also need a row sum formed with them (._llm): the chunked path computes it.
        _compat.log_once("fastkd: the split-row path has no jsd / rkl variant; they use the chunked path "
                         "(numbers are unchanged, only speed differs)")
        plan = L.plan(C, spec.method, dataclasses.replace(config or LaunchConfig(), split=False), N)
    reduce_id = REDUCE_IDS[spec.reduction]
    count_mode = COUNT_FIXED.value
    if reduce_id == REDUCE_BATCHMEAN.value and has_target:
        in_kernel = N <= L.COUNT_IN_KERNEL_MAX and plan.path != "split"
        count_mode = COUNT_IN_KERNEL.value if in_kernel else COUNT_FROM_BUFFER.value
    s, tau_tt, tau_to = _temperatures(spec)
    num_cand = len(spec.candidates) if spec.method == "isats" else 1
    flags = pack_flags(
        HAS_TARGET=has_target, SMOOTH=spec.label_smoothing != 0,
        REUSE_CE=has_target and spec.method in ("kd", "ats", "isats", "jsd", "rkl") and s == 1.0,
        S_UNIT=s == 1.0, T_UNIT=tau_tt == 1.0 and tau_to == 1.0 and spec.method != "isats",
        CE_GRAD=write_grad and has_target and spec.ce_weight != 0,
        KD_GRAD=write_grad and spec.method != "ce" and spec.kd_weight != 0,
        WRITE_GRAD=write_grad,
    )
    modes = dict(METHOD=METHOD_IDS[spec.method], FLAGS=flags, REDUCE=reduce_id, COUNT_MODE=count_mode,
                 NUM_CAND=num_cand, BLOCK_N=L.BLOCK_N, BLOCK=plan.block)
    if plan.path == "split":
        modes.update(S_P2=triton.next_power_of_2(plan.slices))
    else:
        modes.update(SINGLE=plan.path == "single", PREFETCH=plan.prefetch)
    return plan, modes


def _launch(z: torch.Tensor, v: Optional[torch.Tensor], y: Optional[torch.Tensor], spec: Spec, write_grad: bool,
            config: Optional[LaunchConfig] = None):
    N, C = z.shape
    dev = z.device
    has_target = y is not None

    grad = torch.empty((N, C), dtype=z.dtype, device=dev) if write_grad else z.new_empty((1,))
    ce, kd, rows = (torch.empty(N, dtype=torch.float32, device=dev) for _ in range(3))
    loss = torch.empty(1, dtype=torch.float32, device=dev)
    if N == 0:
        loss.zero_()
        return loss, rows, ce, kd, grad

    plan, modes = _compile_time(spec, N, C, has_target, write_grad, config)
    s, tau_tt, tau_to = _temperatures(spec)
    cands, tau_max = loss, 1.0  # placeholder pointer, never read
    if spec.method == "isats":
        cands, tau_max = L.candidates_tensor(spec.candidates, dev), float(max(spec.candidates))
    # The batchmean denominator: N without labels; else counted in the kernel or read from a buffer.
    fixed_count = float(N) if spec.reduction == "batchmean" and not has_target else 1.0
    count_buf = (y != spec.ignore_index).sum() if modes["COUNT_MODE"] == COUNT_FROM_BUFFER.value else loss

    tensors = (z, z.stride(0), v if v is not None else z, v.stride(0) if v is not None else 0,
               y if has_target else z, y.stride(0) if has_target else 0, grad, ce, kd, rows, loss)
    scalars = (N, C, int(spec.ignore_index), fixed_count, float(spec.ce_weight), float(spec.kd_weight),
               float(spec.label_smoothing), s, tau_tt, tau_to, tau_max, float(spec.alpha), float(spec.beta))
    # No FMA contraction. With it, the compiler contracted ``u - max`` differently in the two
    # sweeps, so sweep 2's log-probabilities disagreed with sweep 1's normaliser by a product's
    # rounding residual, which a near-one-hot KL multiplies by 1e4-sized logit gaps (seen on an
    # H100: ATS at +-1e4 logits off by 1e-4 relative). Without it the compiled kernel rounds like
    # the interpreter; the kernel is memory-bound, so it costs nothing.
    options = dict(num_warps=plan.warps, enable_fp_fusion=False)
    if plan.path == "split":
        S, lag = plan.slices, plan.lag_rows
        sync = torch.zeros(2 + 2 * N, dtype=torch.int32, device=dev)
        stats = torch.empty(N * (S + 1) * stats_record(cand_p2(modes["NUM_CAND"])), dtype=torch.float32, device=dev)
        klp = torch.empty(N * S, dtype=torch.float32, device=dev)
        _kd_split_kernel[((N + lag) * 2 * S,)](*tensors, sync, stats, klp, count_buf, cands, *scalars, S, lag,
                                                   **modes, **options)
    else:
        _kd_fused_kernel[(N,)](*tensors, L.ticket_counter(dev), count_buf, cands, *scalars, **modes, **options)
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
    """loss, ce_rows, kd_rows = f(student, teacher, target, spec, config); gradient computed in forward."""

    @staticmethod
    def forward(ctx, student, teacher, target, spec: Spec, config: Optional[LaunchConfig] = None):
        write_grad = bool(ctx.needs_input_grad[0])
        loss, rows, ce, kd, grad = _launch(student, teacher, target, spec, write_grad, config)
        ctx.mark_non_differentiable(ce, kd)
        ctx.spent = False
        if write_grad:
            ctx.save_for_backward(grad)
        out = rows if spec.reduction == "none" else loss.reshape(())
        return out, ce, kd

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
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
        return grad, None, None, None, None


class StandardizedKDFunction(torch.autograd.Function):
    """As :class:`KDSoftmaxKLFunction` with logit standardisation (:mod:`._standardize`): the KD
    term on the z-scored rows, CE on the raw student rows, the gradient through the z-score."""

    @staticmethod
    def forward(ctx, student, teacher, target, spec: Spec, config: Optional[LaunchConfig] = None):
        from . import _standardize as Z

        write_grad = bool(ctx.needs_input_grad[0])
        zs, sd = Z.zscore(student)
        zt, _ = Z.zscore(teacher)
        kd_spec = replace(spec, ce_weight=0.0)
        loss, rows, _, kd, g = _launch(zs, zt, target, kd_spec, write_grad, config)
        ce_spec = replace(spec, method="ce", kd_weight=0.0, temperature=1.0)
        has_ce = target is not None and spec.ce_weight != 0
        if target is not None:
            # CE on the raw rows (fp32, so CE and KD gradients add before the one rounding to the input dtype).
            loss_ce, rows_ce, ce, _, g_ce = _launch(student.float() if write_grad else student, None, target,
                                                    ce_spec, write_grad and has_ce, config)
            loss, rows = loss + loss_ce, rows + rows_ce
        else:
            ce, g_ce = torch.zeros_like(kd), None
        ctx.mark_non_differentiable(ce, kd)
        ctx.spent = False
        if write_grad:
            grad = Z.zscore_grad(g, zs, sd, g_ce if has_ce else None, target, spec.ignore_index, student.dtype)
            ctx.save_for_backward(grad)
        out = rows if spec.reduction == "none" else loss.reshape(())
        return out, ce, kd

    backward = KDSoftmaxKLFunction.backward


# =============================================================================================
# Public entry point (the contract in notes/CONTRACTS.md)
# =============================================================================================
def _unit_columns(name: str, x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Rows may be strided freely; columns must be contiguous. Otherwise copy, and say so once."""
    if x is None or x.shape[-1] <= 1 or x.stride(-1) == 1:
        return x
    _compat.log_once(
        f"fastkd: fused KD kernel copies {name} (column stride {x.stride(-1)} != 1) to a contiguous "
        "tensor; numbers are unchanged, only speed and memory differ"
    )
    return x.contiguous()


def fused_distill(student, teacher, target, *, method, ce_weight, kd_weight, label_smoothing, ignore_index,
                  reduction, temperature=1.0, tau_target=4.0, tau_other=2.0, student_temperature=1.0,
                  candidates=None, alpha=1.0, beta=8.0, config: Optional[LaunchConfig] = None, standardize=False):
    """``ce_weight * CE + kd_weight * KD`` per row, reduced, with the gradient computed in the
    same launch (see the module docstring). Returns ``(loss, parts)``: ``loss`` fp32, a scalar
    or ``(N,)`` for ``reduction="none"``, differentiable w.r.t. ``student``; ``parts`` holds the
    detached per-row unweighted terms ``{"ce": (N,), "kd": (N,)}``.

    Inputs arrive validated (:mod:`fastkd.losses.functional`): 2-D fp32/bf16/fp16 logits, the
    teacher except for ``ce``, the labels except for ``kd``. ``config`` forces a launch
    configuration (:class:`LaunchConfig`; ``None``: the shipped defaults). ``standardize=True``
    (kd, ats, dkd) z-scores both rows before the KD term (:mod:`._standardize`).
    """
    if standardize and method not in ("kd", "ats", "dkd"):
        raise ValueError(f"logit standardisation applies to kd, ats and dkd, not {method!r}")
    if standardize and student.shape[-1] < 2:
        raise ValueError(f"logit standardisation needs at least 2 classes (the unbiased std over classes), "
                         f"got {student.shape[-1]}")
    if student.dtype == torch.float64 or (teacher is not None and teacher.dtype == torch.float64):
        raise TypeError("fused_distill computes in fp32: float64 logits go to the PyTorch reference "
                        "(fastkd.losses.functional routes them there), not to the fused kernel")
    if method == "jsd" and float(beta) in (0.0, 1.0):
        # Liger's end points (docs/methods.md §12): beta 0 is the forward KL, i.e. kd; beta 1 the reverse KL.
        method = "kd" if float(beta) == 0.0 else "rkl"
    if method == "isats" and candidates is None:
        candidates = isats_default_candidates(tau_target)
    spec = Spec(method=method, ce_weight=float(ce_weight), kd_weight=float(kd_weight),
                label_smoothing=float(label_smoothing), ignore_index=int(ignore_index), reduction=reduction,
                temperature=float(temperature), tau_target=float(tau_target), tau_other=float(tau_other),
                student_temperature=float(student_temperature),
                candidates=tuple(float(c) for c in candidates) if candidates is not None else None,
                alpha=float(alpha), beta=float(beta))
    if teacher is not None:
        teacher = teacher.detach()
    if not torch.is_grad_enabled():
        # Under no_grad, needs_input_grad still follows student.requires_grad: without this
        # the kernel would write an (N, C) gradient nobody can use (e.g. a loss logged under no_grad).
        student = student.detach()
    student = _unit_columns("student logits", student)
    teacher = _unit_columns("teacher logits", teacher)
    fn = StandardizedKDFunction if standardize else KDSoftmaxKLFunction
    out, ce, kd = fn.apply(student, teacher, target, spec, config)
    return out, {"ce": ce, "kd": kd}
