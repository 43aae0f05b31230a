"""Compile-time modes of the fused KD kernels: the kernels test these by name, never by number
(Liger-Kernel's ``_REDUCTION_MODE_BATCHMEAN`` habit); the launcher maps names to them."""
from __future__ import annotations

import triton
import triton.language as tl

METHOD_CE: tl.constexpr = tl.constexpr(0)
METHOD_KD: tl.constexpr = tl.constexpr(1)
METHOD_ATS: tl.constexpr = tl.constexpr(2)
METHOD_ISATS: tl.constexpr = tl.constexpr(3)
METHOD_DKD: tl.constexpr = tl.constexpr(4)
METHOD_JSD: tl.constexpr = tl.constexpr(5)       # generalised JSD (beta strictly inside (0, 1))
METHOD_RKL: tl.constexpr = tl.constexpr(6)       # reverse KL
REDUCE_NONE: tl.constexpr = tl.constexpr(0)
REDUCE_SUM: tl.constexpr = tl.constexpr(1)
REDUCE_BATCHMEAN: tl.constexpr = tl.constexpr(2)
COUNT_FIXED: tl.constexpr = tl.constexpr(0)      # batchmean denominator: the fixed_count argument
COUNT_IN_KERNEL: tl.constexpr = tl.constexpr(1)  # every program counts the labels
COUNT_FROM_BUFFER: tl.constexpr = tl.constexpr(2)  # read count_ptr (a device reduction)

# The kernels' boolean modes travel as the bits of one compile-time argument, FLAGS (pack_flags on
# the host); a kernel unpacks them into named constexprs with has_flag (a compile-time constant).
FLAG_HAS_TARGET: tl.constexpr = tl.constexpr(1)    # labels given: CE computed, label-dependent rows skipped
FLAG_SMOOTH: tl.constexpr = tl.constexpr(2)        # eps != 0
FLAG_REUSE_CE: tl.constexpr = tl.constexpr(4)      # the KD student logits are z itself (s == 1, not DKD, labels)
FLAG_S_UNIT: tl.constexpr = tl.constexpr(8)        # s == 1: no division of z
FLAG_T_UNIT: tl.constexpr = tl.constexpr(16)       # tau_tt == tau_to == 1 (not ISATS): no division of v
FLAG_CE_GRAD: tl.constexpr = tl.constexpr(32)      # CE enters the gradient (labels given and ce_w != 0)
FLAG_KD_GRAD: tl.constexpr = tl.constexpr(64)      # the KD term enters the gradient (not CE, kd_w != 0)
FLAG_WRITE_GRAD: tl.constexpr = tl.constexpr(128)  # store the gradient at all

METHOD_IDS = {"ce": METHOD_CE.value, "kd": METHOD_KD.value, "ats": METHOD_ATS.value,
              "isats": METHOD_ISATS.value, "dkd": METHOD_DKD.value}
METHOD_IDS.update(jsd=METHOD_JSD.value, rkl=METHOD_RKL.value)
REDUCE_IDS = {"none": REDUCE_NONE.value, "sum": REDUCE_SUM.value, "batchmean": REDUCE_BATCHMEAN.value}


# Named predicates over METHOD: the kernels test method families by these, never by the order of
# the ids. Each is a ``triton.constexpr_function``: a compile-time constant inside a kernel (the
# branch it guards is folded away), a plain bool on the host.
@triton.constexpr_function
def is_ats_family(method):
    """ATS and ISATS: the teacher's label column at tau_target, the others at tau_other."""
    return method in (METHOD_ATS.value, METHOD_ISATS.value)


@triton.constexpr_function
def reads_teacher_label(method):
    """The method needs the teacher's label logit v_y (ATS, ISATS, DKD)."""
    return method in (METHOD_ATS.value, METHOD_ISATS.value, METHOD_DKD.value)


@triton.constexpr_function
def is_row_sum_divergence(method):
    """JSD and reverse KL: the gradient holds a row sum over the final normalisers (one more sweep)."""
    return method in (METHOD_JSD.value, METHOD_RKL.value)


@triton.constexpr_function
def one_teacher_temperature(method):
    """KD, DKD, JSD, reverse KL: the teacher at one temperature T on every column."""
    return method in (METHOD_KD.value, METHOD_DKD.value, METHOD_JSD.value, METHOD_RKL.value)


def pack_flags(**flags: bool) -> int:
    """FLAGS for a kernel launch: ``pack_flags(HAS_TARGET=True, SMOOTH=False, ...)``, each name a
    ``FLAG_`` bit above."""
    return sum(globals()["FLAG_" + name].value for name, on in flags.items() if on)


@triton.constexpr_function
def has_flag(flags, bit):
    """Whether ``bit`` (a ``FLAG_`` constant) is set in ``flags``: a compile-time constant in a kernel."""
    return (flags & bit) != 0
