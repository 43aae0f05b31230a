"""``fastkd bench data``: images/s of each input pipeline on a folder of ImageNet-like JPEGs.

The folder is generated once (cached, in parallel): crops of scikit-learn's two sample
photographs, jittered and flipped, saved as about 500 x 375 JPEGs of quality 90 (ImageNet's
typical size) in 10 classes. An epoch lists every file ``--epoch-images / --num-images`` times
(a ``path label`` file list; a ``ConcatDataset`` for the baseline), so it is long enough to
measure the steady state that an ImageNet epoch runs in. Every pipeline does the training
preprocessing (random-resized crop to 224, flip, normalise) and hands batches to the device; the
clock starts after ``--warmup-batches`` and stops at the end of the epoch, after a device
synchronisation. Rows:

* ``torchvision``: the plain baseline, ``ImageFolder`` + ``RandomResizedCrop`` / ``ToTensor`` /
  ``Normalize`` + ``DataLoader`` (same workers, pinned memory on CUDA);
* ``fastkd-torch``: fastkd's torch backend (PIL decode in workers, normalisation on the device);
* ``fastkd-torch-gpudec``: the same with nvJPEG decoding through torchvision (CUDA only);
* ``fastkd-dali``: the DALI pipeline (CPU-only on a CPU device; nvJPEG "mixed" decode on CUDA);
* ``synthetic``: random tensors made on the device (the ceiling of the consumer side).

On CUDA it also times a ResNet-50 -> ResNet-18 distillation step at 224 px (bf16 autocast,
channels_last, teacher forward + student forward/backward/SGD step) and reports how many times
faster than that step each pipeline delivers images (the target is at least 2x).

Results are printed as a Markdown table and appended as one JSON line (machine, versions,
date) to ``--results``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .. import _compat

BACKENDS = ("torchvision", "fastkd-torch", "fastkd-torch-gpudec", "fastkd-dali", "synthetic")
_MARKER = ".fastkd_bench_jpegs.json"


def add_arguments(parser) -> None:
    parser.add_argument("--data-dir", default=None,
                        help="where the JPEG folder is generated / cached (default: ~/.cache/fastkd/bench_jpegs_N)")
    parser.add_argument("--num-images", type=int, default=256, help="distinct JPEG files in the folder")
    parser.add_argument("--epoch-images", type=int, default=None,
                        help="samples per epoch, a multiple of --num-images (default: 4 x --num-images)")
    parser.add_argument("--warmup-batches", type=int, default=4, help="batches before the clock starts")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--teacher-image-size", type=int, default=None,
                        help="also cut a teacher view of this size (fastkd backends; KD runs read both)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                        help="output dtype of the fastkd backends (the baseline stays fp32)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last output (fastkd backends)")
    parser.add_argument("--threads", type=int, default=None,
                        help="decoding threads / DataLoader workers (default: the usable CPU cores)")
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help="comma-separated subset of " + ", ".join(BACKENDS))
    parser.add_argument("--between-epochs", type=float, default=2.0,
                        help="seconds of pause before timing the next epoch's first batch (stands in for "
                             "validation and checkpointing)")
    parser.add_argument("--step-batch-size", type=int, default=256,
                        help="batch size of the timed ResNet-50 -> ResNet-18 step (CUDA only)")
    parser.add_argument("--no-step", action="store_true", help="skip timing the distillation step")
    parser.add_argument("--results", default=None,
                        help="JSON-lines file the run is appended to (default: print only)")
    parser.add_argument("--commit", default=None,
                        help="the commit the measured code is at (default: git rev-parse of this checkout)")


# ---- the data set -------------------------------------------------------------------------
_SHAPES = [(500, 375), (375, 500), (500, 333), (500, 400), (480, 360), (333, 500)]


def _write_jpegs(root: str, first: int, last: int, classes: int, seed: int) -> None:
    """Write images ``first..last-1`` (a worker's share; each image has its own generator)."""
    import numpy as np
    from PIL import Image, ImageEnhance
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(p) for p in load_sample_images().images]  # 640 x 427 each
    for i in range(first, last):
        rng = np.random.default_rng([seed, i])
        photo = photos[i % len(photos)]
        w, h = _SHAPES[int(rng.integers(len(_SHAPES)))]
        # a random window of the photo at a random scale, so every file has its own content
        scale = rng.uniform(0.55, 1.0)
        cw, ch = int(photo.width * scale), int(photo.height * scale)
        x0, y0 = int(rng.integers(0, photo.width - cw + 1)), int(rng.integers(0, photo.height - ch + 1))
        img = photo.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.BICUBIC)
        img = ImageEnhance.Color(img).enhance(rng.uniform(0.6, 1.4))
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        img.save(Path(root) / f"class{i % classes:02d}" / f"img{i:05d}.JPEG", quality=90)


def make_jpeg_folder(root, num_images: int, *, classes: int = 10, seed: int = 0, workers: int = 1) -> Path:
    """Write ``num_images`` ImageNet-like JPEGs (about 500 x 375, quality 90) under ``root``; cached."""
    from concurrent.futures import ProcessPoolExecutor

    root = Path(root)
    params = {"num_images": num_images, "classes": classes, "seed": seed, "quality": 90}
    marker = root / _MARKER
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return root
    for c in range(classes):
        (root / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
    step = -(-num_images // max(1, workers))
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        jobs = [pool.submit(_write_jpegs, str(root), a, min(a + step, num_images), classes, seed)
                for a in range(0, num_images, step)]
        for job in jobs:
            job.result()
    marker.write_text(json.dumps(params))
    return root


def write_epoch_list(root: Path, repeat: int) -> Path:
    """A ``path label`` file list naming every image of ``root`` ``repeat`` times."""
    from ..data import build_index

    index = build_index(root, train=True)
    path = root / f"epoch_x{repeat}.txt"
    lines = [f"{p} {label}" for _ in range(repeat) for p, label in zip(index.paths, index.labels)]
    path.write_text("\n".join(lines) + "\n")
    return path


# ---- timing ---------------------------------------------------------------------------------
def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_epoch(make_iter, device, warmup: int) -> tuple[float, int, float]:
    """Iterate one epoch; the clock runs from after ``warmup`` batches to its end.

    Returns (seconds, images, first_batch_s): the last is the latency of the epoch's first batch
    (worker start-up for the torch loaders, building the pipeline for DALI, which does that every
    epoch).
    """
    images, start = 0, None
    t0 = time.perf_counter()
    for i, x in enumerate(make_iter()):
        if i == 0:
            _sync(device)
            first = time.perf_counter() - t0
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        if start is not None:
            images += x.shape[0]
    _sync(device)
    if start is None:
        raise SystemExit(f"the epoch has no more than --warmup-batches={warmup} batches; list more images")
    return time.perf_counter() - start, images, first


def _next_epoch_latency(make_iter, device, pause: float) -> float:
    """Seconds to the first batch of the next epoch, after ``pause`` seconds of other work."""
    time.sleep(pause)
    t0 = time.perf_counter()
    it = make_iter()
    next(it)
    _sync(device)
    latency = time.perf_counter() - t0
    it.close()
    return latency


def _torchvision_baseline(root, repeat, args, device, threads):
    import torch
    from torchvision import datasets, transforms

    tf = transforms.Compose([
        transforms.RandomResizedCrop(args.image_size), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))])
    folder = datasets.ImageFolder(str(root), transform=tf)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.ConcatDataset([folder] * repeat), batch_size=args.batch_size, shuffle=True,
        num_workers=threads, pin_memory=device.type == "cuda", persistent_workers=threads > 0,
        prefetch_factor=4 if threads > 0 else None)

    def epoch():
        for x, _y in loader:
            yield x.to(device, non_blocking=True)

    return epoch


def _fastkd(root, args, device, threads, backend, **kw):
    import torch

    from ..data import create_loader

    loader = create_loader(root, train=True, batch_size=args.batch_size, image_size=args.image_size,
                           backend=backend, device=device, num_threads=threads,
                           teacher_image_size=args.teacher_image_size, dtype=getattr(torch, args.dtype),
                           channels_last=args.channels_last, **kw)

    def epoch():
        for b in loader:
            yield b.images

    return epoch


def time_distill_step(device, batch_size: int, image_size: int = 224, steps: int = 20) -> float:
    """Images/s of one ResNet-50 -> ResNet-18 KD step (bf16 autocast, channels_last, SGD)."""
    import torch
    import torch.nn.functional as F
    from torchvision.models import resnet18, resnet50

    teacher = resnet50().to(device, memory_format=torch.channels_last).eval()
    student = resnet18().to(device, memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, fused=True)
    x = torch.randn(batch_size, 3, image_size, image_size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(1000, (batch_size,), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            with torch.no_grad():
                t = teacher(x)
            s = student(x)
            loss = 0.5 * F.cross_entropy(s, y) + 0.5 * F.kl_div(
                F.log_softmax(s.float(), 1), F.log_softmax(t.float(), 1), reduction="batchmean", log_target=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * batch_size / (time.perf_counter() - start)


def _machine(device, commit=None) -> dict:
    from ..envinfo import machine
    from .common import source_commit

    return {**machine(device), "commit": source_commit(commit)}


def main(args) -> int:
    from ..data.loader import default_num_threads, resolve_device

    from ..data.base import MAX_IMAGE_SIZE
    from ..errors import UsageError

    for flag, value, least in (("--num-images", args.num_images, 1), ("--epoch-images", args.epoch_images, 1),
                               ("--batch-size", args.batch_size, 1), ("--image-size", args.image_size, 1),
                               ("--teacher-image-size", args.teacher_image_size, 1),
                               ("--warmup-batches", args.warmup_batches, 0), ("--threads", args.threads, 0)):
        if value is not None and value < least:
            raise UsageError(f"{flag} must be >= {least}, got {value}")
    for flag, value in (("--image-size", args.image_size), ("--teacher-image-size", args.teacher_image_size)):
        if value is not None and value > MAX_IMAGE_SIZE:
            raise UsageError(f"{flag} must be <= {MAX_IMAGE_SIZE} pixels, got {value}")
    device = resolve_device(args.device)
    threads = args.threads if args.threads is not None else default_num_threads()
    epoch_images = args.epoch_images or 4 * args.num_images
    if epoch_images % args.num_images:
        raise SystemExit(f"--epoch-images={epoch_images} must be a multiple of --num-images={args.num_images}")
    repeat = epoch_images // args.num_images
    root = Path(args.data_dir or Path.home() / ".cache" / "fastkd" / f"bench_jpegs_{args.num_images}")
    t0 = time.perf_counter()
    make_jpeg_folder(root, args.num_images, workers=threads)
    epoch_list = write_epoch_list(root, repeat)
    print(f"data: {args.num_images} JPEGs in {root} (ready in {time.perf_counter() - t0:.1f} s), epochs of "
          f"{epoch_images}; device {device}, {threads} threads, batch {args.batch_size}, {args.image_size} px"
          + (f" + teacher {args.teacher_image_size} px" if args.teacher_image_size else "")
          + f", fastkd output {args.dtype}{' channels_last' if args.channels_last else ''}, "
          f"clock after {args.warmup_batches} batches")

    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(wanted) - set(BACKENDS))
    if unknown:
        raise SystemExit(f"unknown backends {unknown}; choose from {', '.join(BACKENDS)}")
    rows = []
    for name in wanted:
        if name == "fastkd-torch-gpudec" and device.type != "cuda":
            rows.append({"backend": name, "skipped": "needs CUDA"})
            continue
        if name == "fastkd-dali" and not _compat.has_dali():
            rows.append({"backend": name, "skipped": "DALI not installed"})
            continue
        if name == "torchvision":
            make = _torchvision_baseline(root, repeat, args, device, threads)
        elif name == "synthetic":
            make = _fastkd(epoch_list, args, device, threads, "synthetic")
        elif name == "fastkd-dali":
            make = _fastkd(epoch_list, args, device, threads, "dali")
        else:
            make = _fastkd(epoch_list, args, device, threads, "torch", gpu_decode=name == "fastkd-torch-gpudec")
        seconds, images, first = _time_epoch(make, device, args.warmup_batches)
        again = _next_epoch_latency(make, device, args.between_epochs)
        rows.append({"backend": name, "images_per_s": images / seconds, "images": images, "seconds": seconds,
                     "first_batch_s": first, "next_epoch_first_batch_s": again})
        print(f"  {name:<22} {images / seconds:9.1f} images/s   (first batch after {first:.2f} s; "
              f"next epoch's after {again:.2f} s)")
        del make

    step_rate = None
    if device.type == "cuda" and not args.no_step:
        step_rate = time_distill_step(device, args.step_batch_size, args.image_size)
        print(f"  ResNet-50 -> ResNet-18 KD step: {step_rate:.0f} images/s (batch {args.step_batch_size})")

    base = next((r["images_per_s"] for r in rows if r["backend"] == "torchvision" and "images_per_s" in r), None)
    print("\n| backend | images/s | vs torchvision |" + (" vs KD step |" if step_rate else ""))
    print("|---|---:|---:|" + ("---:|" if step_rate else ""))
    for r in rows:
        if "skipped" in r:
            print(f"| {r['backend']} | skipped: {r['skipped']} | |" + (" |" if step_rate else ""))
            continue
        rel = f"{r['images_per_s'] / base:.2f}x" if base else "-"
        line = f"| {r['backend']} | {r['images_per_s']:.0f} | {rel} |"
        if step_rate:
            line += f" {r['images_per_s'] / step_rate:.2f}x |"
        print(line)

    record = {"machine": _machine(device, args.commit), "device": str(device), "threads": threads, "batch_size": args.batch_size,
              "image_size": args.image_size, "num_images": args.num_images, "epoch_images": epoch_images,
              "warmup_batches": args.warmup_batches, "between_epochs_s": args.between_epochs,
              "teacher_image_size": args.teacher_image_size,
              "dtype": args.dtype, "channels_last": args.channels_last,
              "kd_step_images_per_s": step_rate, "rows": rows}
    if args.results:
        path = Path(args.results)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        print(f"\nappended to {path}")
    return 0
