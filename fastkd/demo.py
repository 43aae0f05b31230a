"""``fastkd demo``: capacity mismatch and ATS on a small real-image data set, end to end (about 3.5
minutes on 2 free CPU cores: benchmarks/results/demo-animal-mnist-cpu.md).

1. Writes Animal-MNIST (``--data animal-mnist``, the default: 250 train and 250 test images of each
   of 10 classes of 28 x 28 animal silhouettes, 2,500 test images so that 2 SE of a difference is
   about 2-3 points) or scikit-learn's handwritten digits (``--data digits``: 1,797 images, 360 for
   test) as JPEG files in an ImageNet-style folder (``train/``, ``val/``) in a cache directory
   (once), and carves a stratified validation split (15 %) out of ``train/`` (``holdout/``). Every
   run trains on the rest of ``train/``; ``val/`` is the test split, read only for reporting.
2. Trains two teachers of different capacity with ``fastkd train --method ce``: ``resnet20``
   (0.27 M parameters) and ``resnet8x4`` (1.23 M).
3. Shows each teacher's ATS regime diagnostic on the training images: the share of rows whose
   ATS soft label keeps the label on top (``fastkd analyze`` reports the whole grid).
4. Builds the teacher-output cache of the larger teacher (``fastkd cache build``).
5. Distils a ``resnet8`` student (0.08 M) from each teacher with KD (s = T = 4, CE 0.1 / KD 0.9),
   online; from the larger teacher's cache with KD once more (its speed is reported as a ratio of
   the student-only run, and its weights are compared with the online KD student's, bit for bit),
   with ATS at the released setting (4, 2; CE 0.5 / KD 0.5; s = 1), with ATS at the point chosen on
   the validation split, and with the authors' symmetric baseline (the tau1 = tau2 diagonal, s = 1,
   also chosen on validation); plus the student on labels alone.
6. Prints a table (test top-1 at the last epoch, validation top-1, agreement, KL at T = 1) and
   four sentences computed from those numbers.

Every run is a real ``fastkd train`` run (its config, metrics.jsonl and checkpoints are in the
output directory). With CUDA it uses the GPU paths (bf16, channels_last, the teacher stream).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from pathlib import Path

logger = logging.getLogger("fastkd")

TEACHERS = ("fastkd:resnet20", "fastkd:resnet8x4")  # growing capacity: the last is the larger
STUDENT = "fastkd:resnet8"
KD = {"method": "kd", "temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9}  # CIFAR-100 KD (docs/methods.md §2)
ATS = {"method": "ats", "ce_weight": 0.5, "kd_weight": 0.5, "student_temperature": 1.0}  # released (docs/methods.md §3)
RELEASED = (4.0, 2.0)
ATS_GRID = ((2.0, 1.0), (4.0, 2.0), (6.0, 3.0))
DIAGONAL = (1.0, 2.0)
DATA_SETS = ("animal-mnist", "digits")
DEFAULT_IMAGE_SIZE = {"animal-mnist": 14, "digits": 12}
HOLDOUT = 0.15


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", default="~/.cache/fastkd", help="where the digits JPEG data set is written")
    parser.add_argument("--output", default="runs/demo",
                        help="parent directory of the demo's runs (each demo gets a new time-stamped folder)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--data", default="animal-mnist", choices=DATA_SETS,
                        help="animal-mnist: 2,500 training / 2,500 test images (the animal-mnist wheel); digits: "
                             "scikit-learn's 1,797 digits (360 test images: 2 SE is about 5 points)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="input size in pixels (default 14 for animal-mnist, 28 x 28 images; 12 for digits, 8 x 8)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--teacher-epochs", type=int, default=10)
    parser.add_argument("--student-epochs", type=int, default=5)
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


def _carve(data: Path, out: Path, seed: int) -> tuple[Path, Path]:
    """``out/fit/{train,val}`` (train: ``data/train`` minus the holdout; val: ``data/val``, the test
    split) and ``out/holdout`` (the validation split), as symbolic links to the JPEG files."""
    import torch

    from .analysis.select import carve_validation

    files = sorted((data / "train").glob("*/*.jpg"))
    classes = sorted({f.parent.name for f in files})
    labels = torch.tensor([classes.index(f.parent.name) for f in files])
    fit_idx, hold_idx = carve_validation(labels, HOLDOUT, seed=seed)
    fit, holdout = out / "fit", out / "holdout"
    for folder, idx in ((fit / "train", fit_idx), (holdout, hold_idx)):
        for i in idx.tolist():
            dst = folder / files[i].parent.name / files[i].name
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(files[i].resolve(), dst)
    os.symlink((data / "val").resolve(), fit / "val", target_is_directory=True)
    return fit, holdout


def _run(name: str, out: Path, common: dict, **kw) -> dict:
    from .engine.config import make_config
    from .recipes import train  # the online teacher, or a teacher-output cache

    cfg = make_config(output=str(out / name), **common, **kw)
    t0 = time.perf_counter()
    result = train(cfg)
    return {"run": name, "wall_s": time.perf_counter() - t0, "final": result["final"], "output": result["output"],
            "epochs": cfg.epochs}


def _evaluate(checkpoint: Path, model_name: str, folder: Path, image_size: int, device,
              num_classes: int) -> tuple[float, str]:
    """Top-1 (%) of a checkpoint on an image folder, with the evaluation transform of training,
    and the loader that read the images (``"torch loader, PIL"``)."""
    import torch

    from .data import create_loader
    from .models import create_model, load_weights

    loader = create_loader(folder, train=False, batch_size=256, image_size=image_size, backend="torch",
                           device=str(device), num_threads=0)
    model = load_weights(create_model(model_name, num_classes=num_classes), checkpoint).to(device).eval()
    correct = 0
    with torch.inference_mode():
        for b in loader:
            correct += int((model(b.images).argmax(1) == b.labels.to(device)).sum())
    return 100.0 * correct / loader.num_samples, loader.description


def _teacher_columns(checkpoint: Path, teacher: str, teacher_checkpoint: Path, folder: Path, args, device,
                     num_classes: int) -> dict:
    """``teacher_top1``, ``agreement`` and ``kl`` of a student trained from the teacher cache (its
    run has no teacher model to validate with): the trainer's own validation function on the test
    folder, the teacher loaded from its checkpoint."""
    from .data import create_loader
    from .engine.meters import evaluate
    from .engine.parts import AMP_DTYPES
    from .engine.runner import TeacherRunner
    from .models import create_model, load_weights

    loader = create_loader(folder, train=False, batch_size=args.batch_size, image_size=args.image_size,
                           backend="torch", device=str(device), num_threads=0)
    student = load_weights(create_model(STUDENT, num_classes=num_classes), checkpoint).to(device)
    teacher_model = load_weights(create_model(teacher, num_classes=num_classes), teacher_checkpoint)
    amp = AMP_DTYPES["bf16" if device.type == "cuda" else "none"]  # the runs' --amp auto
    m = evaluate(student, loader, device, teacher=TeacherRunner(teacher_model, device, amp_dtype=amp), amp_dtype=amp)
    return {k: m[k] for k in ("teacher_top1", "agreement", "kl")}


def _same_weights(a: Path, b: Path) -> bool:
    """Whether two runs' checkpoints hold the same student weights, bit for bit."""
    import torch

    wa, wb = (torch.load(p, map_location="cpu", weights_only=True)["model"] for p in (a, b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _diagnostic(ckpts: dict, folder: Path, image_size: int, device, num_classes: int) -> dict:
    """Per teacher, the ATS regime diagnostic on the (fit) training images."""
    from .analysis import metrics as M
    from .analysis.report import analyze
    from .data import create_loader
    from .models import create_model, load_weights

    loader = create_loader(folder, train=False, batch_size=256, image_size=image_size, backend="torch",
                           device=str(device), num_threads=0)
    models = {name.split(":")[1]: load_weights(create_model(name, num_classes=num_classes), path).to(device)
              for name, path in ckpts.items()}
    t1s = sorted({p[0] for p in ATS_GRID} | set(DIAGONAL))
    t2s = sorted({p[1] for p in ATS_GRID} | set(DIAGONAL))
    res = analyze(models, loader, [M.SoftLabel(temperature=4.0)], device=device, ats_grid=(t1s, t2s))
    return {k: {"accuracy": t["accuracy"], "loader": loader.backend, "decoder": loader.decoder,
                "ats_label_on_top": t["ats_label_on_top"], "wrong_target_ratio": t["wrong_target_ratio"]}
            for k, t in res["teachers"].items()}


def main(args: argparse.Namespace) -> int:
    import torch

    from .data import make_digits_imagefolder
    from .engine.distributed import resolve_device

    if args.image_size is None:
        args.image_size = DEFAULT_IMAGE_SIZE[args.data]
    for name in ("image_size", "batch_size", "teacher_epochs", "student_epochs"):
        if getattr(args, name) < 1:
            raise ValueError(f"fastkd demo: --{name.replace('_', '-')} must be >= 1")
    if args.threads is not None and args.threads < 1:  # 0 was taken as 1, a negative count failed in torch
        raise ValueError(f"fastkd demo: --threads must be >= 1, got {args.threads}")
    device = resolve_device(args.device)
    if device.type == "cpu":
        threads = args.threads or 1
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
            logger.info("fastkd demo: using %d CPU thread(s) for the math (--threads to change; speed only)", threads)
    elif args.threads:
        torch.set_num_threads(args.threads)

    t_start = time.perf_counter()
    if args.data == "animal-mnist":
        from .data.animal import make_animal_imagefolder

        data = make_animal_imagefolder(Path(args.cache_dir).expanduser() / "animal-mnist-jpeg-28", size=28,
                                       seed=args.seed)
    else:
        data = make_digits_imagefolder(Path(args.cache_dir).expanduser() / "digits-jpeg-32", size=32, seed=args.seed)
    out = Path(args.output) / time.strftime("demo-%Y%m%d-%H%M%S")
    fit, holdout = _carve(data, out / "data", args.seed)
    gpu = device.type == "cuda"
    workers = args.workers if args.workers is not None else (4 if gpu else 1)
    common = dict(data=str(fit), data_backend=args.data_backend, image_size=args.image_size,
                  batch_size=args.batch_size, lr=args.lr,
                  weight_decay=5e-4, warmup_epochs=1.0 if min(args.teacher_epochs, args.student_epochs) > 1 else 0.0,
                  seed=args.seed, device=str(device), workers=workers,
                  channels_last=gpu, log_interval=10_000)
    logger.info("fastkd demo: %s JPEG data set in %s, runs in %s, device %s", args.data, data, out, device)
    n_test = sum(1 for _ in (data / "val").glob("*/*.jpg"))
    num_classes = len([p for p in (data / "train").iterdir() if p.is_dir()])

    rows = []
    teacher_ckpt = {}
    for teacher in TEACHERS:
        short = teacher.split(":")[1]
        r = _run(f"teacher-{short}", out, common, student=teacher, method="ce", epochs=args.teacher_epochs)
        teacher_ckpt[teacher] = Path(r["output"]) / "last.pt"
        rows.append({**r, "student": short, "teacher": "-", "method": "ce (teacher)", "key": f"teacher {short}"})
    diag = _diagnostic(teacher_ckpt, fit / "train", args.image_size, device, num_classes)

    s_short = STUDENT.split(":")[1]
    large = TEACHERS[-1]
    l_short = large.split(":")[1]

    # The larger teacher's outputs once, in a teacher-output cache: the KD student trains from it
    # beside its online twin (the speed ratio; the same weights bit for bit), and the ATS and
    # diagonal students read it instead of running the teacher five more times.
    from .cache.build import CacheSpec, build_cache
    from .engine.config import make_config

    cache_dir = out / f"cache-{l_short}"
    t0 = time.perf_counter()
    build_cache(make_config(output=str(out / "cache-build"), **common, student=STUDENT, teacher=large,
                            teacher_checkpoint=str(teacher_ckpt[large]), epochs=args.student_epochs, **KD),
                cache_dir, CacheSpec())
    cache_build_s = time.perf_counter() - t0
    name = f"kd-from-{l_short}-cached"
    jobs = [("ce", None, {"method": "ce"}, False)]
    jobs += [(f"kd-from-{t.split(':')[1]}", t, KD, False) for t in TEACHERS]
    jobs += [(name, large, KD, True)]
    jobs += [(f"ats{a:g},{b:g}-from-{l_short}", large, {**ATS, "tau_target": a, "tau_other": b}, True)
             for a, b in ATS_GRID]
    jobs += [(f"diagonal{t:g}-from-{l_short}", large, {**ATS, "tau_target": t, "tau_other": t}, True)
             for t in DIAGONAL]
    for key, teacher, params, cached in jobs:
        extra = ({} if teacher is None else {"teacher_cache": str(cache_dir)} if cached
                 else {"teacher": teacher, "teacher_checkpoint": str(teacher_ckpt[teacher])})
        r = _run(f"student-{s_short}-{key}", out, common, student=STUDENT, epochs=args.student_epochs, **extra,
                 **params)
        r["holdout_top1"], r["holdout_loader"] = _evaluate(Path(r["output"]) / "last.pt", STUDENT, holdout,
                                                           args.image_size, device, num_classes)
        if cached:  # no teacher model in the run: its teacher columns from the same evaluation, afterwards
            r["final"].update(_teacher_columns(Path(r["output"]) / "last.pt", large, teacher_ckpt[large], fit / "val",
                                               args, device, num_classes))
        rows.append({**r, "student": s_short, "cached": cached,
                     "teacher": (teacher.split(":")[1] + (" cache" if cached else "")) if teacher else "-",
                     "method": _method_label(params), "key": key, "params": params})

    students = [r for r in rows if r["key"] not in ("ce", name) and not r["key"].startswith("teacher")]
    ats_rows = [r for r in students if r["key"].startswith("ats")]
    diag_rows = [r for r in students if r["key"].startswith("diagonal")]
    pick = lambda rs: max(rs, key=lambda r: (r["holdout_top1"], -r["params"]["tau_target"]))  # noqa: E731
    ats_sel, diag_sel = pick(ats_rows), pick(diag_rows)
    ats_sel["selected"] = diag_sel["selected"] = True
    by_key = {r["key"]: r for r in rows}
    speed = lambda key: by_key[key]["final"]["images_per_s"]  # noqa: E731
    numbers = {
        "n_test": n_test,
        "ce": by_key["ce"]["final"]["val_top1"],
        "kd": {t.split(":")[1]: by_key[f"kd-from-{t.split(':')[1]}"]["final"]["val_top1"] for t in TEACHERS},
        "ats_released": by_key[f"ats{RELEASED[0]:g},{RELEASED[1]:g}-from-{l_short}"]["final"]["val_top1"],
        "ats_selected": ats_sel["final"]["val_top1"],
        "ats_selected_point": (ats_sel["params"]["tau_target"], ats_sel["params"]["tau_other"]),
        "diagonal_selected": diag_sel["final"]["val_top1"],
        "diagonal_selected_t": diag_sel["params"]["tau_target"],
        "large": l_short, "small": TEACHERS[0].split(":")[1],
        "speed": {"ce": speed("ce"), "kd_online": speed(f"kd-from-{l_short}"), "kd_cached": speed(name)},
        "kd_cached": by_key[name]["final"]["val_top1"], "cache_build_s": cache_build_s,
        "kd_cached_same_weights": _same_weights(Path(by_key[f"kd-from-{l_short}"]["output"]) / "last.pt",
                                                Path(by_key[name]["output"]) / "last.pt"),
    }

    print("\n" + format_diagnostic(diag, ats_sel))
    print("\n" + format_table(rows, args.student_epochs, args.teacher_epochs))
    print("\n" + "\n".join(conclusions(numbers)))
    total = time.perf_counter() - t_start
    print(f"\n{len(rows)} runs and one cache build in {total:.0f} s on {device}; chance level is 10%; the test "
          f"split is {n_test} images "
          f"(val/), the validation split {HOLDOUT:.0%} of train/ (holdout/). Runs, configs and metrics: {out}")
    summary = [{k: v for k, v in row.items()} for row in rows]
    (out / "demo_results.json").write_text(json.dumps(
        {"device": str(device), "data_backend": args.data_backend, "total_s": total, "diagnostic": diag, "numbers": numbers,
         "conclusions": conclusions(numbers), "runs": summary}, indent=2, default=str))
    return 0


def _method_label(p: dict) -> str:
    if p["method"] == "ce":
        return "ce (labels only)"
    if p["method"] == "kd":
        return f"kd T={p['temperature']:g} s={p['temperature']:g}"
    a, b = p["tau_target"], p["tau_other"]
    kind = "diagonal" if a == b else "ats"
    return f"{kind} ({a:g},{b:g}) s={p['student_temperature']:g}"


def format_diagnostic(diag: dict, ats_sel: dict) -> str:
    a, b = ats_sel["params"]["tau_target"], ats_sel["params"]["tau_other"]
    lines = ["Teachers' ATS regime on the training images (ATS keeps the label on top of its soft label only while "
             "(largest wrong logit)/(target logit) < tau2/tau1 for row-centred logits):"]
    for k, d in diag.items():
        r = d["wrong_target_ratio"]
        loader = f" ({d['loader']} loader, {d['decoder']})" if "loader" in d else ""
        lines.append(f"  {k}: train top-1 {100 * d['accuracy']:.1f}%{loader}; label on top under the released ATS(4,2) "
                     f"(tau2/tau1 0.5) {100 * d['ats_label_on_top']['4,2']:.1f}% of rows, under the chosen "
                     f"ATS({a:g},{b:g}) (tau2/tau1 {b / a:.2g}) {100 * d['ats_label_on_top'][f'{a:g},{b:g}']:.1f}%; "
                     f"wrong/target ratio median {r['q50']:.3f} (q95 {r['q95']:.3f})")
    return "\n".join(lines)


def format_table(rows: list[dict], student_epochs: int, teacher_epochs: int) -> str:
    head = ("run", "test top-1", "val top-1", "teacher test", "agreement", "KL(t||s) T=1", "images/s", "time")
    lines = [head]
    for r in rows:
        f = r["final"]
        teacher = f.get("teacher_top1")
        name = f"{r['student']} <- {r['teacher']} [{r['method']}]" if r["teacher"] != "-" else \
            f"{r['student']} [{r['method']}]"
        lines.append((
            name + (" *" if r.get("selected") else ""),
            f"{f['val_top1']:.1f}%",
            f"{r['holdout_top1']:.1f}%" if "holdout_top1" in r else "-",
            f"{teacher:.1f}%" if teacher is not None else "-",
            f"{f['agreement']:.1f}%" if "agreement" in f else "-",
            f"{f['kl']:.3f}" if "kl" in f else "-",
            f"{f['images_per_s']:.0f}",
            f"{r['wall_s']:.0f} s",
        ))
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    def fmt(row):
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(row, widths))) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    note = (f"Numbers of the last epoch ({student_epochs} of {student_epochs} for students, {teacher_epochs} of "
            f"{teacher_epochs} for teachers): 'test' is val/, 'val' the validation split carved from train/. "
            "KL(t||s) is KL(sm(v)||sm(z)) at temperature 1 on the test images (the KL the training loss uses differs: "
            "T=4 for KD, the ATS temperatures for ATS). * = chosen by validation top-1 (ATS grid, diagonal).")
    if any(r.get("cached") for r in rows):
        note += (" '<- T cache' rows trained from the teacher-output cache of T (no teacher forward); their teacher "
                 "columns come from the same validation function, run on the final weights after training.")
    # Decoders differ slightly (DALI vs PIL): name the loader behind each column.
    test_loaders = sorted({f"{r['final']['loader']} loader, {r['final']['decoder']}" for r in rows
                           if "loader" in r["final"]})
    val_loaders = sorted({r["holdout_loader"] for r in rows if "holdout_loader" in r})
    if test_loaders or val_loaders:
        note += (" Images read by: 'test' and 'teacher test' the " + (" / ".join(test_loaders) or "-")
                 + "; 'val' the " + (" / ".join(val_loaders) or "-") + ".")
    return "\n".join([fmt(lines[0]), sep] + [fmt(row) for row in lines[1:]] + [note])


def _versus(a: float, b: float, n: int) -> tuple[str, float]:
    """'above' / 'below' / 'within noise of': a difference of two test accuracies (percent) on
    ``n`` images against 2 binomial standard errors of that difference (one run each)."""
    pa, pb = a / 100, b / 100
    se = 100 * math.sqrt(max(pa * (1 - pa) + pb * (1 - pb), 1e-12) / n)
    d = a - b
    return ("above" if d > 2 * se else "below" if d < -2 * se else "within noise of"), se


def conclusions(x: dict) -> list[str]:
    """Four sentences, each computed from the demo's own numbers (nothing hard-coded to an answer)."""
    n = x["n_test"]
    out = []
    kd_l, kd_s = x["kd"][x["large"]], x["kd"][x["small"]]
    word, se = _versus(kd_l, kd_s, n)
    out.append(f"Capacity: the KD student of the larger teacher ({x['large']}) reached {kd_l:.1f}%, {word} the "
               f"{kd_s:.1f}% of the smaller teacher's ({x['small']}) (2 SE = {2 * se:.1f} points on {n} test images).")
    a, b = x["ats_selected_point"]
    w_kd, _ = _versus(x["ats_selected"], kd_l, n)
    w_dg, _ = _versus(x["ats_selected"], x["diagonal_selected"], n)
    out.append(f"ATS chosen on validation ({a:g},{b:g}) reached {x['ats_selected']:.1f}%: {w_kd} KD at s = T "
               f"({kd_l:.1f}%) and {w_dg} the s = 1 diagonal chosen the same way (t = {x['diagonal_selected_t']:g}, "
               f"{x['diagonal_selected']:.1f}%).")
    w_ce, _ = _versus(x["ats_released"], x["ce"], n)
    w_kdce, _ = _versus(kd_l, x["ce"], n)
    out.append(f"Against labels alone ({x['ce']:.1f}%): ATS at the released (4,2) reached {x['ats_released']:.1f}% "
               f"({w_ce} it), KD from {x['large']} {kd_l:.1f}% ({w_kdce} it). One run each: differences inside "
               f"2 SE are noise, not findings.")
    sp = x["speed"]
    w_cache, _ = _versus(x["kd_cached"], kd_l, n)
    out.append(f"Speed: KD from the teacher cache ran at {sp['kd_cached']:.0f} images/s, "
               f"{sp['kd_cached'] / sp['ce']:.2f}x the student-only run ({sp['ce']:.0f} images/s); online KD from "
               f"{x['large']} ran at {sp['kd_online'] / sp['ce']:.2f}x (building the cache took "
               f"{x['cache_build_s']:.0f} s). Its student reached {x['kd_cached']:.1f}%, {w_cache} the online KD "
               f"student's {kd_l:.1f}%, "
               + ("with the same weights bit for bit; the ATS and diagonal students read the same cache."
                  if x["kd_cached_same_weights"] else
                  "but with other weights (the cached teacher rows are not exactly the online teacher's here); the "
                  "ATS and diagonal students read the same cache."))
    return out
