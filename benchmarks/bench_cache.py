"""The teacher-output cache, side by side in one run: what distilling from a cache costs.

Rows (images/s of the timed epoch of a real ``fastkd train`` run, and their ratios):

* ``student-only``: ``--method ce``, no teacher (the ceiling);
* ``online KD``: ``--method kd`` with the teacher model run by the engine (concurrent stream on CUDA);
* ``cached KD full <dtype>``: ``--method kd --teacher-cache`` of a full-format cache;
* ``cached KD top-K <dtype>``: the same from a top-K cache;

then the cache build rate (``fastkd cache build``, rows/s, data loading included) against
teacher-only inference over the same loader, and the storage per image per epoch of every
format, for this class count and projected to ImageNet-1k (1,281,167 images x 1000 classes).

Each training run has ``--epochs`` epochs (default 2) and the last one is timed (the first
absorbs warm-up: worker start, cuDNN autotuning). Data: ``--data DIR`` (train/ and val/), or a
generated JPEG folder (``--make-data N``: N training images of ``--classes`` classes; small
digit images on the CPU by default, ImageNet-like photos with ``--photos``).

    python benchmarks/bench_cache.py                                   # CPU defaults, ~3 minutes on 2 cores
    python benchmarks/bench_cache.py --device cuda --teacher torchvision:resnet50 \\
        --student torchvision:resnet18 --image-size 224 --batch-size 256 --amp bf16 --channels-last \\
        --make-data 20480 --photos --classes 1000 --workers 12 --data-backend dali

The teacher has random weights (saved to a checkpoint first): speed does not depend on them.
Results: a Markdown table (``--markdown``) and one JSON line appended to ``--jsonl``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

IMAGENET_IMAGES, IMAGENET_CLASSES = 1_281_167, 1000


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", default="fastkd:resnet20")
    p.add_argument("--student", default="fastkd:resnet8")
    p.add_argument("--data", default=None, help="an ImageFolder root holding train/ and val/ (default: generate)")
    p.add_argument("--make-data", type=int, default=2048, metavar="N", help="generated training images")
    p.add_argument("--photos", action="store_true", help="generate ImageNet-like photos (fastkd.bench.data) "
                   "instead of small digit images")
    p.add_argument("--classes", type=int, default=100, help="class count of generated data")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2, help="epochs per training run; the last one is timed")
    p.add_argument("--repeats", type=int, default=3, help="training runs per mode, interleaved round-robin "
                   "(the median is reported: a shared machine drifts)")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--dtype", default="fp16", choices=("fp32", "bf16", "fp16"), help="cache storage dtype")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default="auto")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--data-backend", default="torch", choices=("torch", "dali"))
    p.add_argument("--threads", type=int, default=None, help="torch math threads (default: torch's)")
    p.add_argument("--workdir", default=None, help="where data, caches and runs go (default: a temp folder)")
    p.add_argument("--markdown", default=None, help="write the table here")
    p.add_argument("--jsonl", default=None, help="append the JSON record here")
    p.add_argument("--commit", default=None, help="the commit the measured code is at (default: git rev-parse)")
    p.add_argument("--accuracy", action="store_true", help="instead: the accuracy cost of top-K rows "
                   "on the capacity study's task: KD students from the full teacher rows and from top-K "
                   "rows, K in --accuracy-ks, over --accuracy-seeds")
    p.add_argument("--accuracy-ks", type=int, nargs="+", default=[5, 10, 20])
    p.add_argument("--accuracy-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--accuracy-teacher", default="resnet56")
    p.add_argument("--accuracy-temperature", type=float, default=None, help="KD temperature (default: the "
                   "preset's, 4); top-K rows keep the softmax mass outside the top-K exactly only at T = 1")
    p.add_argument("--accuracy-preset", default="quick", help="fastkd study capacity preset whose data, "
                   "epochs and KD setting are used")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------
def _digit_jpegs(root: Path, n: int, classes: int, size: int) -> None:
    """``n`` small JPEGs (sklearn digits upscaled, class = image number mod ``classes``)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    images = load_digits().images
    for c in range(classes):
        (root / f"c{c:04d}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = (images[i % len(images)] * 255 / 16).astype(np.uint8)
        Image.fromarray(img).resize((size, size)).convert("RGB").save(root / f"c{i % classes:04d}" / f"{i}.jpg",
                                                                       quality=90)


def make_data(args, work: Path) -> Path:
    root = work / "data"
    if (root / "train").is_dir():
        return root
    if args.photos:
        from fastkd.bench.data import make_jpeg_folder

        workers = max(1, os.cpu_count() or 1)
        make_jpeg_folder(root / "train", args.make_data, classes=args.classes, workers=workers)
        make_jpeg_folder(root / "val", args.classes, classes=args.classes, workers=1, seed=1)
    else:
        _digit_jpegs(root / "train", args.make_data, args.classes, max(args.image_size, 16))
        _digit_jpegs(root / "val", args.classes, args.classes, max(args.image_size, 16))
    return root


def _commit(explicit):
    if explicit:
        return explicit
    try:
        root = Path(__file__).resolve().parents[1]
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=7", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (head or "unknown") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine(args) -> dict:
    from fastkd.envinfo import machine as machine_info

    m = machine_info(args.device if args.device.startswith("cuda") and torch.cuda.is_available() else "cpu")
    name = m["gpu"] or f"CPU {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch thread(s)"
    return {"date": m["date"], "device": name, "torch": m["torch"], "cuda": m["cuda"], "python": m["python"],
            "fastkd": m["fastkd"], "commit": _commit(args.commit)}


# --------------------------------------------------------------------------------------------
def common_cfg(args, data: Path) -> dict:
    return dict(data=str(data), data_backend=args.data_backend, batch_size=args.batch_size,
                image_size=args.image_size, workers=args.workers, device=args.device, amp=args.amp,
                channels_last=args.channels_last, seed=0, epochs=args.epochs, log_interval=10**6)


def train_rate(args, data: Path, out: Path, **kw) -> dict:
    from fastkd.engine import config as C
    from fastkd.engine.trainer import train

    cfg = C.make_config(**common_cfg(args, data), student=args.student, output=str(out), **kw)
    cpu0 = time.process_time()
    result = train(cfg)
    cpu = time.process_time() - cpu0
    last = result["epochs"][-1]
    images = sum(r["train_samples"] for r in result["epochs"])
    return {"images_per_s": last["images_per_s"], "epoch_time_s": last["epoch_time_s"],
            "all_epochs": [r["images_per_s"] for r in result["epochs"]],
            # CPU time of this process for the whole run (set-up, every epoch, validation): with
            # --workers 0 every step's work is here, and CPU time is far less sensitive than the
            # wall clock to other jobs on a shared machine
            "images_per_cpu_s": images / max(cpu, 1e-9)}


def teacher_only_rate(args, data: Path, ckpt: Path) -> dict:
    """Teacher inference over the training loader (data loading included), images/s of the last epoch."""
    from fastkd.cache.build import AMP_DTYPES, train_loader
    from fastkd.engine import config as C
    from fastkd.engine import distributed as D
    from fastkd.engine.runner import TeacherRunner
    from fastkd.models import create_model, load_weights

    cfg = C.TrainConfig(**common_cfg(args, data))
    dist = D.init(cfg.device)
    loader = train_loader(cfg, dist, teacher_view=True)
    amp = cfg.amp if cfg.amp != "auto" else ("bf16" if dist.device.type == "cuda" else "none")
    runner = TeacherRunner(load_weights(create_model(args.teacher, len(loader.classes)), ckpt), dist.device,
                           amp_dtype=AMP_DTYPES[amp], channels_last=cfg.channels_last, concurrent=False)
    rate = {}
    for epoch in range(args.epochs):
        loader.set_epoch(epoch)
        n, t0, c0 = 0, time.perf_counter(), time.process_time()
        for batch in loader:
            out = runner(batch.teacher_images if batch.teacher_images is not None else batch.images)
            out.logits.float().cpu()  # what the builder does with every batch (and a sync)
            n += len(batch)
        rate = {"wall": n / (time.perf_counter() - t0), "cpu": n / max(time.process_time() - c0, 1e-9)}
    return rate


def build_rate(args, data: Path, ckpt: Path, out: Path, fmt: str, top_k=None) -> dict:
    from fastkd.cache.build import CacheSpec, build_cache
    from fastkd.engine import config as C

    # check_teacher=False: the teacher's weights are random on purpose (this measures speed only).
    cfg = C.TrainConfig(**common_cfg(args, data), teacher=args.teacher, teacher_checkpoint=str(ckpt),
                        check_teacher=False)
    t0, c0 = time.perf_counter(), time.process_time()
    summary = build_cache(cfg, out, CacheSpec(fmt, args.dtype, top_k))
    rows = len(summary["epochs_built"]) * summary["rows_per_epoch"]
    return {"rows_per_s_last_epoch": summary["rows_per_s"][-1], "total_s": time.perf_counter() - t0,
            "rows_per_cpu_s": rows / max(time.process_time() - c0, 1e-9), "bytes_per_row": summary["bytes_per_row"]}


def storage(classes: int, top_k: int) -> list[dict]:
    from fastkd.cache import store

    rows = []
    for label, fmt, dtype, k in [("full fp32", "full", "fp32", None), ("full bf16/fp16", "full", "fp16", None),
                                 *[(f"top-{kk} fp16", "topk", "fp16", kk) for kk in sorted({5, top_k, 20})]]:
        here = store.bytes_per_row(fmt, dtype, classes, k)
        inet = store.bytes_per_row(fmt, dtype, IMAGENET_CLASSES, k)
        rows.append({"format": label, f"bytes_per_image_C{classes}": here, "bytes_per_image_imagenet": inet,
                     "imagenet_GB_per_epoch": inet * IMAGENET_IMAGES / 1e9})
    return rows


# --------------------------------------------------------------------------------------------
def accuracy_cost(args) -> int:
    """Student top-1 from full teacher rows against top-K rows (docs/methods.md §10).

    The capacity study's task and loop (:mod:`fastkd.analysis.study`): 100 classes of MNIST digit
    pairs, pad-1 shift views whose teacher logits are computed once, KD at T = 4 (CE 0.1 / KD 0.9).
    Every student of a seed starts from the same weights and sees the same batches; only the
    teacher rows differ: dense, or the :class:`~fastkd.losses.compressed.TopKTeacher` of each view's
    row (what a top-K cache stores, in fp32 here so that only the compression differs), which
    :class:`fastkd.DistillLoss` reads directly. Reported: test top-1 mean and SE over seeds, and the
    per-seed paired difference to the full rows (mean and SE).
    """
    import torch.nn.functional as F

    from fastkd.analysis import study as S
    from fastkd.analysis.select import mean_se
    from fastkd.data.mnist import make_digit_pairs
    from fastkd.losses import DistillLoss
    from fastkd.losses.compressed import compress_topk
    from fastkd.models import create_model

    cfg = S.PRESETS[args.accuracy_preset]
    kd = dict(cfg.kd)
    if args.accuracy_temperature is not None:
        kd["temperature"] = args.accuracy_temperature
    t_start = time.perf_counter()
    data = make_digit_pairs(cfg.train_per_class, cfg.val_per_class, cfg.test_per_class, digit_size=cfg.digit_size)
    views = S._views(data.x_train)
    y_tr, x_te, y_te = data.y_train, data.x_test, data.y_test
    C, n = data.num_classes, len(y_tr)
    torch.manual_seed(1)
    teacher = create_model(f"fastkd:{args.accuracy_teacher}", num_classes=C, in_chans=1)
    S.fit(teacher, views, lambda out, idx, view, e: F.cross_entropy(out, y_tr[idx]),
          S.Schedule(n, cfg.teacher_epochs, cfg.batch_size, seed=1000), cfg.teacher_epochs, cfg.lr, cfg.weight_decay)
    logits = torch.stack([S._logits(teacher, views[v]) for v in range(9)])  # (9, N, C)
    teacher_top1 = S._top1(S._logits(teacher, x_te), y_te)
    print(f"teacher {args.accuracy_teacher}: test top-1 {teacher_top1:.4f} ({time.perf_counter() - t_start:.0f} s)",
          flush=True)
    variants = {"full": None, **{f"top-{k}": k for k in args.accuracy_ks}, "labels only (CE, no teacher)": 0}
    rows = {name: [] for name in variants}
    for seed in args.accuracy_seeds:
        torch.manual_seed(seed)
        init = create_model("fastkd:resnet8", num_classes=C, in_chans=1).state_dict()
        sched = S.Schedule(n, cfg.student_epochs, cfg.batch_size, seed=seed)
        for name, k in variants.items():
            model = create_model("fastkd:resnet8", num_classes=C, in_chans=1)
            model.load_state_dict(init)
            loss = DistillLoss("kd", **kd)

            def loss_fn(out, idx, view, e, loss=loss, k=k):
                if k == 0:  # the reference without a teacher
                    return F.cross_entropy(out, y_tr[idx])
                v = logits[view, idx]
                teacher_rows = v if k is None else compress_topk(v, y_tr[idx], k)
                return loss(out, teacher_rows, y_tr[idx])

            S.fit(model, views, loss_fn, sched, cfg.student_epochs, cfg.lr, cfg.weight_decay)
            rows[name].append(S._top1(S._logits(model, x_te), y_te))
            print(f"seed {seed} {name}: test top-1 {rows[name][-1]:.4f}", flush=True)
    info = machine(args)
    lines = [f"Measured {info['date']} at commit {info['commit']} on {info['device']}; torch {info['torch']}.",
             f"Task: fastkd study capacity ({args.accuracy_preset} preset): {data.description}. Teacher "
             f"fastkd:{args.accuracy_teacher} (CE, {cfg.teacher_epochs} epochs, test top-1 {teacher_top1:.4f}); "
             f"students fastkd:resnet8, KD {kd}, {cfg.student_epochs} epochs, seeds {args.accuracy_seeds} "
             f"(same initial weights and batches per seed). Top-K rows per docs/methods.md §10, fp32. "
             f"Wall time {time.perf_counter() - t_start:.0f} s.", "",
             "| teacher rows | student test top-1 (mean +- SE) | paired difference to full (mean +- SE) |",
             "|---|---:|---:|"]
    for name, vals in rows.items():
        m, se = mean_se(vals)
        if name == "full":
            diff = "-"
        else:
            dm, dse = mean_se([a - b for a, b in zip(vals, rows["full"])])
            diff = f"{dm:+.4f} +- {dse:.4f}"
        lines.append(f"| {name} | {m:.4f} +- {se:.4f} | {diff} |")
    _emit(lines, args, {"bench": "cache-topk-accuracy", **info, "teacher_top1": teacher_top1,
                        "student_test_top1": rows, "seeds": args.accuracy_seeds})
    return 0


def _emit(lines: list, args, record: dict) -> None:
    """Print the table; write it to --markdown and append the record to --jsonl when asked."""
    table = "\n".join(lines)
    print("\n" + table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    if args.jsonl:
        with open(args.jsonl, "a") as fh:
            fh.write(json.dumps(record) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.accuracy:
        return accuracy_cost(args)
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="fastkd-bench-cache-")
        work = Path(tmp.name)
    else:
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else make_data(args, work)
    from fastkd.data import build_index
    from fastkd.models import create_model

    classes = len(build_index(data, train=True).classes)
    n_train = len(build_index(data, train=True))
    torch.manual_seed(0)
    ckpt = work / "teacher.pt"
    torch.save(create_model(args.teacher, classes).state_dict(), ckpt)
    top_k = min(args.top_k, classes - 1)
    record = {"bench": "cache", **machine(args), "teacher": args.teacher, "student": args.student,
              "image_size": args.image_size, "batch_size": args.batch_size, "classes": classes, "train_images": n_train,
              "epochs": args.epochs, "dtype": args.dtype, "top_k": top_k, "data_backend": args.data_backend,
              "amp": args.amp, "channels_last": args.channels_last}
    print(f"# {record['device']}; {args.teacher} -> {args.student}, {n_train} images x {classes} classes, "
          f"{args.image_size} px, batch {args.batch_size}", flush=True)

    r = {}
    t = time.perf_counter()
    r["teacher_only"] = teacher_only_rate(args, data, ckpt)
    print(f"teacher-only inference: {r['teacher_only']['wall']:.0f} img/s", flush=True)
    r["build_full"] = build_rate(args, data, ckpt, work / "cache-full", "full")
    r["build_topk"] = build_rate(args, data, ckpt, work / "cache-topk", "topk", top_k)
    print(f"cache build: full {r['build_full']['rows_per_s_last_epoch']:.0f} rows/s, top-{top_k} "
          f"{r['build_topk']['rows_per_s_last_epoch']:.0f} rows/s", flush=True)
    runs = {
        "student-only": dict(method="ce"),
        "online KD": dict(method="kd", teacher=args.teacher, teacher_checkpoint=str(ckpt), check_teacher=False),
        f"cached KD full {args.dtype}": dict(method="kd", teacher_cache=str(work / "cache-full")),
        f"cached KD top-{top_k} {args.dtype}": dict(method="kd", teacher_cache=str(work / "cache-topk")),
    }
    samples = {name: [] for name in runs}
    for rep in range(args.repeats):
        for name, kw in runs.items():  # round-robin: drift of a shared machine hits every mode alike
            res = train_rate(args, data, work / f"run-{name.replace(' ', '-')}-{rep}", **kw)
            samples[name].append(res)
            print(f"{name} (run {rep + 1}): {res['images_per_s']:.0f} img/s, {res['images_per_cpu_s']:.0f} "
                  "img per CPU-s", flush=True)
    rates = {name: {"images_per_s": float(np.median([x["images_per_s"] for x in v])),
                    "images_per_cpu_s": float(np.median([x["images_per_cpu_s"] for x in v])),
                    "runs": [x["images_per_s"] for x in v], "runs_cpu": [x["images_per_cpu_s"] for x in v]}
             for name, v in samples.items()}
    record["seconds"] = time.perf_counter() - t
    record["results"] = {"teacher_only_images_per_s": r["teacher_only"], "build_full": r["build_full"],
                         "build_topk": r["build_topk"], "train": rates, "storage": storage(classes, top_k)}

    a = rates["student-only"]["images_per_s"]
    o = rates["online KD"]["images_per_s"]
    lines = [f"Measured {record['date']} at commit {record['commit']} on {record['device']}; torch {record['torch']}"
             f", fastkd {record['fastkd']}, Python {record['python']}.",
             f"{args.teacher} -> {args.student}, {n_train} training JPEGs x {classes} classes, {args.image_size} px, "
             f"batch {args.batch_size}, {args.data_backend} loader ({args.workers} workers), device {args.device}, "
             f"amp {args.amp}; the last of {args.epochs} epochs timed; median of {args.repeats} interleaved runs "
             "(min-max in brackets).", "",
             "| run | images/s (wall) | / student-only | / online KD | images per CPU-s (whole run) | "
             "/ student-only | / online KD |", "|---|---:|---:|---:|---:|---:|---:|"]
    ac, oc = rates["student-only"]["images_per_cpu_s"], rates["online KD"]["images_per_cpu_s"]
    for name, v in rates.items():
        x, xc = v["images_per_s"], v["images_per_cpu_s"]
        lines.append(f"| {name} | {x:.0f} [{min(v['runs']):.0f}-{max(v['runs']):.0f}] | {x / a:.2f} | {x / o:.2f} | "
                     f"{xc:.0f} [{min(v['runs_cpu']):.0f}-{max(v['runs_cpu']):.0f}] | {xc / ac:.2f} | {xc / oc:.2f} |")
    t_wall, t_cpu = r["teacher_only"]["wall"], r["teacher_only"]["cpu"]
    lines += ["", "| cache build (data loading included) | rows/s (wall, last epoch) | / teacher-only | "
              "rows per CPU-s | / teacher-only |", "|---|---:|---:|---:|---:|",
              f"| teacher-only inference | {t_wall:.0f} | 1.00 | {t_cpu:.0f} | 1.00 |"]
    for key, label in (("build_full", f"build full {args.dtype}"), ("build_topk", f"build top-{top_k} {args.dtype}")):
        x, xc = r[key]["rows_per_s_last_epoch"], r[key]["rows_per_cpu_s"]
        lines.append(f"| {label} | {x:.0f} | {x / t_wall:.2f} | {xc:.0f} | {xc / t_cpu:.2f} |")
    lines += ["", f"| format | bytes/image/epoch (C={classes}) | bytes/image/epoch (C=1000) | ImageNet GB/epoch |",
              "|---|---:|---:|---:|"]
    for s in record["results"]["storage"]:
        lines.append(f"| {s['format']} | {s[f'bytes_per_image_C{classes}']} | {s['bytes_per_image_imagenet']} | "
                     f"{s['imagenet_GB_per_epoch']:.3f} |")
    _emit(lines, args, record)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
