"""``fastkd bench kernels``: the fused KD kernel against eager PyTorch, torch.compile and Liger.

Every row times one forward + backward of ``ce_weight * CE + kd_weight * KD`` (vanilla KD by
default) on ``N x C`` logits, with ``triton.testing.do_bench`` (CUDA events, L2 flushed between
runs, median). Rows:

* ``fastkd``: :func:`fastkd.kernels.fused_distill` (loss and gradient in one launch);
* ``eager``: PyTorch written the usual way, as ``torch.autocast`` runs it (the softmaxes in fp32):
  ``kl_div(log_softmax(z/T), log_softmax(v/T), log_target=True) * T^2`` plus ``cross_entropy``,
  then ``backward`` (for ``--method`` other than ``kd``: fastkd's PyTorch reference);
* ``compile``: ``torch.compile`` of the same function;
* ``liger``: Liger-Kernel's KL loss (on PyTorch log-softmaxes) plus its cross-entropy, where
  ``liger_kernel`` is installed (``kd`` only).

Columns: time, effective bandwidth (the minimal traffic ``read z + read v + write grad``
divided by the time), that bandwidth as a share of a device-to-device copy measured in the same
run, speed-up over eager, with ``--graphs`` the time when the same forward + backward is
replayed from a CUDA graph (the GPU time without host-side Python overhead, which dominates small
shapes such as 256 x 1000), peak memory above the inputs, and kernel launches (forward /
forward + backward, counted with the PyTorch profiler). ``--save`` appends the rows (GPU name,
versions, date) to ``benchmarks/results/kernels-<gpu>.jsonl`` and ``.md``.
"""
from __future__ import annotations

import datetime
import json
import platform
import re
from pathlib import Path

from .. import _compat

DEFAULT_SHAPES = "256x1000,4096x32000,8192x128256"
IMPLS = ("fastkd", "eager", "compile", "liger")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
METHOD_DEFAULTS = {
    "kd": {},
    "ats": dict(tau_target=4.0, tau_other=2.0, student_temperature=1.0),
    "isats": dict(tau_target=4.0, candidates=None, student_temperature=1.0),
    "dkd": dict(alpha=1.0, beta=8.0),
}


def add_arguments(parser) -> None:
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated NxC shapes")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--method", default="kd", choices=sorted(METHOD_DEFAULTS))
    parser.add_argument("--temperature", type=float, default=1.0, help="KD / DKD temperature")
    parser.add_argument("--ce-weight", type=float, default=0.5)
    parser.add_argument("--kd-weight", type=float, default=0.5)
    parser.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of " + ", ".join(IMPLS))
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warm-up time (ms)")
    parser.add_argument("--rep", type=int, default=100, help="do_bench measuring time (ms)")
    parser.add_argument("--sweep", action="store_true",
                        help="also time the fused kernel's chunked path (rows above 8192 classes) under "
                             "several chunk / warps / prefetch choices (tuning aid)")
    parser.add_argument("--config", default=None,
                        help="chunked-path configuration for the fused kernel, e.g. chunk=4096,warps=8,prefetch=1 "
                             "(default: the shipped one)")
    parser.add_argument("--graphs", action="store_true",
                        help="also time each implementation replayed from a CUDA graph (GPU time without the "
                             "host-side Python overhead that dominates small shapes)")
    parser.add_argument("--save", action="store_true", help="append the rows to --results-dir")
    parser.add_argument("--results-dir", default="benchmarks/results")
    parser.add_argument("--json", default=None, help="also write every row (and the sweep) to this JSON file")


# ---- inputs and implementations --------------------------------------------------------------
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


def make_inputs(n: int, c: int, dtype, device="cuda", seed: int = 0):
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    z = (torch.randn(n, c, device=device, generator=g) * 3).to(dtype).requires_grad_(True)
    v = (torch.randn(n, c, device=device, generator=g) * 3).to(dtype)
    y = torch.randint(0, c, (n,), device=device, generator=g)
    return z, v, y


def eager_kd_ce(z, v, y, temperature: float, ce_weight: float, kd_weight: float):
    """KD + CE the usual way, as autocast runs it (softmax family in fp32)."""
    import torch.nn.functional as F

    T = temperature
    log_ps = F.log_softmax(z.float() / T, dim=-1)
    log_pt = F.log_softmax(v.float() / T, dim=-1)
    kl = F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True) * (T * T)
    return ce_weight * F.cross_entropy(z.float(), y) + kd_weight * kl


def build_impls(method: str, temperature: float, ce_weight: float, kd_weight: float, wanted) -> dict:
    """name -> (loss_fn(z, v, y), note) for the implementations available here."""
    import torch

    from ..kernels import fused_distill
    from ..losses import DistillLoss

    params = dict(METHOD_DEFAULTS[method])
    if method in ("kd", "dkd"):
        params["temperature"] = temperature

    def fastkd_fn(z, v, y):
        return fused_distill(z, v, y, method=method, ce_weight=ce_weight, kd_weight=kd_weight, label_smoothing=0.0,
                             ignore_index=-100, reduction="batchmean", **params)[0]

    if method == "kd":
        def eager_fn(z, v, y):
            return eager_kd_ce(z, v, y, temperature, ce_weight, kd_weight)
    else:
        ref_module = DistillLoss(method, ce_weight=ce_weight, kd_weight=kd_weight, backend="torch", **params)

        def eager_fn(z, v, y):
            return ref_module(z, v, y)

    impls = {}
    if "fastkd" in wanted:
        impls["fastkd"] = (fastkd_fn, "fused Triton kernel")
    if "eager" in wanted:
        impls["eager"] = (eager_fn, "log_softmax/kl_div + cross_entropy" if method == "kd" else "fastkd reference")
    if "compile" in wanted:
        impls["compile"] = (torch.compile(eager_fn, dynamic=False), "torch.compile of eager")
    if "liger" in wanted and method == "kd" and _compat.has_module("liger_kernel"):
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerKLDIVLoss

        liger_kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)
        liger_ce = LigerCrossEntropyLoss()
        T = temperature

        def liger_fn(z, v, y):
            # Liger's CE writes its gradient into its input's storage: give it its own copy
            # (counted in its time, as a user would have to).
            log_ps = torch.log_softmax(z.float() / T, dim=-1)
            log_pt = torch.log_softmax(v.float() / T, dim=-1)
            return ce_weight * liger_ce(z.clone(), y) + kd_weight * liger_kl(log_ps, log_pt) * (T * T)

        impls["liger"] = (liger_fn, "LigerKLDIVLoss + LigerCrossEntropyLoss")
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


def measure(loss_fn, z, v, y, warmup: int, rep: int) -> dict:
    import torch
    from triton.testing import do_bench

    one = torch.ones((), device=z.device)
    loss, g = fwd_bwd(loss_fn, z, v, y, one)  # compile / autotune outside the clock
    loss_value = float(loss.detach())
    del loss, g
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fwd_bwd(loss_fn, z, v, y, one)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    ms = do_bench(lambda: fwd_bwd(loss_fn, z, v, y, one), warmup=warmup, rep=rep, return_mode="median")
    try:
        launches_fwd = count_launches(lambda: loss_fn(z, v, y))
        launches = count_launches(lambda: fwd_bwd(loss_fn, z, v, y, one))
    except Exception:  # the profiler is unavailable on some machines
        launches_fwd = launches = -1
    return {"ms": ms, "peak_mb": peak / 2**20, "loss": loss_value, "launches_fwd": launches_fwd,
            "launches": launches}


SWEEP = [dict(chunk=ch, warps=w, prefetch=p) for ch, w in ((2048, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16))
         for p in (False, True)]


def parse_config(text):
    """'chunk=4096,warps=8,prefetch=1' -> override_blocks keyword arguments."""
    if not text:
        return {}
    out = {}
    for item in text.split(","):
        key, _, val = item.partition("=")
        key = key.strip()
        if key not in ("chunk", "warps", "prefetch", "max_single") or not val.strip().isdigit():
            raise ValueError(f"bad --config item {item!r}: expected chunk=N, warps=N, prefetch=0|1 or max_single=N")
        out[key] = bool(int(val)) if key == "prefetch" else int(val)
    return out


def graph_ms(loss_fn, z, v, y, warmup: int, rep: int):
    """fwd+bwd replayed from a CUDA graph (ms), or None where capture is not possible."""
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
        return do_bench(graph.replay, warmup=warmup, rep=rep, return_mode="median")
    except Exception:  # e.g. a host synchronisation inside the implementation
        torch.cuda.synchronize()
        return None


def sweep_configs(loss_fn, z, v, y, warmup: int, rep: int) -> list[dict]:
    """Time the fused kernel's chunked path under the SWEEP configurations."""
    import torch
    from triton.testing import do_bench

    from ..kernels import kd_softmax_kl as K

    one = torch.ones((), device=z.device)
    configs = SWEEP if z.shape[1] > K.MAX_SINGLE else []
    rows = []
    for cfg in configs:
        K.override_blocks(**cfg)
        try:
            fwd_bwd(loss_fn, z, v, y, one)
            ms = do_bench(lambda: fwd_bwd(loss_fn, z, v, y, one), warmup=warmup, rep=rep, return_mode="median")
            rows.append({**cfg, "ms": ms})
        except Exception as exc:  # a config the compiler rejects is reported, not fatal
            rows.append({**cfg, "error": f"{type(exc).__name__}: {exc}"[:200]})
        finally:
            K.override_blocks()
    return rows


def environment() -> dict:
    import torch
    import triton

    from .. import __version__

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "fastkd": __version__,
        "liger_kernel": _version("liger_kernel") or _version("liger-kernel"),
        "python": platform.python_version(),
    }


def _version(name):
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


# ---- output ---------------------------------------------------------------------------------
HEADER = ("| N x C | impl | fwd+bwd ms | GB/s | % copy | vs eager | graph ms | peak MB | launches fwd / all | loss |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")


def format_row(r: dict) -> str:
    speed = f"{r['speedup']:.2f}x" if r.get("speedup") else "-"
    graph = f"{r['graph_ms']:.4f}" if r.get("graph_ms") else "-"
    return (f"| {r['N']} x {r['C']} | {r['impl']} | {r['ms']:.4f} | {r['gbs']:.0f} | {r['pct_copy']:.0f} % | "
            f"{speed} | {graph} | {r['peak_mb']:.0f} | {r['launches_fwd']} / {r['launches']} | {r['loss']:.5g} |")


def main(args) -> int:
    import torch

    try:
        shapes = parse_shapes(args.shapes)
        config = parse_config(args.config)
    except ValueError as exc:  # fastkd.cli reports it: one line on stderr, exit code 2
        from ..errors import UsageError

        raise UsageError(str(exc)) from None
    wanted = [w.strip() for w in args.impls.split(",") if w.strip()]
    unknown = sorted(set(wanted) - set(IMPLS))
    if unknown:
        print(f"fastkd bench kernels: unknown implementation(s) {', '.join(unknown)}; choose from {', '.join(IMPLS)}")
        return 2
    if not torch.cuda.is_available():
        print("fastkd bench kernels: needs a CUDA GPU (the kernels run on CPU only in Triton's interpreter, "
              "which is for tests, not timing)")
        return 2
    if "liger" in wanted and not _compat.has_module("liger_kernel"):
        print("note: liger_kernel is not installed (pip install liger-kernel): no liger rows")

    from ..kernels import kd_softmax_kl as K

    try:
        return _run(args, shapes, config, wanted)
    finally:
        K.override_blocks()


def _run(args, shapes, config, wanted) -> int:
    import torch

    from ..kernels import kd_softmax_kl as K

    dtype = getattr(torch, DTYPES[args.dtype])
    env = environment()
    copy_gbs = copy_bandwidth()
    print(f"{env['gpu']} | torch {env['torch']} (CUDA {env['cuda']}) | triton {env['triton']} | "
          f"liger {env['liger_kernel'] or 'not installed'} | {env['date']}")
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s (read + write); method {args.method}, {args.dtype}, "
          f"T={args.temperature}, CE weight {args.ce_weight}, KD weight {args.kd_weight}\n")
    if config:
        K.override_blocks(**config)
        print(f"fused kernel configuration: {config}")
    impls = build_impls(args.method, args.temperature, args.ce_weight, args.kd_weight, wanted)
    rows, sweeps = [], []
    print(HEADER)
    for n, c in shapes:
        z, v, y = make_inputs(n, c, dtype)
        nbytes = n * c * (2 * z.element_size() + z.element_size())  # read z, read v, write grad
        shape_rows = []
        for name, (fn, note) in impls.items():
            try:
                m = measure(fn, z, v, y, args.warmup, args.rep)
                m["graph_ms"] = graph_ms(fn, z, v, y, args.warmup, args.rep) if args.graphs else None
            except Exception as exc:  # out of memory, a compiler failure...: report the row, go on
                torch.cuda.empty_cache()
                print(f"| {n} x {c} | {name} | failed: {type(exc).__name__}: {str(exc)[:120]} | | | | | | | |")
                continue
            gbs = nbytes / (m["ms"] * 1e-3) / 1e9
            row = {"N": n, "C": c, "dtype": args.dtype, "method": args.method, "temperature": args.temperature,
                   "impl": name, "note": note, **m, "gbs": gbs, "pct_copy": 100 * gbs / copy_gbs,
                   "copy_gbs": copy_gbs, **env}
            shape_rows.append(row)
        eager = next((r["ms"] for r in shape_rows if r["impl"] == "eager"), None)
        for r in shape_rows:
            r["speedup"] = eager / r["ms"] if eager else None
            print(format_row(r), flush=True)
        rows += shape_rows
        if args.sweep and "fastkd" in impls:
            for s in sweep_configs(impls["fastkd"][0], z, v, y, args.warmup, args.rep):
                s.update(N=n, C=c)
                sweeps.append(s)
            if config:
                K.override_blocks(**config)  # the sweep restored the defaults
        del z, v, y
        torch.cuda.empty_cache()
    if sweeps:
        print("\nblock-configuration sweep (fused kernel, fwd+bwd ms):")
        for s in sweeps:
            cfg = ", ".join(f"{k}={s[k]}" for k in ("max_single", "chunk", "warps", "prefetch") if k in s)
            print(f"  {s['N']} x {s['C']}: {cfg}: " + (f"{s['ms']:.4f}" if "ms" in s else s["error"]))
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "copy_gbs": copy_gbs, "rows": rows, "sweep": sweeps},
                                              indent=1))
    if args.save:
        save(rows, env, copy_gbs, Path(args.results_dir))
    return 0


def save(rows, env, copy_gbs, results_dir: Path) -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", env["gpu"]).strip("-").lower()
    with open(results_dir / f"kernels-{slug}.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    with open(results_dir / f"kernels-{slug}.md", "a") as f:
        r0 = rows[0] if rows else {}
        f.write(f"\n## {env['gpu']}, {env['date']}: {r0.get('method', '?')} + CE, {r0.get('dtype', '?')}, "
                f"T={r0.get('temperature', '?')}\n\n")
        f.write(f"torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, "
                f"liger-kernel {env['liger_kernel'] or 'not installed'}, fastkd {env['fastkd']}; "
                f"device-to-device copy {copy_gbs:.0f} GB/s.\n\n")
        f.write(HEADER + "\n")
        for r in rows:
            f.write(format_row(r) + "\n")
    print(f"\nappended {len(rows)} rows to {results_dir}/kernels-{slug}.jsonl and .md")
