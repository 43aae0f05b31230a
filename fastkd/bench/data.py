"""``fastkd bench data``: images/s of each input pipeline on a folder of ImageNet-like JPEGs.

The folder is generated once (cached): crops of scikit-learn's two sample photographs, jittered
and flipped, saved as about 500 x 375 JPEGs of quality 90 (ImageNet's typical size) in 10
classes. Every pipeline does the training preprocessing (random-resized crop to 224, flip,
normalise) and hands batches to the device; the clock covers whole epochs after one warm-up
epoch, ending with a device synchronisation. Rows:

* ``torchvision``: the plain baseline, ``ImageFolder`` + ``RandomResizedCrop`` / ``ToTensor`` /
  ``Normalize`` + ``DataLoader`` (same workers, pinned memory on CUDA);
* ``fastkd-torch``: fastkd's torch backend (PIL decode in workers, normalisation on the device);
* ``fastkd-torch-gpudec``: the same with nvJPEG decoding (CUDA only);
* ``fastkd-dali``: the DALI pipeline (CPU-only on a CPU device; nvJPEG "mixed" decode on CUDA);
* ``synthetic``: random tensors made on the device (the ceiling of the consumer side).

On CUDA it also times a ResNet-50 -> ResNet-18 distillation step at 224 px (bf16 autocast,
channels_last, teacher forward + student forward/backward/SGD step) and reports how many times
faster than that step each pipeline delivers images (the target is at least 2x).

Results are printed as a Markdown table and appended as one JSON line (machine, versions,
date) to ``--results``.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import time
from pathlib import Path

from .. import _compat

BACKENDS = ("torchvision", "fastkd-torch", "fastkd-torch-gpudec", "fastkd-dali", "synthetic")
_MARKER = ".fastkd_bench_jpegs.json"


def add_arguments(parser) -> None:
    parser.add_argument("--data-dir", default=None,
                        help="where the JPEG folder is generated / cached (default: ~/.cache/fastkd/bench_jpegs_N)")
    parser.add_argument("--num-images", type=int, default=512, help="JPEG files in the folder")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=None,
                        help="decoding threads / DataLoader workers (default: the usable CPU cores)")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs after one warm-up epoch")
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help="comma-separated subset of " + ", ".join(BACKENDS))
    parser.add_argument("--step-batch-size", type=int, default=256,
                        help="batch size of the timed ResNet-50 -> ResNet-18 step (CUDA only)")
    parser.add_argument("--no-step", action="store_true", help="skip timing the distillation step")
    parser.add_argument("--results", default=None,
                        help="JSON-lines file the run is appended to (default: print only)")


# ---- the data set -------------------------------------------------------------------------
def make_jpeg_folder(root, num_images: int, *, classes: int = 10, seed: int = 0) -> Path:
    """Write ``num_images`` ImageNet-like JPEGs (about 500 x 375, quality 90) under ``root``; cached."""
    import numpy as np
    from PIL import Image, ImageEnhance
    from sklearn.datasets import load_sample_images

    root = Path(root)
    params = {"num_images": num_images, "classes": classes, "seed": seed, "quality": 90}
    marker = root / _MARKER
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return root
    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(p) for p in load_sample_images().images]  # 640 x 427 each
    shapes = [(500, 375), (375, 500), (500, 333), (500, 400), (480, 360), (333, 500)]
    for c in range(classes):
        (root / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
    for i in range(num_images):
        photo = photos[i % len(photos)]
        w, h = shapes[int(rng.integers(len(shapes)))]
        # a random window of the photo at a random scale, so every file has its own content
        scale = rng.uniform(0.55, 1.0)
        cw, ch = int(photo.width * scale), int(photo.height * scale)
        x0, y0 = int(rng.integers(0, photo.width - cw + 1)), int(rng.integers(0, photo.height - ch + 1))
        img = photo.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.BICUBIC)
        img = ImageEnhance.Color(img).enhance(rng.uniform(0.6, 1.4))
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        img.save(root / f"class{i % classes:02d}" / f"img{i:05d}.JPEG", quality=90)
    marker.write_text(json.dumps(params))
    return root


# ---- timing ---------------------------------------------------------------------------------
def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_epochs(make_iter, device, epochs: int) -> tuple[float, int]:
    """Run one warm-up epoch, then ``epochs`` timed ones; returns (seconds, images)."""
    for _ in make_iter():
        pass
    _sync(device)
    images, start = 0, time.perf_counter()
    for _ in range(epochs):
        for x in make_iter():
            images += x.shape[0]
    _sync(device)
    return time.perf_counter() - start, images


def _torchvision_baseline(root, args, device, threads):
    import torch
    from torchvision import datasets, transforms

    tf = transforms.Compose([
        transforms.RandomResizedCrop(args.image_size), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))])
    loader = torch.utils.data.DataLoader(
        datasets.ImageFolder(str(root), transform=tf), batch_size=args.batch_size, shuffle=True,
        num_workers=threads, pin_memory=device.type == "cuda", persistent_workers=threads > 0,
        prefetch_factor=4 if threads > 0 else None)

    def epoch():
        for x, _y in loader:
            yield x.to(device, non_blocking=True)

    return epoch


def _fastkd(root, args, device, threads, backend, **kw):
    from ..data import create_loader

    loader = create_loader(root, train=True, batch_size=args.batch_size, image_size=args.image_size,
                           backend=backend, device=device, num_threads=threads, **kw)

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


def _machine(device) -> dict:
    import torch

    info = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    if _compat.has_dali():
        import nvidia.dali

        info["dali"] = nvidia.dali.__version__
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(args) -> int:
    from ..data.loader import default_num_threads, resolve_device

    device = resolve_device(args.device)
    threads = args.threads if args.threads is not None else default_num_threads()
    root = Path(args.data_dir or Path.home() / ".cache" / "fastkd" / f"bench_jpegs_{args.num_images}")
    t0 = time.perf_counter()
    make_jpeg_folder(root, args.num_images)
    print(f"data: {args.num_images} JPEGs in {root} (ready in {time.perf_counter() - t0:.1f} s); "
          f"device {device}, {threads} threads, batch {args.batch_size}, {args.image_size} px, "
          f"{args.epochs} timed epochs")

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
            make = _torchvision_baseline(root, args, device, threads)
        elif name == "synthetic":
            make = _fastkd(root, args, device, threads, "synthetic")
        elif name == "fastkd-dali":
            make = _fastkd(root, args, device, threads, "dali")
        else:
            make = _fastkd(root, args, device, threads, "torch", gpu_decode=name == "fastkd-torch-gpudec")
        seconds, images = _time_epochs(make, device, args.epochs)
        rows.append({"backend": name, "images_per_s": images / seconds, "images": images, "seconds": seconds})
        print(f"  {name:<22} {images / seconds:9.1f} images/s")
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

    record = {"machine": _machine(device), "device": str(device), "threads": threads, "batch_size": args.batch_size,
              "image_size": args.image_size, "num_images": args.num_images, "epochs": args.epochs,
              "kd_step_images_per_s": step_rate, "rows": rows}
    if args.results:
        path = Path(args.results)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        print(f"\nappended to {path}")
    return 0
