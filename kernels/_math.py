"""Small ``@triton.jit`` helpers of the fused KD kernels: online log-sum-exp, IEEE division,
register-vector indexing. Every function works on fp32 values; ``-inf`` means "absent"."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _lse_update(m, s, x):
    """Online log-sum-exp: fold chunk ``x`` ([BLOCK], -inf = absent) into running (max, sum)."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    # A running max of -inf (nothing seen yet, or all masked) would give exp(-inf - -inf) = NaN.
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    s_new = s * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref), axis=0)
    return m_new, s_new


@triton.jit
def _lse_reduce(m, s):
    """Combine a vector of partial (max, shifted sum) states (-inf, 0 = empty) into one."""
    m_all = tl.max(m, axis=0)
    m_ref = tl.where(m_all == float("-inf"), 0.0, m_all)
    return m_all, tl.sum(s * tl.exp(m - m_ref), axis=0)


@triton.jit
def _lse_merge(m, ls, x):
    """Fold one more logit ``x`` into a normaliser held as (max m, log of the shifted sum ls)."""
    m_new = tl.maximum(m, x)
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, tl.log(tl.exp(m - m_ref + ls) + tl.exp(x - m_ref))


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
def _pick(vec, i, IDX):
    """Element ``i`` of a small register vector ``vec`` (``IDX`` = its arange)."""
    return tl.sum(tl.where(IDX == i, vec, 0.0), axis=0)


@triton.jit
def _log_or_zero(x, USED: tl.constexpr):
    """``log(x)`` where the caller uses it, else 0: an unused empty sum is never logged (the
    interpreter evaluates ``log(0)`` eagerly and warns)."""
    if USED:
        out = tl.log(x)
    else:
        out = 0.0
    return out
