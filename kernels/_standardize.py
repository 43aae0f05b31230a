"""Logit standardisation on the fused path (Sun et al. 2024; docs/methods.md §11).

Each row of student logits ``z`` and teacher logits ``v`` is z-scored before the method:
``Z(x) = (x - mean(x)) / (std(x) + 1e-7)`` with the unbiased (C - 1) std over the C classes; the CE
term keeps the raw student logits. The fused KD kernel itself is unchanged: around it run

1. :func:`_zscore_kernel` (one program per row): the row statistics, mean then the sum of squared
   deviations (two sweeps over the row; one load when the row fits one block), and the z-scored row
   in fp32, for the student and for the teacher;
2. the fused KD kernel on the z-scored rows (KD term only; its gradient is w.r.t. ``Z(z)``) and,
   when CE has a weight, the fused kernel's CE on the raw rows;
3. :func:`_zscore_grad_kernel` (one program per row): the gradient through the z-score,
   ``dz = (g - mean(g)) / (sd + eps) - Z * sum(g Z) / ((C - 1) sd)`` (``g`` = the KD gradient
   w.r.t. ``Z(z)``, ``sd`` the row's std), plus the CE gradient, written once in the student's dtype.
   Rows whose label is ``ignore_index`` get no KD gradient; a constant row (std 0) has Z = 0 and its
   std term is taken as 0 (the reference's autograd gives NaN there: the std is not differentiable at 0).

So a standardised call is 3 to 5 launches and reads each row a few more times than the unfused
methods; numbers match :func:`fastkd.losses.reference.standardize` to fp32 rounding.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

STANDARDIZE_EPS = 1e-7
MAX_BLOCK = 4096


@triton.jit
def _zscore_kernel(x_ptr, stride_x, out_ptr, sd_ptr, C, eps, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr):
    """Row ``pid`` of x -> (x - mean) / (sd + eps) in fp32 at out (contiguous (N, C)); sd at sd_ptr."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    o_row = out_ptr + row * C
    n = C.to(tl.float32)
    if ONE_BLOCK:
        cols = tl.arange(0, BLOCK)
        mask = cols < C
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.math.div_rn(tl.sum(x, axis=0), n)
        dev = tl.where(mask, x - mean, 0.0)
        sd = tl.sqrt_rn(tl.math.div_rn(tl.sum(dev * dev, axis=0), n - 1.0))
        tl.store(o_row + cols, tl.math.div_rn(dev, sd + eps), mask=mask)
    else:
        acc = 0.0
        for start in range(0, C, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            acc += tl.sum(tl.load(x_row + cols, mask=cols < C, other=0.0).to(tl.float32), axis=0)
        mean = tl.math.div_rn(acc, n)
        sq = 0.0
        for start in range(0, C, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < C
            dev = tl.where(mask, tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32) - mean, 0.0)
            sq += tl.sum(dev * dev, axis=0)
        sd = tl.sqrt_rn(tl.math.div_rn(sq, n - 1.0))
        for start in range(0, C, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < C
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(o_row + cols, tl.math.div_rn(x - mean, sd + eps), mask=mask)
    tl.store(sd_ptr + row, sd)


@triton.jit
def _zscore_grad_kernel(g_ptr, zs_ptr, sd_ptr, ce_ptr, y_ptr, stride_y, out_ptr, C, eps, ignore_index,
                        HAS_TARGET: tl.constexpr, HAS_CE: tl.constexpr, BLOCK: tl.constexpr,
                        ONE_BLOCK: tl.constexpr):
    """out = (g - mean(g)) / (sd + eps) - Z sum(g Z) / ((C - 1) sd) [+ ce] for row ``pid``; g, Z, ce are
    contiguous (N, C) fp32; rows labelled ``ignore_index`` take the CE part only."""
    row = tl.program_id(0).to(tl.int64)
    g_row, z_row, o_row, c_row = g_ptr + row * C, zs_ptr + row * C, out_ptr + row * C, ce_ptr + row * C
    n = C.to(tl.float32)
    sd = tl.load(sd_ptr + row)
    # A constant row (sd = 0, e.g. a padding row) has Z = 0: the std term is 0 * (0 / 0); take it as 0.
    sd_div = tl.where(sd > 0.0, sd, 1.0)
    on = True
    if HAS_TARGET:
        on = tl.load(y_ptr + row * stride_y).to(tl.int64) != ignore_index
    if ONE_BLOCK:
        cols = tl.arange(0, BLOCK)
        mask = cols < C
        g = tl.load(g_row + cols, mask=mask, other=0.0)
        zs = tl.load(z_row + cols, mask=mask, other=0.0)
        gm = tl.math.div_rn(tl.sum(g, axis=0), n)
        gz = tl.sum(g * zs, axis=0)
        d = tl.math.div_rn(g - gm, sd + eps) - zs * tl.math.div_rn(gz, (n - 1.0) * sd_div)
        d = tl.where(on, d, 0.0)
        if HAS_CE:
            d += tl.load(c_row + cols, mask=mask, other=0.0)
        tl.store(o_row + cols, d.to(o_row.dtype.element_ty), mask=mask)
    else:
        gs = 0.0
        gz = 0.0
        for start in range(0, C, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < C
            g = tl.load(g_row + cols, mask=mask, other=0.0)
            gs += tl.sum(g, axis=0)
            gz += tl.sum(g * tl.load(z_row + cols, mask=mask, other=0.0), axis=0)
        gm = tl.math.div_rn(gs, n)
        for start in range(0, C, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < C
            g = tl.load(g_row + cols, mask=mask, other=0.0)
            zs = tl.load(z_row + cols, mask=mask, other=0.0)
            d = tl.math.div_rn(g - gm, sd + eps) - zs * tl.math.div_rn(gz, (n - 1.0) * sd_div)
            d = tl.where(on, d, 0.0)
            if HAS_CE:
                d += tl.load(c_row + cols, mask=mask, other=0.0)
            tl.store(o_row + cols, d.to(o_row.dtype.element_ty), mask=mask)


def _block(C: int) -> tuple[int, bool]:
    b = max(16, triton.next_power_of_2(C))
    return (b, True) if b <= MAX_BLOCK else (MAX_BLOCK, False)


def zscore(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Z(x) fp32 (N, C) contiguous, sd (N,) fp32)`` for 2-D ``x`` with contiguous columns."""
    N, C = x.shape
    out = torch.empty((N, C), dtype=torch.float32, device=x.device)
    sd = torch.empty(N, dtype=torch.float32, device=x.device)
    if N:
        block, one = _block(C)
        _zscore_kernel[(N,)](x, x.stride(0), out, sd, C, STANDARDIZE_EPS, BLOCK=block, ONE_BLOCK=one,
                             num_warps=4 if block <= 1024 else 8)
    return out, sd


def zscore_grad(g: torch.Tensor, zs: torch.Tensor, sd: torch.Tensor, ce_grad: Optional[torch.Tensor],
                y: Optional[torch.Tensor], ignore_index: int, dtype: torch.dtype) -> torch.Tensor:
    """The gradient w.r.t. the raw student logits (see the module docstring), in ``dtype``."""
    N, C = g.shape
    out = torch.empty((N, C), dtype=dtype, device=g.device)
    if N:
        block, one = _block(C)
        _zscore_grad_kernel[(N,)](g, zs, sd, ce_grad if ce_grad is not None else g, y if y is not None else sd,
                                  y.stride(0) if y is not None else 0, out, C, STANDARDIZE_EPS, int(ignore_index),
                                  HAS_TARGET=y is not None, HAS_CE=ce_grad is not None, BLOCK=block, ONE_BLOCK=one,
                                  num_warps=4 if block <= 1024 else 8)
    return out
