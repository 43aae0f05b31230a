"""``fastkd bench linear``: peak memory and time of a distillation loss on a language model's head.

The student's hidden states ``(N, H)`` and head ``(V, H)``, and a teacher given the same way
(hidden states and a head: its logits are chunked too, as in Liger-Kernel's fused-linear JSD),
labels with a fraction of ``-100`` rows. One forward + backward of each variant:

* ``torch-full``: the full ``N x V`` student and teacher logits, then ``fastkd.DistillLoss`` on the
  PyTorch reference (eager; fp32 math), autograd through the heads;
* ``fastkd``: :func:`fastkd.fused_linear_distill` with ``backend="auto"`` (the fused Triton kernel
  per chunk on CUDA; on a CPU the PyTorch reference per chunk, which chunks the same way);
* ``compile-chunked``: a ``torch.compile``-d per-chunk loss in plain PyTorch, each chunk's
  backward run before the next chunk (the usual hand-written chunked loss);
* ``liger``: ``LigerFusedLinearJSD`` (method ``jsd`` only; needs Liger-Kernel and CUDA).

Each variant runs in a fresh subprocess, so peak memory is its own. After one warm-up call
(library set-up, ``torch.compile``'s compilation) the peak is reset and the timed calls measured:
on CUDA ``torch.cuda.max_memory_allocated`` above what is allocated between calls (the inputs);
on a CPU the process's peak resident size (``VmHWM``, reset through ``/proc/self/clear_refs``)
above its resident size between calls, with large blocks mmapped (``MALLOC_MMAP_THRESHOLD_``) so
that freed tensors leave the resident set. The time is the median of ``--repeats`` timed calls.
A variant that fails or is skipped says why in the table.
Rows are printed as a Markdown table, appended as JSON lines to ``--results`` and written as a
Markdown file to ``--markdown`` with the machine, versions, commit and date.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .common import machine

VARIANTS = ("torch-full", "fastkd", "compile-chunked", "liger")
METHODS = ("kd", "jsd", "rkl")
GPU_SHAPES = "8192x4096x128256,8192x4096x32000,2048x4096x32000"
CPU_SHAPES = "8192x256x32000,2048x256x32000"
DRY_RUN_SHAPES = "64x16x500"


def add_arguments(parser) -> None:
    parser.add_argument("--shapes", default=None,
                        help=f"comma-separated NxHxV (default: {GPU_SHAPES} on CUDA, {CPU_SHAPES} on a CPU)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    parser.add_argument("--method", default="jsd", choices=METHODS, help="the distillation method")
    parser.add_argument("--beta", type=float, default=0.5, help="JSD beta (method jsd)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="rows per chunk of the chunked variants (default: fastkd's, Liger's rule)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                        help="hidden states and weights (auto: bfloat16 on CUDA, float32 on a CPU)")
    parser.add_argument("--ignore-fraction", type=float, default=0.1, help="fraction of rows labelled -100")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after one warm-up call")
    parser.add_argument("--threads", type=int, default=None, help="CPU math threads of each variant's process")
    parser.add_argument("--full-max-rows", type=int, default=None,
                        help="skip torch-full above this N (its N x V logits; default: none on CUDA, 2048 on a CPU)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per variant's process")
    parser.add_argument("--commit", default=None, help="the commit measured (default: git rev-parse HEAD)")
    parser.add_argument("--results", default=None, help="append one JSON line per row here")
    parser.add_argument("--markdown", default=None, help="write the table with its machine line here")
    parser.add_argument("--dry-run", action="store_true", help=f"tiny shapes ({DRY_RUN_SHAPES}) on the CPU")


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """'8192x4096x128256, 64x16x500' -> [(8192, 4096, 128256), (64, 16, 500)]."""
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            n, h, v = (int(x) for x in part.lower().split("x"))
        except ValueError:
            raise ValueError(f"shape {part!r} is not NxHxV (three integers joined by 'x')") from None
        if min(n, h) < 1 or v < 2:
            raise ValueError(f"shape {part!r}: N and H must be >= 1 and V >= 2")
        out.append((n, h, v))
    if not out:
        raise ValueError("no shapes given")
    return out


def parse_variants(text: str) -> list[str]:
    out = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in out if v not in VARIANTS]
    if bad or not out:
        raise ValueError(f"unknown variant(s) {', '.join(bad) or '(none)'}; choose from {', '.join(VARIANTS)}")
    return out


# --------------------------------------------------------------------------------------------
# One measurement (in its own process)
# --------------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> None:
    """Reset the kernel's peak resident size of this process (VmHWM; Linux ``clear_refs`` 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def _chunked_compiled(method, beta, T, chunk):
    """A torch.compile-d per-chunk loss in plain PyTorch; each chunk's backward runs at once."""
    import math

    import torch

    if method == "jsd" and beta in (0.0, 1.0):  # Liger's end points: forward / reverse KL
        method = "kd" if beta == 0.0 else "rkl"
    lb, l1b = (math.log(beta), math.log1p(-beta)) if method == "jsd" else (0.0, 0.0)

    def chunk_loss(h, w, th, tw, y, inv):
        z = (h @ w.t()).float() / T
        v = (th @ tw.t()).float() / T
        lq = torch.log_softmax(z, -1)
        lp = torch.log_softmax(v, -1)
        if method == "kd":
            rows = (lp.exp() * (lp - lq)).sum(-1)
        elif method == "rkl":
            rows = (lq.exp() * (lq - lp)).sum(-1)
        else:
            lm = torch.logaddexp(lp + lb, lq + l1b)
            rows = beta * (lp.exp() * (lp - lm)).sum(-1) + (1 - beta) * (lq.exp() * (lq - lm)).sum(-1)
        return (torch.where(y != -100, rows, torch.zeros_like(rows)).sum() * inv) * (T * T)

    compiled = torch.compile(chunk_loss, dynamic=False)

    def run(h, w, th, tw, y):
        inv = 1.0 / max(int((y != -100).sum()), 1)
        total = 0.0
        for lo in range(0, h.shape[0], chunk):
            loss = compiled(h[lo:lo + chunk], w, th[lo:lo + chunk], tw, y[lo:lo + chunk], inv)
            loss.backward()
            total += float(loss)
        return total

    return run


def measure(spec: dict) -> dict:
    """Run one variant on one shape (inside a fresh process) and return its numbers."""
    import torch

    import fastkd
    from fastkd.losses.linear import default_chunk_size

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    dev = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    N, H, V = spec["N"], spec["H"], spec["V"]
    method, beta, T, variant = spec["method"], spec["beta"], spec["temperature"], spec["variant"]
    chunk = spec.get("chunk_size") or default_chunk_size(N, H, V)
    params = {"temperature": T, **({"beta": beta} if method == "jsd" else {})}
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(N, H, generator=g, device=dev, dtype=dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g, device=dev, dtype=dtype) * H ** -0.5).requires_grad_()
    th = torch.randn(N, H, generator=g, device=dev, dtype=dtype)
    tw = torch.randn(V, H, generator=g, device=dev, dtype=dtype) * H ** -0.5
    y = torch.randint(0, V, (N,), generator=g, device=dev)
    y[torch.rand(N, generator=g, device=dev) < spec["ignore_fraction"]] = -100

    if variant == "torch-full":
        crit = fastkd.DistillLoss(method, ce_weight=0.0, kd_weight=1.0, backend="torch", **params)

        def step():
            loss = crit(h @ w.t(), th @ tw.t(), y)
            loss.backward()
            return float(loss)
    elif variant == "fastkd":
        def step():
            loss = fastkd.fused_linear_distill(h, w, (th, tw), y, method=method, chunk_size=chunk, ce_weight=0.0,
                                               kd_weight=1.0, **params)
            loss.backward()
            return float(loss)
    elif variant == "compile-chunked":
        run = _chunked_compiled(method, beta, T, chunk)

        def step():
            return run(h, w, th, tw, y)
    elif variant == "liger":
        if method != "jsd":
            return {"skipped": "Liger's fused-linear loss is JSD (method jsd)"}
        if dev.type != "cuda":
            return {"skipped": "Liger-Kernel's Triton kernels need CUDA"}
        try:
            from liger_kernel.transformers import LigerFusedLinearJSD
        except ImportError:
            return {"skipped": "Liger-Kernel is not installed"}
        liger = LigerFusedLinearJSD(jsd_beta=beta, temperature=T)

        def step():
            loss = liger(h, w, th, tw, y)
            loss.backward()
            return float(loss)
    else:
        raise ValueError(f"unknown variant {variant!r}")

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    t0 = time.perf_counter()
    value = step()  # warm-up: library set-up, allocator pools, torch.compile's compilation
    sync()
    warm_s = time.perf_counter() - t0
    h.grad = w.grad = None
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        _reset_peak_rss()
        base = _rss_bytes()
    times = []
    for _ in range(max(spec["repeats"], 1)):
        h.grad = w.grad = None
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else _peak_rss_bytes()
    return {"ms": statistics.median(times), "ms_all": times, "warmup_s": warm_s,
            "peak_above_inputs_mb": (peak - base) / 2**20, "peak_mb": peak / 2**20, "loss": value, "chunk": chunk}


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------
def _run_worker(spec: dict, timeout: float) -> dict:
    # Large blocks mmapped (and unmapped when freed): the resident size then follows what tensors
    # hold, rather than what glibc's heap keeps after a free.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    cmd = [sys.executable, "-m", "fastkd.bench.linear", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        why = "killed (out of memory?)" if proc.returncode in (-9, 137) else tail[:200]
        return {"error": f"failed (exit {proc.returncode}): {why}"}
    return json.loads(lines[-1])


def _fmt_row(r: dict) -> str:
    shape = f"{r['N']} x {r['H']} x {r['V']}"
    if "skipped" in r or "error" in r:
        return f"| {shape} | {r['variant']} | - | - | - | {r.get('skipped') or r.get('error')} |"
    note = f"chunk {r['chunk']} rows" if r["variant"] != "torch-full" else "full N x V logits"
    if r["variant"] == "compile-chunked":
        note += f"; first call (compiles) {r['warmup_s']:.1f} s"
    return (f"| {shape} | {r['variant']} | {r['ms']:.1f} | {r['peak_above_inputs_mb']:.0f} | {r['peak_mb']:.0f} | "
            f"{note} |")


def main(args) -> int:
    import torch

    from ..errors import UsageError

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible")
    try:
        shapes = parse_shapes(args.shapes or (DRY_RUN_SHAPES if args.dry_run else
                                              GPU_SHAPES if device == "cuda" else CPU_SHAPES))
        variants = parse_variants(args.variants)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not 0 <= args.ignore_fraction < 1:
        raise UsageError(f"--ignore-fraction must be in [0, 1), got {args.ignore_fraction}")
    if args.repeats < 0:
        raise UsageError(f"--repeats must be >= 0, got {args.repeats}")
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    full_max = args.full_max_rows if args.full_max_rows is not None else (None if device == "cuda" else 2048)
    env = machine(device, args.commit)
    backend_note = ("fused Triton kernel per chunk" if device == "cuda" else
                    "PyTorch reference per chunk (backend auto on a CPU; the Triton interpreter is for tests)")
    liger = env["liger_kernel"] or "not installed"
    head = (f"{env['gpu']} | torch {env['torch']} | triton {env['triton']} | liger {liger}"
            f" | commit {env['commit']} | {env['date']}")
    setting = (f"method {args.method}" + (f" (beta {args.beta:g})" if args.method == "jsd" else "")
               + f", T {args.temperature:g}, {dtype} hidden states and weights, teacher as hidden states + head "
               f"(chunked too), {args.ignore_fraction:.0%} of rows labelled -100; forward + backward, median of "
               f"{args.repeats} after one warm-up call, each variant in a fresh process"
               + (f", {args.threads} thread(s)" if args.threads else "") + f"; fastkd: {backend_note}")
    print(head)
    print(setting)
    table = ["| N x H x V | variant | ms (fwd+bwd) | peak MB above inputs | peak MB (process) | notes |",
             "|---|---|---:|---:|---:|---|"]
    print("\n".join(table))
    rows = []
    for (N, H, V) in shapes:
        for variant in variants:
            spec = dict(N=N, H=H, V=V, variant=variant, method=args.method, beta=args.beta,
                        temperature=args.temperature, chunk_size=args.chunk_size, device=device, dtype=dtype,
                        ignore_fraction=args.ignore_fraction, repeats=args.repeats, threads=args.threads)
            if variant == "torch-full" and full_max is not None and N > full_max:
                gb = 2 * N * V * 4 / 2**30
                res = {"skipped": f"N > --full-max-rows {full_max}: its student and teacher logits alone are "
                                  f"{gb:.1f} GiB in fp32 (and the reference makes several more N x V tensors)"}
            else:
                res = _run_worker(spec, args.timeout)
            row = {**spec, **res, "env": env}
            rows.append(row)
            table.append(_fmt_row(row))
            print(table[-1], flush=True)
    if args.results:
        with open(args.results, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    if args.markdown:
        Path(args.markdown).write_text("\n".join([f"Measured: {head}.", "", setting + ".", ""] + table) + "\n")
    return 0


if __name__ == "__main__":  # the worker: python -m fastkd.bench.linear SPEC_JSON
    print(json.dumps(measure(json.loads(sys.argv[1]))))
