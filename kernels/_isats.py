"""ISATS inside the fused pass (``@triton.jit`` helpers of :mod:`.kd_softmax_kl`).

For a candidate ``t``, ``max_{c != y} v_c / t`` equals ``(max_{c != y} v_c) / t``, so one running
wrong-class maximum ``M`` serves every candidate, and ``S1(t) = sum_{c != y} exp((v_c - M)/t)``,
``S2(t) = sum_{c != y} exp(2 (v_c - M)/t)`` are carried as ``[CAND_P2]`` register vectors
(rescaled when ``M`` grows). From them: the wrong-class mean and variance of ``q`` for every
candidate, the selection (ties -> first candidate; no candidate keeps the label on top -> the
largest, exactly :func:`fastkd.losses.reference.isats_select_tau`), and the chosen candidate's
teacher normaliser ``LSE(u) = logaddexp(v_y/tau_target, M/t + log S1(t))`` without another pass.

Rounding: the exponents here are ``(v - M) * (1/t)``, a product with the rounded reciprocal, not
an IEEE division: an exponent's relative error is then ~2 ulp, so a term's relative error is
~2 ulp x |exponent|, which matters only for terms ``exp(-|x|)`` too small to move the sums.
Wherever a tempered logit enters a log-probability (the teacher's ``u``, the thresholds
``v_y / tau_target`` and ``M / t``) it is divided exactly, as in the rest of the kernel.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._math import _pick


@triton.constexpr_function
def cand_p2(num_cand):
    """Width of the per-candidate vectors: the next power of two >= ``num_cand``, at least 2
    (the launcher and the kernels, where it is a compile-time constant, both derive it here)."""
    return max(2, 1 << (num_cand - 1).bit_length())


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
def _isats_reduce(M, S1, S2, cand_ptr, NUM_CAND: tl.constexpr, CAND_P2: tl.constexpr):
    """Combine partial states (M: [K], S1, S2: [K, CAND_P2]; -inf, 0 = empty) into one
    (the split-row path's per-slice statistics)."""
    ci = tl.arange(0, CAND_P2)
    inv_t = 1.0 / tl.load(cand_ptr + ci, mask=ci < NUM_CAND, other=1.0)
    M_all = tl.max(M, axis=0)
    M_ref = tl.where(M_all == float("-inf"), 0.0, M_all)
    r = tl.exp((M[:, None] - M_ref) * inv_t[None, :])
    return M_all, tl.sum(S1 * r, axis=0), tl.sum(S2 * (r * r), axis=0)


@triton.jit
def _isats_select(M, S1, S2, v_y, tau_tt, tau_max, C, cand_ptr, NUM_CAND: tl.constexpr, CAND_P2: tl.constexpr):
    """Per-row ISATS choice -> (tau_other, teacher normaliser as (shift, log shifted sum)).

    Maximises the population variance of q's C-1 wrong-class probabilities subject to
    ``v_y / tau_t >= M / t``; ties keep the first candidate; if no candidate qualifies the
    largest one (``tau_max``) is used. Mirrors :func:`reference.isats_select_tau`.
    """
    ci = tl.arange(0, CAND_P2)
    a = tl.math.div_rn(v_y, tau_tt)  # u_y, exactly as the gradient pass computes the label column
    n_wrong = (C - 1).to(tl.float32)
    best_var = -float("inf")
    best_t = tau_max
    best_m = 0.0
    best_ls = 0.0
    found = False
    default_m = 0.0
    default_ls = 0.0
    for i in tl.static_range(NUM_CAND):
        t = tl.load(cand_ptr + i)
        b = tl.math.div_rn(M, t)  # M / t, exactly as the gradient pass computes the arg-max column
        s1 = _pick(S1, i, ci)
        s2 = _pick(S2, i, ci)
        # Shift by max(a, b): one of exp(a - mt), exp(b - mt) is 1, so Z >= 1 (no overflow).
        mt = tl.maximum(a, b)
        mt = tl.where(mt == float("-inf"), 0.0, mt)
        r = tl.exp(b - mt)
        z = tl.exp(a - mt) + s1 * r
        # var = r^2 ((C-1) S2 - S1^2) / ((C-1) Z)^2. In this form the degenerate ties (C = 2, or
        # all wrong-class logits equal: every exp term is exactly 1) give exactly 0 for every
        # candidate, as in the fp64 reference, so the tie rule picks the same candidate.
        var = (r * r) * (n_wrong * s2 - s1 * s1) / ((n_wrong * z) * (n_wrong * z))
        # Normaliser of u as (shift, log shifted sum), the shift computed like the gradient
        # pass computes u, so the arg-max column gives u - shift = 0 exactly.
        sh = tl.maximum(b, a)
        sh = tl.where(sh == float("-inf"), 0.0, sh)
        ls = tl.log(s1 * tl.exp(b - sh) + tl.exp(a - sh))
        better = (a >= b) & (var > best_var)
        best_var = tl.where(better, var, best_var)
        best_t = tl.where(better, t, best_t)
        best_m = tl.where(better, sh, best_m)
        best_ls = tl.where(better, ls, best_ls)
        found = found | better
        default_m = tl.where(t == tau_max, sh, default_m)
        default_ls = tl.where(t == tau_max, ls, default_ls)
    return best_t, tl.where(found, best_m, default_m), tl.where(found, best_ls, default_ls)
