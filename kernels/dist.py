"""DIST (Huang et al. 2022) on the ``triton`` backend: deliberately the PyTorch formula.

Why no fused kernel: DIST's intra-class term correlates *columns* over the whole batch, so no
row's gradient can be written before statistics of every row are known. A fused version needs
a row pass (softmax normalisers and row correlations), a column-statistics pass (means, norms
and cross terms of both softmaxes over the batch, a cross-row reduction) and a gradient pass
that still needs a per-row dot product through the softmax Jacobian before it can write: three
dependent sweeps over N x C and two launches at least, against the one read of the row-local
kernel. DIST is used at the ImageNet shape (256 x 1000), where the whole loss is a few
microseconds of work and launch latency dominates either way, so the gain would be small for
a lot of kernel code. :func:`fused_dist` therefore evaluates the reference formula with
PyTorch autograd in fp32 and says so once in the log: the numbers are the reference's.
"""
from __future__ import annotations

from .. import _compat


def fused_dist(student, teacher, *, beta, gamma, temperature):
    """DIST loss (scalar, differentiable w.r.t. ``student``), computed with PyTorch in fp32."""
    from ..losses import reference as ref

    _compat.log_once(
        "fastkd: DIST has no fused Triton kernel (its intra-class term needs whole-batch column "
        "statistics); backend 'triton' computes it with the PyTorch reference in fp32"
    )
    return ref.dist(student, teacher.detach(), float(beta), float(gamma), float(temperature))
