"""``fastkd demo``: capacity mismatch and ATS on a small real-image data set, end to end.

1. Writes scikit-learn's handwritten digits (1,797 real images, 10 classes) as JPEG files in an
   ImageNet-style folder (``train/``, ``val/``) in a cache directory (once).
2. Trains two teachers of different capacity with ``fastkd train --method ce``: the CIFAR-style
   ``resnet20`` (0.27 M parameters, deep and thin) and ``resnet8x4`` (1.23 M, shallow and wide).
3. Distils a ``resnet8`` student (0.08 M) from each teacher with KD and with ATS, and trains the
   same student without a teacher as the baseline.
4. Prints a table: student and teacher top-1, teacher-student agreement, KL, images/s.

Every run is a real ``fastkd train`` run (its config, metrics.jsonl and checkpoints are in the
output directory). On a CPU the whole demo takes a few minutes on two cores; with CUDA it
uses the GPU paths (bf16, channels_last, the concurrent teacher stream).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

logger = logging.getLogger("fastkd")

TEACHERS = ("fastkd:resnet20", "fastkd:resnet8x4")
STUDENT = "fastkd:resnet8"
# CIFAR-style KD settings (methods.md): CE weight 0.1, KD weight 0.9; KD at T=4, ATS with the
# released asymmetric temperatures (4 on the label, 2 elsewhere) and student temperature 1.
METHODS = {
    "kd": {"temperature": 4.0},
    "ats": {"tau_target": 4.0, "tau_other": 2.0},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", default="~/.cache/fastkd", help="where the digits JPEG data set is written")
    parser.add_argument("--output", default="runs/demo",
                        help="parent directory of the demo's runs (each demo gets a new time-stamped folder)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--image-size", type=int, default=12, help="input size in pixels (the digits are 8 x 8)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--teacher-epochs", type=int, default=8)
    parser.add_argument("--student-epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate of every run (after a 1-epoch warm-up)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for the math (default on CPU: 1, leaving the other core(s) to "
                             "the loader's worker; oversubscribed OpenMP threads slow small convolutions down a lot)")
    parser.add_argument("--workers", type=int, default=None,
                        help="loader workers per run (default: 1 on CPU, beside the one math thread; 4 with CUDA)")
    parser.add_argument("--data-backend", default="torch", choices=("auto", "dali", "torch"),
                        help="loader backend; the digits are 1,437 tiny images, where DALI's per-epoch pipeline "
                             "set-up costs more than it saves")
    parser.add_argument("--seed", type=int, default=0)


def _run(name: str, out: Path, common: dict, **kw) -> dict:
    from .config import make_config
    from .trainer import train

    cfg = make_config(output=str(out / name), **common, **kw)
    t0 = time.perf_counter()
    result = train(cfg)
    final = result["final"]
    return {"run": name, "wall_s": time.perf_counter() - t0, "final": final, "output": result["output"]}


def main(args: argparse.Namespace) -> int:
    import torch

    from ..data import make_digits_imagefolder
    from .distributed import resolve_device

    for name in ("image_size", "batch_size", "teacher_epochs", "student_epochs"):
        if getattr(args, name) < 1:
            raise SystemExit(f"fastkd demo: --{name.replace('_', '-')} must be >= 1")
    device = resolve_device(args.device)
    if device.type == "cpu":
        threads = args.threads or 1
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
            logger.info("fastkd demo: using %d CPU thread(s) for the math (--threads to change; speed only)", threads)
    elif args.threads:
        torch.set_num_threads(args.threads)

    t_start = time.perf_counter()
    data = make_digits_imagefolder(Path(args.cache_dir).expanduser() / "digits-jpeg-32", size=32, seed=args.seed)
    out = Path(args.output) / time.strftime("demo-%Y%m%d-%H%M%S")
    gpu = device.type == "cuda"
    workers = args.workers if args.workers is not None else (4 if gpu else 1)
    common = dict(data=str(data), data_backend=args.data_backend, image_size=args.image_size,
                  batch_size=args.batch_size, lr=args.lr,
                  weight_decay=5e-4, warmup_epochs=1.0 if min(args.teacher_epochs, args.student_epochs) > 1 else 0.0,
                  seed=args.seed, device=str(device), workers=workers,
                  channels_last=gpu, log_interval=10_000)
    logger.info("fastkd demo: digits JPEG data set in %s, runs in %s, device %s", data, out, device)

    rows = []
    teacher_ckpt = {}
    for teacher in TEACHERS:
        short = teacher.split(":")[1]
        r = _run(f"teacher-{short}", out, common, student=teacher, method="ce", epochs=args.teacher_epochs)
        teacher_ckpt[teacher] = str(Path(r["output"]) / "best.pt")
        rows.append({**r, "student": short, "teacher": "-", "method": "ce (teacher)"})
    s_short = STUDENT.split(":")[1]
    r = _run(f"student-{s_short}-ce", out, common, student=STUDENT, method="ce", epochs=args.student_epochs)
    rows.append({**r, "student": s_short, "teacher": "-", "method": "ce (baseline)"})
    for teacher in TEACHERS:
        t_short = teacher.split(":")[1]
        for method, params in METHODS.items():
            r = _run(f"student-{s_short}-{method}-from-{t_short}", out, common, student=STUDENT, teacher=teacher,
                     teacher_checkpoint=teacher_ckpt[teacher], method=method, ce_weight=0.1, kd_weight=0.9,
                     epochs=args.student_epochs, **params)
            rows.append({**r, "student": s_short, "teacher": t_short, "method": method})

    table = format_table(rows)
    print("\n" + table)
    total = time.perf_counter() - t_start
    print(f"\n{len(rows)} runs in {total:.0f} s on {device}; chance level is 10%. Runs, configs and metrics: {out}")
    summary = [{k: v for k, v in row.items()} for row in rows]
    (out / "demo_results.json").write_text(json.dumps({"device": str(device), "total_s": total, "runs": summary},
                                                      indent=2))
    return 0


def format_table(rows: list[dict]) -> str:
    head = ("run", "student top-1", "teacher top-1", "agreement", "KL(t||s)", "images/s", "time")
    lines = [head]
    for r in rows:
        f = r["final"]
        teacher = f.get("teacher_top1")
        lines.append((
            f"{r['student']} <- {r['teacher']} [{r['method']}]" if r["teacher"] != "-" else f"{r['student']} [{r['method']}]",
            f"{f['val_top1']:.1f}%",
            f"{teacher:.1f}%" if teacher is not None else "-",
            f"{f['agreement']:.1f}%" if "agreement" in f else "-",
            f"{f['kl']:.3f}" if "kl" in f else "-",
            f"{f['images_per_s']:.0f}",
            f"{r['wall_s']:.0f} s",
        ))
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    fmt = lambda row: "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(lines[0]), sep] + [fmt(row) for row in lines[1:]])
