"""End-to-end distillation throughput: fastkd's engine against the ways KD is usually run.

Images/s of teacher -> student distillation (default torchvision ResNet-50 -> ResNet-18, random
init, 224 px, bf16, batch 256) for:

* ``fastkd-concurrent``: ``fastkd train`` (the engine itself): channels_last, bf16, fused SGD,
  fused Triton KD loss, the teacher one batch ahead on its own CUDA stream (``--teacher-cuda-graph``
  optional);
* ``fastkd-sequential``: the same engine with ``--sequential`` (teacher in order, one stream);
* ``naive``: an eager KD loop as common KD frameworks write it: teacher forward under
  ``no_grad`` then the student on one stream, NCHW, ``torch.optim.SGD`` defaults,
  ``F.kl_div`` + ``F.cross_entropy`` (bf16 autocast, as for the others); fed by a
  torchvision ``ImageFolder`` DataLoader on JPEGs, or by the same synthetic GPU batches;
* ``student-only``: the engine training the student alone (``--method ce``): A;
* ``teacher-only``: the engine's teacher runner alone (inference): B;

and prints the sum-of-parts bound ``1 / (1/A + 1/B)``: the rate of running the two jobs back to
back with no overhead. At or above the bound means distillation costs nothing beyond its two
parts; above it means the streams overlap work that either part alone leaves idle.

Data: ``--data synthetic`` (default: random batches made on the GPU, so only the models are
measured) or ``--data DIR`` (an ImageFolder tree with train/; fastkd reads it with DALI when
installed, else its torch loader with GPU JPEG decoding).

Each fastkd mode is a real ``fastkd train`` run of 2 epochs of ``--steps`` steps; the second
epoch is timed (the first absorbs cuDNN autotuning, CUDA-graph capture and compilation). The
naive and teacher-only loops warm up for ``--warmup`` steps and are timed over ``--steps`` with
CUDA events. Rows are appended to ``benchmarks/results/engine-<gpu>.jsonl`` with the GPU name,
versions and date; ``--markdown FILE`` also writes the table.

    python benchmarks/bench_engine.py --steps 30
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import re
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MODES = ("fastkd-concurrent", "fastkd-sequential", "naive", "student-only", "teacher-only")


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
    p.add_argument("--amp", default="bf16", choices=("bf16", "fp16", "none"))
    p.add_argument("--teacher-cuda-graph", action="store_true", help="fastkd modes capture the teacher as a CUDA graph")
    p.add_argument("--compile", action="store_true", help="fastkd modes torch.compile both models")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--workers", type=int, default=8, help="loader workers (JPEG data)")
    p.add_argument("--markdown", default=None, help="also write the table to this file")
    p.add_argument("--no-save", action="store_true", help="do not append to benchmarks/results/engine-<gpu>.jsonl")
    return p.parse_args(argv)


def _sync_time(fn, steps: int) -> float:
    """Seconds for ``steps`` calls of ``fn`` measured with CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000.0


def _synthetic_batches(args, n=4):
    """A few random batches on the GPU, cycled (the models are what is measured)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    return [(torch.randn(args.batch_size, 3, args.image_size, args.image_size, device="cuda", generator=g),
             torch.randint(args.classes, (args.batch_size,), device="cuda", generator=g)) for _ in range(n)]


def run_engine(args, mode: str) -> dict:
    """One fastkd mode: a real 2-epoch ``fastkd train`` run; the second epoch is timed."""
    from fastkd.engine import make_config, train

    with tempfile.TemporaryDirectory(prefix="bench_engine_") as out:
        common = dict(student=args.student, batch_size=args.batch_size, image_size=args.image_size, epochs=2,
                      amp=args.amp, channels_last=True, compile=args.compile, lr=0.1, device="cuda",
                      output=out, log_interval=10**9, workers=args.workers)
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
            cfg = make_config(**common, method="kd", teacher=args.teacher, teacher_cuda_graph=args.teacher_cuda_graph,
                              sequential=(mode == "fastkd-sequential"))
        result = train(cfg)
    timed = result["epochs"][-1]
    return {"images_per_s": timed["images_per_s"], "step_time_ms": timed["step_time_ms"],
            "steps": timed["steps_this_session"]}


def run_teacher_only(args) -> dict:
    from fastkd.engine.runner import TeacherRunner
    from fastkd.models import create_model

    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[args.amp]
    torch.backends.cudnn.benchmark = True
    runner = TeacherRunner(create_model(args.teacher, args.classes), torch.device("cuda"), amp_dtype=amp,
                           channels_last=True, cuda_graph=args.teacher_cuda_graph, compile=args.compile)
    batches = [x.contiguous(memory_format=torch.channels_last) for x, _ in _synthetic_batches(args)]
    i = 0

    def step():
        nonlocal i
        runner(batches[i % len(batches)])
        i += 1

    _sync_time(step, args.warmup)
    seconds = _sync_time(step, args.steps)
    return {"images_per_s": args.steps * args.batch_size / seconds}


def _naive_jpeg_batches(args):
    """torchvision ImageFolder + DataLoader, the usual PyTorch ImageNet input pipeline."""
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    tf = T.Compose([T.RandomResizedCrop(args.image_size), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    root = Path(args.data)
    ds = ImageFolder(str(root / "train" if (root / "train").is_dir() else root), transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                                         pin_memory=True, drop_last=True, persistent_workers=args.workers > 0)
    while True:
        for x, y in loader:
            yield x.cuda(non_blocking=True), y.cuda(non_blocking=True)


def run_naive(args) -> dict:
    """Eager KD as common frameworks write it: teacher then student, one stream, NCHW, stock SGD."""
    from fastkd.models import create_model

    torch.backends.cudnn.benchmark = True
    teacher = create_model(args.teacher, args.classes).cuda().eval()
    student = create_model(args.student, args.classes).cuda().train()
    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[args.amp]
    if args.data == "synthetic":
        pool = _synthetic_batches(args)
        batches = (pool[i % len(pool)] for i in range(10**9))
    else:
        batches = _naive_jpeg_batches(args)
    T = 1.0

    def step():
        x, y = next(batches)
        with torch.no_grad(), torch.autocast("cuda", dtype=amp, enabled=amp is not None):
            t = teacher(x)
        with torch.autocast("cuda", dtype=amp, enabled=amp is not None):
            s = student(x)
        kd = F.kl_div(F.log_softmax(s.float() / T, 1), F.softmax(t.float() / T, 1), reduction="batchmean") * T * T
        loss = 0.5 * F.cross_entropy(s.float(), y) + 0.5 * kd
        opt.zero_grad()
        loss.backward()
        opt.step()

    _sync_time(step, args.warmup)
    if args.data == "synthetic":
        seconds = _sync_time(step, args.steps)
    else:  # host-side waits for the loader must count: wall clock around a synchronised loop
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    return {"images_per_s": args.steps * args.batch_size / seconds}


def environment() -> dict:
    import fastkd

    info = {"gpu": torch.cuda.get_device_name(), "torch": str(torch.__version__), "cuda": torch.version.cuda,
            "fastkd": fastkd.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_engine.py measures GPU throughput and needs CUDA")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    env = environment()
    rows = {}
    for mode in args.modes:
        t0 = time.perf_counter()
        if mode == "teacher-only":
            rows[mode] = run_teacher_only(args)
        elif mode == "naive":
            rows[mode] = run_naive(args)
        else:
            rows[mode] = run_engine(args, mode)
        torch.cuda.empty_cache()
        print(f"{mode:<18} {rows[mode]['images_per_s']:9.0f} img/s   ({time.perf_counter() - t0:.0f} s)", flush=True)

    bound = None
    if "student-only" in rows and "teacher-only" in rows:
        a, b = rows["student-only"]["images_per_s"], rows["teacher-only"]["images_per_s"]
        bound = 1.0 / (1.0 / a + 1.0 / b)
    setting = (f"{args.teacher} -> {args.student}, {args.image_size} px, {args.amp}, batch {args.batch_size}, "
               f"data {'synthetic (GPU)' if args.data == 'synthetic' else args.data}"
               f"{', teacher CUDA graph' if args.teacher_cuda_graph else ''}{', compiled' if args.compile else ''}")
    lines = [f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, {env['date']}", setting, "",
             "| mode | images/s | vs sum-of-parts bound | vs naive |", "|---|---:|---:|---:|"]
    naive = rows.get("naive", {}).get("images_per_s")
    for mode, r in rows.items():
        ips = r["images_per_s"]
        lines.append(f"| {mode} | {ips:.0f} | {ips / bound:.2f}x |" if bound else f"| {mode} | {ips:.0f} | - |")
        lines[-1] += f" {ips / naive:.2f}x |" if naive else " - |"
    if bound:
        lines.append(f"| sum-of-parts bound 1/(1/A+1/B) | {bound:.0f} | 1.00x | {bound / naive:.2f}x |" if naive
                     else f"| sum-of-parts bound 1/(1/A+1/B) | {bound:.0f} | 1.00x | - |")
    for mode in ("fastkd-concurrent", "fastkd-sequential"):
        if mode in rows:
            lines.append(f"\n{mode} step-time breakdown (ms/step): " +
                         ", ".join(f"{k} {v:.2f}" for k, v in rows[mode]["step_time_ms"].items()))
    table = "\n".join(lines)
    print("\n" + table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    if not args.no_save:
        slug = re.sub(r"[^a-z0-9]+", "-", env["gpu"].lower()).strip("-")
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        with open(RESULTS_DIR / f"engine-{slug}.jsonl", "a") as fh:
            fh.write(json.dumps({**env, "setting": setting, "args": vars(args), "rows": rows,
                                 "sum_of_parts_bound": bound}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
