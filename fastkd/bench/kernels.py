"""``fastkd bench kernels``: the fused KD kernel against what a competent PyTorch user runs.

Every row times one forward + backward of ``ce_weight * CE + kd_weight * KD`` (vanilla KD by
default; ``--method`` ats, isats, dkd or dist, or several comma-separated) on ``N x C`` logits, with
``triton.testing.do_bench`` (CUDA events, L2 flushed between runs, median). Rows:

* ``fastkd``: :func:`fastkd.kernels.fused_distill` (loss and gradient in one launch); for DIST,
  which has no fused kernel, fastkd's fp32 PyTorch formula (``DistillLoss(backend="triton")``);
* ``eager``: a plain fp32 implementation as a competent user writes it (the softmax family in
  fp32, as ``torch.autocast`` runs it): for KD ``kl_div(log_softmax(z/T), log_softmax(v/T),
  log_target=True) * T^2`` plus ``cross_entropy``; for ATS, ISATS, DKD and DIST the formulas of
  their papers' code in fp32 (:data:`PLAIN`), not fastkd's fp64-selecting reference;
* ``compile``: ``torch.compile`` of that same plain function: the fair baseline;
* ``liger-kl`` (KD only, where ``liger_kernel`` is installed): what the first fastkd table called
  "Liger-Kernel": eager fp32 ``log_softmax`` of both logits, ``LigerKLDIVLoss`` on them, and
  ``LigerCrossEntropyLoss`` on a copy of the student logits (Liger's CE writes its gradient into
  its input);
* ``liger-jsd`` (KD only): the fairest Liger path for this job: ``LigerJSD(beta=0)`` (forward
  KL, loss and gradient in one kernel) on the same log-softmaxes, plus Liger's CE.
  (``LigerFusedLinearJSD`` fuses the final matmul and does not apply to given logits.)

Columns: time, the same forward + backward replayed from a CUDA graph (GPU time without the
host-side Python overhead that dominates small shapes such as 256 x 1000; ``-`` where the
implementation cannot be captured, e.g. a host synchronisation), effective bandwidth (the
minimal traffic ``read z + read v + write grad`` divided by the time), that bandwidth as a share
of a device-to-device copy measured in the same run, speed-ups over ``eager`` and over
``compile``, peak memory above the inputs, kernel launches (forward / forward + backward,
counted with the PyTorch profiler) and the loss. Every row records the commit, GPU, versions
and date; ``--save`` appends the rows to ``benchmarks/results/kernels-<gpu>.jsonl`` and ``.md``.

``--dry-run`` runs every step on the CPU at tiny shapes (kernels in Triton's interpreter,
``torch.compile`` with its ``eager`` backend, wall-clock timing, no CUDA-graph column): it
checks the benchmark end to end without a GPU; its times mean nothing.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

from .. import _compat
from ..losses.methods import METHOD_TABLE
from .common import machine

DEFAULT_SHAPES = "256x1000,4096x32000,8192x128256"
DRY_RUN_SHAPES = "8x100,4x9000"
# Every method of the table with a teacher (fastkd.losses.methods.METHOD_TABLE); each has a plain
# fp32 baseline in PLAIN (a test fails when one is missing).
METHODS = tuple(m for m in METHOD_TABLE if m != "ce")
IMPLS = ("fastkd", "fastkd-split", "eager", "compile", "liger-kl", "liger-jsd")
ALIASES = {"liger": ("liger-kl", "liger-jsd")}
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def add_arguments(parser) -> None:
    parser.add_argument("--shapes", default=None,
                        help=f"comma-separated NxC shapes (default {DEFAULT_SHAPES}; --dry-run: {DRY_RUN_SHAPES})")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--method", default="kd",
                        help="loss method, or several comma-separated (one table each): " + ", ".join(METHODS))
    parser.add_argument("--temperature", type=float, default=None,
                        help="KD / DKD / DIST temperature (default: the method's, see fastkd.DistillLoss)")
    parser.add_argument("--ce-weight", type=float, default=0.5)
    parser.add_argument("--kd-weight", type=float, default=0.5)
    parser.add_argument("--impls", default=",".join(IMPLS),
                        help="comma-separated subset of " + ", ".join(IMPLS) + " ('liger' means both liger rows)")
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warm-up time (ms)")
    parser.add_argument("--rep", type=int, default=100, help="do_bench measuring time (ms)")
    parser.add_argument("--sweep", action="store_true",
                        help="also time the fused kernel's chunked path (rows above 8192 classes) under "
                             "several chunk / warps / prefetch choices (tuning aid)")
    parser.add_argument("--config", default=None,
                        help="chunked-path configuration for the fused kernel, e.g. chunk=4096,warps=8,prefetch=1 "
                             "(default: the shipped one)")
    parser.add_argument("--no-graphs", dest="graphs", action="store_false",
                        help="skip the CUDA-graph replay column (on by default on a GPU)")
    parser.add_argument("--commit", default=None,
                        help="the commit the measured code is at (default: git rev-parse of this checkout)")
    parser.add_argument("--dry-run", action="store_true",
                        help="run every step on the CPU at tiny shapes (Triton interpreter; times mean nothing)")
    parser.add_argument("--save", action="store_true", help="append the rows to --results-dir")
    parser.add_argument("--results-dir", default="benchmarks/results")
    parser.add_argument("--json", default=None, help="also write every row (and the sweep) to this JSON file")


# ---- inputs ---------------------------------------------------------------------------------
def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", item)
        if not m:
            raise ValueError(f"bad shape {item!r}: expected NxC, e.g. 4096x32000")
        n, c = int(m.group(1)), int(m.group(2))
        if n < 1 or not 2 <= c <= 262_144:
            raise ValueError(f"bad shape {item!r}: need N >= 1 and 2 <= C <= 262144")
        shapes.append((n, c))
    return shapes


def parse_impls(text: str) -> list[str]:
    """'fastkd,liger' -> ['fastkd', 'liger-kl', 'liger-jsd']; an unknown name raises ValueError."""
    wanted = []
    for name in (w.strip() for w in text.split(",")):
        if not name:
            continue
        for n in ALIASES.get(name, (name,)):
            if n not in IMPLS:
                raise ValueError(f"unknown implementation(s) {name}; choose from {', '.join(IMPLS)} or liger")
            if n not in wanted:
                wanted.append(n)
    return wanted


def make_inputs(n: int, c: int, dtype, device="cuda", seed: int = 0):
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    z = (torch.randn(n, c, device=device, generator=g) * 3).to(dtype).requires_grad_(True)
    v = (torch.randn(n, c, device=device, generator=g) * 3).to(dtype)
    y = torch.randint(0, c, (n,), device=device, generator=g)
    return z, v, y


def method_params(method: str, temperature=None) -> dict:
    """The loss parameters the table uses: fastkd's defaults for ``method`` (from
    :data:`fastkd.losses.methods.METHOD_TABLE`), with ``temperature`` overriding where the
    method has one; ISATS' candidate grid made explicit."""
    from ..losses.methods import params_for

    # Every parameter of the loss formula, from the one method table (a warm-up schedule in
    # epochs is no part of one step's loss; options such as logit standardisation stay off).
    params = {p.name: p.default for p in params_for(method) if p.kind not in ("epochs", "flag")}
    if temperature is not None and "temperature" in params:
        params["temperature"] = float(temperature)
    if method == "isats" and params.get("candidates") is None:
        from ..losses.reference import isats_default_candidates

        params["candidates"] = tuple(isats_default_candidates(params["tau_target"]))
    return params


# ---- the plain fp32 implementations a competent user writes ---------------------------------
# Each returns ce_weight * CE + kd_weight * KD (batch means). No ignore_index handling: the
# benchmark has no ignored rows. These are the baselines of the table (eager and compiled);
# tests/ops/test_bench_kernels.py checks each against fastkd's fp64 reference.
def _ce(z, y):
    import torch.nn.functional as F

    return F.cross_entropy(z, y)


def _label_mask(x, y):
    import torch

    return torch.zeros_like(x, dtype=torch.bool).scatter_(1, y[:, None], True)


def plain_kd(z, v, y, *, temperature, ce_weight, kd_weight):
    """Hinton KD as autocast runs it: softmax family in fp32."""
    import torch.nn.functional as F

    T = temperature
    z, v = z.float(), v.float()
    kl = F.kl_div(F.log_softmax(z / T, -1), F.log_softmax(v / T, -1), reduction="batchmean", log_target=True)
    return ce_weight * _ce(z, y) + kd_weight * kl * (T * T)


def plain_ats(z, v, y, *, tau_target, tau_other, student_temperature, ce_weight, kd_weight):
    """ATS: the teacher's label logit divided by tau_target, the others by tau_other."""
    import torch
    import torch.nn.functional as F

    s = student_temperature
    z, v = z.float(), v.float()
    on_y = _label_mask(v, y)
    log_q = F.log_softmax(torch.where(on_y, v / tau_target, v / tau_other), -1)
    kl = F.kl_div(F.log_softmax(z / s, -1), log_q, reduction="batchmean", log_target=True)
    return ce_weight * _ce(z, y) + kd_weight * kl * (s * s)


def plain_isats(z, v, y, *, tau_target, candidates, student_temperature, ce_weight, kd_weight):
    """ISATS: per row, the candidate tau_other that maximises the variance of the teacher's
    wrong-class probabilities while the label stays on top (a loop over the candidates in fp32)."""
    import torch
    import torch.nn.functional as F

    s = student_temperature
    z, v = z.float(), v.float()
    C = v.shape[1]
    on_y = _label_mask(v, y)
    with torch.no_grad():
        v_y = v.gather(1, y[:, None]).squeeze(1)
        wrong_max = v.masked_fill(on_y, float("-inf")).amax(1)
        best_var = torch.full_like(v_y, float("-inf"))
        best_tau = torch.full_like(v_y, float(max(candidates)))
        for t in candidates:
            q = torch.where(on_y, v / tau_target, v / t).softmax(-1).masked_fill(on_y, 0.0)
            mean = q.sum(1, keepdim=True) / (C - 1)
            var = (q - mean).square().masked_fill(on_y, 0.0).sum(1) / (C - 1)
            better = (v_y / tau_target >= wrong_max / t) & (var > best_var)
            best_var = torch.where(better, var, best_var)
            best_tau = torch.where(better, torch.full_like(best_tau, t), best_tau)
    log_q = F.log_softmax(torch.where(on_y, v / tau_target, v / best_tau[:, None]), -1)
    kl = F.kl_div(F.log_softmax(z / s, -1), log_q, reduction="batchmean", log_target=True)
    return ce_weight * _ce(z, y) + kd_weight * kl * (s * s)


def plain_dkd(z, v, y, *, alpha, beta, temperature, ce_weight, kd_weight):
    """DKD as its authors' code (mdistiller) writes it, in fp32."""
    import torch
    import torch.nn.functional as F

    T = temperature
    z, v = z.float(), v.float()
    gt = _label_mask(z, y)
    p_s, p_t = F.softmax(z / T, -1), F.softmax(v / T, -1)
    b_s = torch.stack([(p_s * gt).sum(1), (p_s * ~gt).sum(1)], 1)
    b_t = torch.stack([(p_t * gt).sum(1), (p_t * ~gt).sum(1)], 1)
    tckd = F.kl_div(torch.log(b_s), b_t, reduction="batchmean") * (T * T)
    log_hat_s = F.log_softmax(z / T - 1000.0 * gt, -1)
    hat_t = F.softmax(v / T - 1000.0 * gt, -1)
    nckd = F.kl_div(log_hat_s, hat_t, reduction="batchmean") * (T * T)
    return ce_weight * _ce(z, y) + kd_weight * (alpha * tckd + beta * nckd)


def plain_dist(z, v, y, *, beta, gamma, temperature, ce_weight, kd_weight):
    """DIST as its authors' code writes it (Pearson correlations of the softmaxes), in fp32."""
    import torch.nn.functional as F

    def pearson(a, b, eps=1e-8):
        a = a - a.mean(1, keepdim=True)
        b = b - b.mean(1, keepdim=True)
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)

    T = temperature
    z, v = z.float(), v.float()
    y_s, y_t = F.softmax(z / T, -1), F.softmax(v / T, -1)
    inter = 1.0 - pearson(y_s, y_t).mean()
    intra = 1.0 - pearson(y_s.t(), y_t.t()).mean()
    return ce_weight * _ce(z, y) + kd_weight * (T * T) * (beta * inter + gamma * intra)


def _log_softmaxes(z, v, T):
    import torch.nn.functional as F

    return F.log_softmax(z.float() / T, -1), F.log_softmax(v.float() / T, -1)


def plain_jsd(z, v, y, *, beta, temperature, ce_weight, kd_weight):
    """Generalised JSD as Liger-Kernel's PyTorch reference writes it (its beta; end points the
    forward / reverse KL), times T^2, in fp32."""
    import math

    import torch

    T = temperature
    log_q, log_p = _log_softmaxes(z, v, T)  # student, teacher
    if beta == 0.0:
        div = (log_p.exp() * (log_p - log_q)).sum(-1)
    elif beta == 1.0:
        div = (log_q.exp() * (log_q - log_p)).sum(-1)
    else:
        log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]), 0)
        div = (beta * (log_p.exp() * (log_p - log_m)) + (1 - beta) * (log_q.exp() * (log_q - log_m))).sum(-1)
    return ce_weight * _ce(z.float(), y) + kd_weight * (T * T) * div.mean()


def plain_rkl(z, v, y, *, temperature, ce_weight, kd_weight):
    """Reverse KL(student || teacher) (GKD / MiniLLM style), times T^2, in fp32."""
    T = temperature
    log_q, log_p = _log_softmaxes(z, v, T)
    return ce_weight * _ce(z.float(), y) + kd_weight * (T * T) * (log_q.exp() * (log_q - log_p)).sum(-1).mean()


PLAIN = {"kd": plain_kd, "ats": plain_ats, "isats": plain_isats, "dkd": plain_dkd, "dist": plain_dist,
         "jsd": plain_jsd, "rkl": plain_rkl}


def eager_kd_ce(z, v, y, temperature: float, ce_weight: float, kd_weight: float):
    """KD + CE the usual way, as autocast runs it (softmax family in fp32)."""
    return plain_kd(z, v, y, temperature=temperature, ce_weight=ce_weight, kd_weight=kd_weight)


def build_impls(method: str, temperature, ce_weight: float, kd_weight: float, wanted, *,
                compile_backend: str = "inductor", skipped=None, config=None) -> dict:
    """name -> (loss_fn(z, v, y), note) for the implementations available here; the reason each
    wanted one is not is put into the dict ``skipped`` when given. ``config``: the fused
    kernel's launch configuration (keyword arguments of LaunchConfig; default the shipped one)."""
    import functools

    import torch

    skipped = {} if skipped is None else skipped
    params = method_params(method, temperature)
    plain = functools.partial(PLAIN[method], ce_weight=ce_weight, kd_weight=kd_weight, **params)
    plain.__name__ = f"plain_{method}"
    impls = {}
    if "fastkd" in wanted:
        if method == "dist":
            from ..losses import DistillLoss

            module = DistillLoss("dist", ce_weight=ce_weight, kd_weight=kd_weight, backend="triton", **params)
            impls["fastkd"] = (lambda z, v, y: module(z, v, y),
                               "no fused kernel for DIST: fastkd's fp32 PyTorch formula + fused CE")
        else:
            from ..kernels import fused_distill

            launch = launch_config(config)

            def fastkd_fn(z, v, y):
                return fused_distill(z, v, y, method=method, ce_weight=ce_weight, kd_weight=kd_weight,
                                     label_smoothing=0.0, ignore_index=-100, reduction="batchmean", config=launch,
                                     **params)[0]

            impls["fastkd"] = (fastkd_fn, "fused Triton kernel" + (f", launch configuration {config}" if config
                                                                   else ""))
    if "fastkd-split" in wanted:
        # The split-row path (opt-in until measured and verified compiled on a GPU): rows longer
        # than one block only; shorter rows take the single-block path whatever the setting.
        from ..kernels import fused_distill
        from ..kernels.kd_softmax_kl import LaunchConfig

        split_cfg = LaunchConfig(**{**(config or {}), "split": True})

        def split_fn(z, v, y):
            return fused_distill(z, v, y, method=method, ce_weight=ce_weight, kd_weight=kd_weight,
                                 label_smoothing=0.0, ignore_index=-100, reduction="batchmean", config=split_cfg,
                                 **params)[0]

        if method == "dist":
            skipped["fastkd-split"] = "no fused kernel for DIST"
        else:
            impls["fastkd-split"] = (split_fn, "fused Triton kernel, split-row path (LaunchConfig(split=True))")
    if "eager" in wanted:
        impls["eager"] = (plain, f"plain fp32 PyTorch ({PLAIN[method].__doc__.splitlines()[0]})")
    if "compile" in wanted:
        note = "torch.compile of the plain fp32 function" + (
            "" if compile_backend == "inductor" else f" (backend {compile_backend!r})")
        impls["compile"] = (torch.compile(plain, dynamic=False, backend=compile_backend), note)
    liger = [w for w in wanted if w.startswith("liger")]
    if liger and method != "kd":
        skipped.update({w: "Liger rows are for --method kd only" for w in liger})
    elif liger and not _compat.has_module("liger_kernel"):
        skipped.update({w: "liger_kernel is not installed (pip install liger-kernel)" for w in liger})
    elif liger:
        impls.update(_liger_impls(params["temperature"], ce_weight, kd_weight, liger, skipped))
    return impls


def _liger_impls(T: float, ce_weight: float, kd_weight: float, wanted, skipped: dict) -> dict:
    import torch
    from liger_kernel.transformers import LigerCrossEntropyLoss

    ce = LigerCrossEntropyLoss()
    impls = {}

    def log_softmaxes(z, v):
        return torch.log_softmax(z.float() / T, dim=-1), torch.log_softmax(v.float() / T, dim=-1)

    # Liger's CE writes its gradient into its input's storage: it gets its own copy of the
    # student logits (counted in its time, as a user would have to).
    if "liger-kl" in wanted:
        from liger_kernel.transformers import LigerKLDIVLoss

        kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)

        def liger_kl(z, v, y):
            log_ps, log_pt = log_softmaxes(z, v)
            return ce_weight * ce(z.clone(), y) + kd_weight * kl(log_ps, log_pt) * (T * T)

        impls["liger-kl"] = (liger_kl, "eager fp32 log_softmax x2 + LigerKLDIVLoss + LigerCrossEntropyLoss (on a copy)")
    if "liger-jsd" in wanted:
        from liger_kernel.transformers import LigerJSD

        try:
            jsd = LigerJSD(beta=0.0)  # beta = 0: forward KL(teacher || student), Hinton's KD term
        except (AssertionError, ValueError) as exc:  # older releases allowed only 0 < beta < 1
            skipped["liger-jsd"] = f"this liger_kernel's LigerJSD refuses beta=0 ({exc})"
            return impls

        def liger_jsd(z, v, y):
            log_ps, log_pt = log_softmaxes(z, v)
            return ce_weight * ce(z.clone(), y) + kd_weight * jsd(log_ps, log_pt) * (T * T)

        impls["liger-jsd"] = (liger_jsd, "eager fp32 log_softmax x2 + LigerJSD(beta=0) + LigerCrossEntropyLoss (on a copy)")
    return impls


# ---- measurements ---------------------------------------------------------------------------
def fwd_bwd(loss_fn, z, v, y, one):
    """One forward + backward; the gradient w.r.t. z is returned (not accumulated)."""
    import torch

    loss = loss_fn(z, v, y)
    (g,) = torch.autograd.grad(loss, z, one)
    return loss, g


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy in GB/s, counting the bytes read and written."""
    import torch
    from triton.testing import do_bench

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median")
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / (ms * 1e-3) / 1e9


def count_launches(fn) -> int:
    """GPU activities (kernels, memsets, copies) that one call of ``fn`` puts on the device."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def time_ms(fn, device: str, warmup: int, rep: int) -> float:
    """Median ms of ``fn``: ``do_bench`` (CUDA events, L2 flushed) on a GPU; on the CPU (dry
    runs) the wall clock of three calls."""
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(loss_fn, z, v, y, warmup: int, rep: int) -> dict:
    import torch

    device = z.device.type
    one = torch.ones((), device=z.device)
    loss, g = fwd_bwd(loss_fn, z, v, y, one)  # compile / autotune outside the clock
    loss_value = float(loss.detach())
    del loss, g
    peak = None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fwd_bwd(loss_fn, z, v, y, one)
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        del out
    ms = time_ms(lambda: fwd_bwd(loss_fn, z, v, y, one), device, warmup, rep)
    launches_fwd = launches = -1
    if device == "cuda":
        try:
            launches_fwd = count_launches(lambda: loss_fn(z, v, y))
            launches = count_launches(lambda: fwd_bwd(loss_fn, z, v, y, one))
        except Exception:  # the profiler is unavailable on some machines
            pass
    return {"ms": ms, "peak_mb": peak, "loss": loss_value, "launches_fwd": launches_fwd, "launches": launches}


def graph_ms(loss_fn, z, v, y, warmup: int, rep: int) -> tuple:
    """(ms, None): fwd+bwd replayed from a CUDA graph; (None, why) where it cannot be captured."""
    import torch
    from triton.testing import do_bench

    one = torch.ones((), device=z.device)
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fwd_bwd(loss_fn, z, v, y, one)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fwd_bwd(loss_fn, z, v, y, one)
        torch.cuda.synchronize()
        return do_bench(graph.replay, warmup=warmup, rep=rep, return_mode="median"), None
    except Exception as exc:  # e.g. a host synchronisation inside the implementation
        torch.cuda.synchronize()
        return None, f"{type(exc).__name__}: {exc}"[:160]


# The sweep (tuning aid): the chunked path (each row read twice) and the split path (a row
# over several programs that combine their statistics, each element read once).
SWEEP = ([dict(split=False, chunk=ch, warps=w, prefetch=p) for ch, w in ((2048, 4), (4096, 8), (8192, 16))
          for p in (False, True)]
         + [dict(split=True, slice=sl, slice_warps=w) for sl, w in ((2048, 4), (2048, 8), (4096, 8), (4096, 16),
                                                                     (8192, 16))])
CONFIG_KEYS = {"max_single": int, "chunk": int, "warps": int, "prefetch": bool, "split": bool, "slice": int,
               "slice_warps": int, "lag": int}


def parse_config(text):
    """'chunk=4096,warps=8,prefetch=1' -> LaunchConfig keyword arguments (the fused kernel's
    launch configuration; checked by LaunchConfig itself)."""
    if not text:
        return {}
    out = {}
    for item in text.split(","):
        key, _, val = item.partition("=")
        key = key.strip()
        if key not in CONFIG_KEYS or not val.strip().isdigit():
            raise ValueError(f"bad --config item {item!r}: expected one of " +
                             ", ".join(f"{k}=N" if t is int else f"{k}=0|1" for k, t in CONFIG_KEYS.items()))
        out[key] = bool(int(val)) if CONFIG_KEYS[key] is bool else int(val)
    return out


def launch_config(config: dict):
    """The fused kernel's :class:`LaunchConfig` for ``config`` (None: the shipped one)."""
    if not config:
        return None
    from ..kernels.kd_softmax_kl import LaunchConfig

    return LaunchConfig(**config)


def sweep_configs(fn_for, z, v, y, warmup: int, rep: int) -> list[dict]:
    """Time the fused kernel under the SWEEP configurations (rows longer than one block only);
    ``fn_for(config)`` is the fastkd loss function with that launch configuration."""
    import torch

    from ..kernels import _launch

    one = torch.ones((), device=z.device)
    configs = SWEEP if z.shape[1] > _launch.MAX_SINGLE else []
    rows = []
    for cfg in configs:
        try:
            fn = fn_for(cfg)
            fwd_bwd(fn, z, v, y, one)
            ms = time_ms(lambda: fwd_bwd(fn, z, v, y, one), z.device.type, warmup, rep)
            rows.append({**cfg, "ms": ms})
        except Exception as exc:  # a config the compiler rejects is reported, not fatal
            rows.append({**cfg, "error": f"{type(exc).__name__}: {exc}"[:200]})
    return rows


# ---- output ---------------------------------------------------------------------------------
HEADER = ("| N x C | impl | fwd+bwd ms | graph ms | GB/s | % copy | vs eager | vs compile | peak MB | "
          "launches fwd / all | loss |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def format_row(r: dict) -> str:
    launches = "-" if r.get("launches", -1) < 0 else f"{r['launches_fwd']} / {r['launches']}"
    return (f"| {r['N']} x {r['C']} | {r['impl']} | {r['ms']:.4f} | {_fmt(r.get('graph_ms'), '.4f')} | "
            f"{_fmt(r.get('gbs'), '.0f')} | {_fmt(r.get('pct_copy'), '.0f', ' %')} | "
            f"{_fmt(r.get('vs_eager'), '.2f', 'x')} | {_fmt(r.get('vs_compile'), '.2f', 'x')} | "
            f"{_fmt(r.get('peak_mb'), '.0f')} | {launches} | {r['loss']:.5g} |")


def main(args) -> int:
    import torch

    from ..errors import UsageError  # fastkd.cli reports it: one line on stderr, exit code 2

    try:
        shapes = parse_shapes(args.shapes or (DRY_RUN_SHAPES if args.dry_run else DEFAULT_SHAPES))
        config = parse_config(args.config)
        wanted = parse_impls(args.impls)
        parse_methods(args.method)
        if config:
            launch_config(config)  # LaunchConfig checks the values (powers of two...)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.dry_run:
        # Tiny shapes on the CPU: the kernels run in Triton's interpreter, which must be chosen
        # before fastkd.kernels is first imported.
        if "fastkd.kernels" not in sys.modules:
            os.environ.setdefault("TRITON_INTERPRET", "1")
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise UsageError("--dry-run needs TRITON_INTERPRET=1 before fastkd.kernels is imported")
    elif not torch.cuda.is_available():
        raise UsageError("needs a CUDA GPU (the kernels run on CPU only in Triton's interpreter, which is for "
                         "tests, not timing; --dry-run checks the benchmark itself on the CPU)")
    return _run(args, shapes, config, wanted, device="cpu" if args.dry_run else "cuda")


def parse_methods(text: str) -> list[str]:
    """'ats, dkd' -> ['ats', 'dkd']; an unknown method raises ValueError."""
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown method(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(METHODS)}")
    return methods


def _run(args, shapes, config, wanted, device: str) -> int:
    env = machine(device, args.commit)
    copy_gbs = copy_bandwidth() if device == "cuda" else None
    print(f"{env['gpu']} | torch {env['torch']} (CUDA {env['cuda']}) | triton {env['triton']} | "
          f"liger {env['liger_kernel'] or 'not installed'} | commit {env['commit']} | {env['date']}"
          + (" | DRY RUN (CPU, Triton interpreter: the times mean nothing)" if device == "cpu" else ""))
    print(f"device-to-device copy: {_fmt(copy_gbs, '.0f')} GB/s (read + write)")
    if config:
        print(f"fused kernel configuration: {config}")
    rows, sweeps, skipped = [], [], {}

    def checkpoint(new_rows):  # the rows so far, in case this process is stopped (a visit step's budget)
        if args.json:
            Path(args.json).write_text(json.dumps({"env": env, "copy_gbs": copy_gbs, "rows": rows + new_rows,
                                                   "partial": True}, indent=1))

    for method in parse_methods(args.method):
        m_rows, m_sweeps, m_skipped = _run_method(args, method, shapes, config, wanted, device, env, copy_gbs,
                                                  checkpoint)
        rows += m_rows
        sweeps += m_sweeps
        skipped.update({f"{name} ({method})" if len(parse_methods(args.method)) > 1 else name: why
                        for name, why in m_skipped.items()})
        if args.save:
            save(m_rows, env, copy_gbs, Path(args.results_dir), skipped=m_skipped)
    if sweeps:
        print("\nblock-configuration sweep (fused kernel, fwd+bwd ms):")
        for s in sweeps:
            cfg = ", ".join(f"{k}={s[k]}" for k in CONFIG_KEYS if k in s)
            print(f"  {s['method']} {s['N']} x {s['C']}: {cfg}: " + (f"{s['ms']:.4f}" if "ms" in s else s["error"]))
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "copy_gbs": copy_gbs, "rows": rows, "sweep": sweeps,
                                               "skipped": skipped}, indent=1))
    return 0


def _run_method(args, method, shapes, config, wanted, device, env, copy_gbs, checkpoint=lambda rows: None):
    """The rows (and sweep rows, and skipped implementations) of one method."""
    import torch

    dtype = getattr(torch, DTYPES[args.dtype])
    params = method_params(method, args.temperature)
    print(f"\nmethod {method} {params}, {args.dtype}, CE weight {args.ce_weight}, KD weight {args.kd_weight}")
    skipped = {}
    impls = build_impls(method, args.temperature, args.ce_weight, args.kd_weight, wanted,
                        compile_backend="inductor" if device == "cuda" else "eager", skipped=skipped, config=config)

    def fastkd_for(cfg):
        return build_impls(method, args.temperature, args.ce_weight, args.kd_weight, ["fastkd"], config=cfg)[
            "fastkd"][0]

    for name, why in skipped.items():
        print(f"note: no {name} rows: {why}")
    for name, (_, note) in impls.items():
        print(f"  {name}: {note}")
    graphs = args.graphs and device == "cuda"
    rows, sweeps = [], []
    print("\n" + HEADER)
    for n, c in shapes:
        z, v, y = make_inputs(n, c, dtype, device=device)
        nbytes = n * c * 3 * z.element_size()  # read z, read v, write grad
        shape_rows = []
        for name, (fn, note) in impls.items():
            try:
                m = measure(fn, z, v, y, args.warmup, args.rep)
                m["graph_ms"], m["graph_error"] = graph_ms(fn, z, v, y, args.warmup, args.rep) if graphs \
                    else (None, None if device == "cuda" else "no CUDA graphs on the CPU")
            except Exception as exc:  # out of memory, a compiler failure...: report the row, go on
                if device == "cuda":
                    torch.cuda.empty_cache()
                print(f"| {n} x {c} | {name} | failed: {type(exc).__name__}: {str(exc)[:120]} | | | | | | | | |")
                continue
            gbs = nbytes / (m["ms"] * 1e-3) / 1e9
            shape_rows.append({"N": n, "C": c, "dtype": args.dtype, "method": method, "params": params,
                               "temperature": params.get("temperature"), "ce_weight": args.ce_weight,
                               "kd_weight": args.kd_weight, "impl": name, "note": note, **m, "gbs": gbs,
                               "pct_copy": 100 * gbs / copy_gbs if copy_gbs else None, "copy_gbs": copy_gbs,
                               "config": config or "shipped", "dry_run": device == "cpu", **env})
        base = {k: next((r["ms"] for r in shape_rows if r["impl"] == k), None) for k in ("eager", "compile")}
        for r in shape_rows:
            r["vs_eager"] = base["eager"] / r["ms"] if base["eager"] else None
            r["vs_compile"] = base["compile"] / r["ms"] if base["compile"] else None
            r["speedup"] = r["vs_eager"]  # the first table's name for it
            print(format_row(r), flush=True)
        rows += shape_rows
        checkpoint(rows)
        if args.sweep and "fastkd" in impls:
            for s in sweep_configs(fastkd_for, z, v, y, args.warmup, args.rep):
                s.update(method=method, N=n, C=c)
                sweeps.append(s)
        del z, v, y
        if device == "cuda":
            torch.cuda.empty_cache()
    for r in rows:
        if r.get("graph_error") and device == "cuda":
            print(f"note: {r['impl']} at {r['N']} x {r['C']} cannot be replayed from a CUDA graph: {r['graph_error']}")
    return rows, sweeps, skipped


def save(rows, env, copy_gbs, results_dir: Path, skipped=None) -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", env["gpu"]).strip("-").lower()
    with open(results_dir / f"kernels-{slug}.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    with open(results_dir / f"kernels-{slug}.md", "a") as f:
        r0 = rows[0] if rows else {}
        f.write(f"\n## {env['gpu']}, {env['date']}, commit {env.get('commit', 'unknown')}: "
                f"{r0.get('method', '?')} + CE, {r0.get('dtype', '?')}, {r0.get('params', {})}\n\n")
        f.write(f"torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, "
                f"liger-kernel {env['liger_kernel'] or 'not installed'}, fastkd {env['fastkd']}; "
                f"device-to-device copy {_fmt(copy_gbs, '.0f')} GB/s.\n\n")
        for name, note in dict((r["impl"], r.get("note", "")) for r in rows).items():
            f.write(f"* {name}: {note}\n")
        for name, why in (skipped or {}).items():
            f.write(f"* {name}: not measured: {why}\n")
        f.write("\n" + HEADER + "\n")
        for r in rows:
            f.write(format_row(r) + "\n")
    print(f"\nappended {len(rows)} rows to {results_dir}/kernels-{slug}.jsonl and .md")
