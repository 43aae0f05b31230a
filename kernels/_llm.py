"""``@triton.jit`` row math of the language-model divergences: reverse KL and the generalised
Jensen-Shannon divergence (Liger-Kernel's ``beta``). :mod:`.kd_softmax_kl` composes them with
the shared row statistics (the student's and the teacher's log-normalisers at temperature T,
exactly as for ``kd``).

With ``q = sm(z/T)`` (student), ``p = sm(v/T)`` (teacher), ``m = beta p + (1 - beta) q``:

* ``rkl``: ``KL(q || p) = sum_c q_c a_c`` with ``a_c = log q_c - log p_c``; gradient w.r.t. z
  (of ``T^2 KL``): ``T q_c (a_c - KL)``.
* ``jsd`` (``0 < beta < 1``; the launcher sends beta 0 to ``kd`` and beta 1 to ``rkl``):
  ``beta KL(p || m) + (1 - beta) KL(q || m)``; with ``a_c = log q_c - log m_c`` the gradient is
  ``T (1 - beta) q_c (a_c - KL(q || m))``.

Both gradients hold a row sum, ``D = sum_c q_c a_c``, known only after a sweep over the whole
row with the final normalisers: the kernel computes it first (:func:`_llm_row_sum`), then
writes the gradient (:func:`_llm_grad`). ``log m`` is a log-sum-exp of the two weighted
log-probabilities (never the log of a rounded sum of probabilities), and every ``0 log 0`` is 0
without forming ``-inf - -inf``.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._math import _div
from ._modes import METHOD_JSD


@triton.jit
def _llm_logs(z, v, norms, s, tau_to, REUSE_CE: tl.constexpr, S_UNIT: tl.constexpr, T_UNIT: tl.constexpr):
    """(log q, log p) of one chunk, the same expressions as the KD terms (identical rounding)."""
    mz, lsz, ms, lss, mt, lst = norms
    if REUSE_CE:
        lps = (z - ms) - lss
    else:
        lps = (_div(z, s, S_UNIT) - ms) - lss
    lpt = (_div(v, tau_to, T_UNIT) - mt) - lst
    return lps, lpt


@triton.jit
def _llm_parts(lps, lpt, beta, METHOD: tl.constexpr):
    """Per class: (loss term, q, a) with the row's loss ``sum term`` and gradient row sum
    ``sum q a`` (see the module docstring); 0 wherever the weighting probability is 0."""
    q = tl.exp(lps)
    q_absent = q == 0.0
    if METHOD == METHOD_JSD:
        p = tl.exp(lpt)
        la = lpt + tl.log(beta)
        lc = lps + tl.log(1.0 - beta)
        mx = tl.maximum(la, lc)
        both = mx == float("-inf")  # p = q = 0: log m = -inf, formed without -inf - -inf
        mx0 = tl.where(both, 0.0, mx)
        la0 = tl.where(both, 0.0, la)
        lc0 = tl.where(both, 0.0, lc)
        lm = tl.where(both, float("-inf"), mx0 + tl.log(tl.exp(la0 - mx0) + tl.exp(lc0 - mx0)))
        a = tl.where(q_absent, 0.0, lps) - tl.where(q_absent, 0.0, lm)
        p_absent = p == 0.0
        ap = tl.where(p_absent, 0.0, lpt) - tl.where(p_absent, 0.0, lm)
        term = beta * (p * ap) + (1.0 - beta) * (q * a)
    else:  # METHOD_RKL
        a = tl.where(q_absent, 0.0, lps) - tl.where(q_absent, 0.0, lpt)
        term = q * a
    return term, q, a


@triton.jit
def _llm_row_sum(z, v, in_row, norms, s, tau_to, beta, METHOD: tl.constexpr, REUSE_CE: tl.constexpr,
                 S_UNIT: tl.constexpr, T_UNIT: tl.constexpr):
    """One chunk's part of the gradient's row sum ``D = sum_c q_c a_c``."""
    lps, lpt = _llm_logs(z, v, norms, s, tau_to, REUSE_CE=REUSE_CE, S_UNIT=S_UNIT, T_UNIT=T_UNIT)
    term, q, a = _llm_parts(lps, lpt, beta, METHOD=METHOD)
    return tl.sum(tl.where(in_row, q * a, 0.0), axis=0)


@triton.jit
def _llm_kl_and_grad(lps, lpt, in_row, s, beta, rsum, METHOD: tl.constexpr):
    """(the chunk's loss sum, the chunk's gradient of ``T^2 x divergence``) given the row sum
    ``rsum`` (see :func:`_llm_row_sum`)."""
    term, q, a = _llm_parts(lps, lpt, beta, METHOD=METHOD)
    kl = tl.sum(tl.where(in_row, term, 0.0), axis=0)
    # An infinite row (reverse KL: student mass on a class the teacher masks) has the reference's
    # gradient pattern, -inf where q > 0 and a is finite, NaN elsewhere, formed without inf - inf.
    rinf = rsum == float("inf")
    g = s * (q * (a - tl.where(rinf, 0.0, rsum)))
    g = tl.where(rinf, tl.where((q == 0.0) | (a == float("inf")), float("nan"), float("-inf")), g)
    if METHOD == METHOD_JSD:
        g = (1.0 - beta) * g
    return kl, g
