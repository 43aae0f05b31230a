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
