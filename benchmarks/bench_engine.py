"""End-to-end distillation throughput: fastkd's engine against the ways KD is usually run.

Images/s of teacher -> student distillation (default torchvision ResNet-50 -> ResNet-18, random
init, 224 px, bf16, batch 256), one row per mode:

* ``fastkd-concurrent``: ``fastkd train`` (the engine itself): channels_last, bf16, fused SGD,
  fused Triton KD loss, the teacher one batch ahead on its own CUDA stream;
* ``fastkd-sequential``: the same engine with ``--sequential`` (teacher in order, one stream);
  concurrent / sequential is the teacher stream's own gain, reported on its own line;
* ``fastkd-graph``: concurrent with ``--teacher-cuda-graph`` (the teacher replayed from a CUDA graph);
* ``fastkd-compile``: concurrent with ``--compile`` (both models through torch.compile);
* ``naive-fair``: an eager KD loop as a competent PyTorch user writes it: bf16 autocast,
  channels_last models and inputs, fused SGD (``torch.optim.SGD(fused=True)``), teacher in
  ``eval()`` under ``no_grad``, ``cudnn.benchmark``, ``kl_div(log_target=True)``; no teacher
  stream, no fused loss. This is the baseline fastkd's speed-up is quoted against;
* ``naive``: the loop as common KD frameworks ship it: the same, but NCHW and the stock
  (for-each) SGD; kept to compare with the first measurements, NOT a fair baseline (most of its
  gap is channels_last and the fused optimizer, which any user can switch on);
* ``student-only``: the engine training the student alone (``--method ce``): A;
* ``teacher-only``: the engine's teacher runner alone (inference): B;

and prints the sum-of-parts bound ``1 / (1/A + 1/B)``: the rate of running the two jobs back to
back with no overhead. At or above the bound means distillation costs nothing beyond its two
parts; above it means the streams overlap work that either part alone leaves idle.

Data: ``--data synthetic`` (default: random batches made on the device, so only the models are
measured) or ``--data DIR`` (an ImageFolder tree with train/; fastkd reads it with DALI when
installed, else its torch loader; the naive loops with a torchvision ``ImageFolder`` DataLoader).

Each fastkd mode is a real ``fastkd train`` run of 2 epochs of ``--steps`` steps; the second
epoch is timed (the first absorbs cuDNN autotuning, CUDA-graph capture and compilation). The
naive and teacher-only loops warm up for ``--warmup`` steps and are timed over ``--steps``
(CUDA events on synthetic data, the wall clock around a synchronised loop on files). A mode that
fails is reported as failed and the others still run. Every row records the commit, GPU,
versions and date; rows are appended to ``benchmarks/results/engine-<gpu>.jsonl``, and
``--markdown FILE`` also writes the table.

    python benchmarks/bench_engine.py --steps 30
    python benchmarks/bench_engine.py --dry-run          # every mode on the CPU, tiny models (checks, no numbers)
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MODES = {
    "fastkd-concurrent": "fastkd train: teacher one batch ahead on its own CUDA stream",
    "fastkd-sequential": "fastkd train --sequential: teacher in order, one stream",
    "fastkd-graph": "fastkd train --teacher-cuda-graph: concurrent, teacher replayed from a CUDA graph",
    "fastkd-compile": "fastkd train --compile: concurrent, both models torch.compile'd",
    "naive-fair": "eager KD loop as a competent user writes it: bf16 autocast, channels_last, fused SGD, "
                  "teacher eval + no_grad",
    "naive": "eager KD loop as KD frameworks ship it: NCHW, stock SGD, bf16 autocast, teacher eval + no_grad "
             "(not a fair baseline)",
    "student-only": "A: student training alone (fastkd train --method ce)",
    "teacher-only": "B: teacher inference alone (fastkd's teacher runner)",
}
DEFAULT_MODES = ("fastkd-concurrent", "fastkd-sequential", "fastkd-graph", "naive-fair", "naive", "student-only",
                 "teacher-only")
AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", default="torchvision:resnet50")
    p.add_argument("--student", default="torchvision:resnet18")
    p.add_argument("--data", default="synthetic", help="'synthetic' or an ImageFolder root holding train/")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--classes", type=int, default=1000, help="class count of synthetic data")
    p.add_argument("--steps", type=int, default=30, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps of the naive / teacher-only loops")
    p.add_argument("--amp", default="bf16", choices=tuple(AMP))
    p.add_argument("--modes", nargs="+", default=list(DEFAULT_MODES), choices=tuple(MODES))
    p.add_argument("--workers", type=int, default=8, help="loader workers (JPEG data)")
    p.add_argument("--commit", default=None, help="the commit the measured code is at (default: git rev-parse)")
    p.add_argument("--markdown", default=None, help="also write the table to this file")
    p.add_argument("--results", default=None, help="append the JSON line here (default: results/engine-<gpu>.jsonl)")
    p.add_argument("--no-save", action="store_true", help="do not append the JSON line anywhere")
    p.add_argument("--dry-run", action="store_true",
                   help="every mode on the CPU with tiny models and images (fastkd:resnet8 -> fastkd:resnet8, 16 px, "
                        "batch 8, 2 steps): checks the benchmark end to end; its numbers mean nothing")
    args = p.parse_args(argv)
    args.device = "cuda"
    if args.dry_run:
        args.device = "cpu"
        args.teacher = args.student = "fastkd:resnet8"
        args.batch_size, args.image_size, args.classes, args.steps, args.warmup = 8, 16, 10, 2, 1
        args.amp, args.workers = "none", 0
    return args


# ---- timing and data ------------------------------------------------------------------------
def _sync(device) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time(fn, steps: int, device: str, wall: bool = False) -> float:
    """Seconds for ``steps`` calls of ``fn``: CUDA events, or the wall clock around a
    synchronised loop (``wall``: host-side waits for a loader must count; always on the CPU)."""
    if device == "cuda" and not wall:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return time.perf_counter() - t0


def _synthetic_batches(args, n=4):
    """A few random batches on the device, cycled (the models are what is measured)."""
    g = torch.Generator(device=args.device).manual_seed(0)
    return [(torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=args.device, generator=g),
             torch.randint(args.classes, (args.batch_size,), device=args.device, generator=g)) for _ in range(n)]


def _jpeg_batches(args):
    """torchvision ImageFolder + DataLoader, the usual PyTorch ImageNet input pipeline."""
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    tf = T.Compose([T.RandomResizedCrop(args.image_size), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    root = Path(args.data)
    ds = ImageFolder(str(root / "train" if (root / "train").is_dir() else root), transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                                         pin_memory=args.device == "cuda", drop_last=True,
                                         persistent_workers=args.workers > 0)
    while True:
        for x, y in loader:
            yield x.to(args.device, non_blocking=True), y.to(args.device, non_blocking=True)


def _batches(args, memory_format=torch.contiguous_format):
    """Batches in ``memory_format``: the synthetic pool converted once (as a loader would hand
    them over), JPEG batches as the DataLoader yields them (converted in the step)."""
    if args.data == "synthetic":
        pool = [(x.contiguous(memory_format=memory_format), y) for x, y in _synthetic_batches(args)]
        return (pool[i % len(pool)] for i in range(10**9))
    return _jpeg_batches(args)


def _loader_name(args) -> str:
    """Which loader the fastkd modes read files with (create_loader's 'auto')."""
    if args.data == "synthetic":
        return "synthetic batches on the device"
    from fastkd import _compat

    if _compat.has_dali():  # create_loader's 'auto' takes DALI whenever it is installed
        return "fastkd DALI loader" + (" (nvJPEG GPU decode)" if args.device == "cuda" else " (CPU pipeline)")
    return "fastkd torch loader (PIL decode in workers)"


# ---- the modes ------------------------------------------------------------------------------
def run_engine(args, mode: str) -> dict:
    """One fastkd mode: a real 2-epoch ``fastkd train`` run; the second epoch is timed."""
    from fastkd.engine import make_config, train

    with tempfile.TemporaryDirectory(prefix="bench_engine_") as out:
        common = dict(student=args.student, batch_size=args.batch_size, image_size=args.image_size, epochs=2,
                      amp=args.amp, channels_last=True, compile=(mode == "fastkd-compile"), lr=0.1,
                      device=args.device, output=out, log_interval=10**9, workers=args.workers)
        if args.data == "synthetic":
            common.update(data_backend="synthetic", synthetic_samples=args.steps * args.batch_size,
                          synthetic_classes=args.classes)
        else:
            # An epoch of at least --steps batches: the folder's files listed as often as needed
            # (a "path label" list, which create_loader reads like a folder).
            from fastkd.bench.data import write_epoch_list
            from fastkd.data import build_index

            n = len(build_index(args.data, train=True))
            repeat = -(-args.steps * args.batch_size // n)
            common.update(data=str(write_epoch_list(Path(args.data), repeat)))
        if mode == "student-only":
            cfg = make_config(**common, method="ce")
        else:
            cfg = make_config(**common, method="kd", teacher=args.teacher, random_teacher=True,
                              teacher_cuda_graph=(mode == "fastkd-graph"), sequential=(mode == "fastkd-sequential"))
        result = train(cfg)
    timed = result["epochs"][-1]
    return {"images_per_s": timed["images_per_s"], "step_time_ms": timed["step_time_ms"],
            "steps": timed["steps_this_session"]}


def run_teacher_only(args) -> dict:
    from fastkd.engine.runner import TeacherRunner
    from fastkd.models import create_model

    torch.backends.cudnn.benchmark = True
    runner = TeacherRunner(create_model(args.teacher, args.classes), torch.device(args.device),
                           amp_dtype=AMP[args.amp], channels_last=True)
    batches = [x.contiguous(memory_format=torch.channels_last) for x, _ in _synthetic_batches(args)]
    i = 0

    def step():
        nonlocal i
        runner(batches[i % len(batches)])
        i += 1

    _time(step, args.warmup, args.device)
    seconds = _time(step, args.steps, args.device)
    return {"images_per_s": args.steps * args.batch_size / seconds}


def run_naive(args, fair: bool) -> dict:
    """An eager KD loop: teacher forward then the student on one stream (see MODES)."""
    from fastkd.models import create_model

    torch.backends.cudnn.benchmark = True
    fmt = torch.channels_last if fair else torch.contiguous_format
    teacher = create_model(args.teacher, args.classes).to(args.device, memory_format=fmt).eval()
    student = create_model(args.student, args.classes).to(args.device, memory_format=fmt).train()
    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4,
                          **({"fused": True} if fair else {}))
    amp = AMP[args.amp]
    batches = _batches(args, fmt)
    T = 1.0

    def step():
        x, y = next(batches)
        x = x.contiguous(memory_format=fmt)
        with torch.no_grad(), torch.autocast(args.device, dtype=amp, enabled=amp is not None):
            t = teacher(x)
        with torch.autocast(args.device, dtype=amp, enabled=amp is not None):
            s = student(x)
        if fair:
            kd = F.kl_div(F.log_softmax(s.float() / T, 1), F.log_softmax(t.float() / T, 1), reduction="batchmean",
                          log_target=True)
        else:
            kd = F.kl_div(F.log_softmax(s.float() / T, 1), F.softmax(t.float() / T, 1), reduction="batchmean")
        loss = 0.5 * F.cross_entropy(s.float(), y) + 0.5 * kd * T * T
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    wall = args.data != "synthetic"
    _time(step, args.warmup, args.device, wall)
    seconds = _time(step, args.steps, args.device, wall)
    return {"images_per_s": args.steps * args.batch_size / seconds}


DRY_RUN_SKIPS = {"fastkd-graph": "CUDA graphs need a GPU",
                 "fastkd-compile": "torch.compile of two ResNets on the CPU takes minutes"}


def run_mode(args, mode: str) -> dict:
    if args.dry_run and mode in DRY_RUN_SKIPS:
        return {"skipped": f"dry run: {DRY_RUN_SKIPS[mode]}"}
    if mode == "teacher-only":
        return run_teacher_only(args)
    if mode in ("naive", "naive-fair"):
        return run_naive(args, fair=(mode == "naive-fair"))
    return run_engine(args, mode)


# ---- the table ------------------------------------------------------------------------------
def summarise(rows: dict) -> dict:
    """The derived numbers: sum-of-parts bound, the teacher stream's gain, speed-ups."""
    ips = {m: r["images_per_s"] for m, r in rows.items() if "images_per_s" in r}
    out = {}
    if "student-only" in ips and "teacher-only" in ips:
        out["sum_of_parts_bound"] = 1.0 / (1.0 / ips["student-only"] + 1.0 / ips["teacher-only"])
    if "fastkd-concurrent" in ips and "fastkd-sequential" in ips:
        out["stream_gain"] = ips["fastkd-concurrent"] / ips["fastkd-sequential"]
    if "naive-fair" in ips and "naive" in ips:
        out["fair_vs_naive"] = ips["naive-fair"] / ips["naive"]
    return out


def table(rows: dict, derived: dict, header: list) -> str:
    bound = derived.get("sum_of_parts_bound")
    fair = rows.get("naive-fair", {}).get("images_per_s")
    naive = rows.get("naive", {}).get("images_per_s")
    lines = header + ["", "| mode | what it is | images/s | vs fair naive | vs sum-of-parts bound | vs naive (NCHW) |",
                      "|---|---|---:|---:|---:|---:|"]

    def ratio(x, base):
        return f"{x / base:.2f}x" if base else "-"

    for mode, r in rows.items():
        if "images_per_s" not in r:
            lines.append(f"| {mode} | {MODES[mode]} | " + (f"skipped: {r['skipped']}" if "skipped" in r
                         else f"failed: {r.get('error', '?')}") + " | | | |")
            continue
        x = r["images_per_s"]
        lines.append(f"| {mode} | {MODES[mode]} | {x:.0f} | {ratio(x, fair)} | {ratio(x, bound)} | {ratio(x, naive)} |")
    if bound:
        lines.append(f"| bound | sum of parts 1/(1/A + 1/B) | {bound:.0f} | {ratio(bound, fair)} | 1.00x | "
                     f"{ratio(bound, naive)} |")
    if "stream_gain" in derived:
        lines.append(f"\nteacher stream's own gain (fastkd-concurrent / fastkd-sequential): {derived['stream_gain']:.3f}x")
    if "fair_vs_naive" in derived:
        lines.append(f"fair naive / naive (channels_last + fused SGD + log-target KL alone): {derived['fair_vs_naive']:.2f}x")
    for mode in ("fastkd-concurrent", "fastkd-sequential"):
        if "step_time_ms" in rows.get(mode, {}):
            lines.append(f"\n{mode} step-time breakdown (ms/step): " +
                         ", ".join(f"{k} {v:.2f}" for k, v in rows[mode]["step_time_ms"].items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_engine.py measures GPU throughput and needs CUDA (--dry-run checks it on the CPU)")
    from fastkd.bench.common import machine

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    env = machine(args.device, args.commit)
    data = "synthetic (on the device)" if args.data == "synthetic" else f"JPEG files {args.data}"
    setting = (f"{args.teacher} -> {args.student}, {args.image_size} px, {args.amp}, batch {args.batch_size}, "
               f"data {data}; fastkd reads with: {_loader_name(args)}"
               + ("; naive loops: torchvision ImageFolder + DataLoader" if args.data != "synthetic" else ""))
    path = None
    if not args.no_save:
        slug = re.sub(r"[^a-z0-9]+", "-", env["gpu"].lower()).strip("-")
        path = Path(args.results) if args.results else RESULTS_DIR / f"engine-{slug}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial") if path else None

    def record(rows):
        return {**env, "setting": setting, "args": vars(args), "rows": rows, **summarise(rows),
                "dry_run": args.dry_run}

    rows = {}
    for mode in args.modes:
        t0 = time.perf_counter()
        try:
            rows[mode] = run_mode(args, mode)
            shown = rows[mode]["skipped"] if "skipped" in rows[mode] else f"{rows[mode]['images_per_s']:9.0f} img/s"
        except Exception as exc:  # one failing mode (a compiler error, out of memory) must not lose the others
            rows[mode] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            shown = f"FAILED {rows[mode]['error']}"
            traceback.print_exc()
        if args.device == "cuda":
            torch.cuda.empty_cache()
        print(f"{mode:<18} {shown}   ({time.perf_counter() - t0:.0f} s)", flush=True)
        if partial:  # the modes so far, in case this process is stopped (a visit step's time budget)
            partial.write_text(json.dumps({**record(rows), "partial": True}) + "\n")

    derived = summarise(rows)
    header = [f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, commit {env['commit']}, {env['date']}"
              + (" (DRY RUN on the CPU: the numbers mean nothing)" if args.dry_run else ""), setting]
    text = table(rows, derived, header)
    print("\n" + text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps(record(rows)) + "\n")
        partial.unlink(missing_ok=True)
    return 1 if any("error" in r for r in rows.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
