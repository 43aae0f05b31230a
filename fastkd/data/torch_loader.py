"""The torch backend: a DataLoader over a shard plan, decoding with PIL or on the GPU.

CPU decoding (the default): DataLoader workers open each file with PIL (which handles
grayscale, CMYK and EXIF orientation), cut the crop window and resize it with PIL's antialiased
bilinear filter. For a CUDA device they hand over uint8 batches (pinned, 4x smaller than fp32)
that the main process normalises on the GPU; for a CPU device they normalise each sample
themselves, in parallel, with the same arithmetic (:class:`~fastkd.data.base.Normalizer`).

GPU decoding (``gpu_decode=True``, CUDA only): workers only read the file bytes and the EXIF
orientation; the main process decodes the batch with nvJPEG through
``torchvision.io.decode_jpeg(device="cuda")`` and crops / resizes each image on the GPU. Files
nvJPEG cannot decode (CMYK JPEGs, PNGs, ...) are decoded by PIL instead, said once in the log.
torchvision runs nvJPEG's Huffman stage on the main process's CPU, so this is rarely faster than
many PIL workers (see benchmarks/results/data.md); DALI is the fast GPU path.

Augmentation randomness is keyed per sample on ``(seed, epoch, position in the epoch order)``
(a numpy generator per sample, see :func:`~fastkd.data.decode.crop_window` and
:func:`~fastkd.data.decode.cifar_crop`), so it does not depend on the number of workers or
shards, and a resumed run draws exactly the crops an uninterrupted one would. The student and
teacher views are cut from the same window with the same flip.

Corrupt files (``skip_corrupt``) keep their row as a grey placeholder flagged invalid, so every
pass yields ``len(loader)`` full batches. Workers exit with the training process, even when it
is killed (:func:`_worker_init`).
"""
from __future__ import annotations

import functools
import io
import os
import sys
import threading
from typing import Iterator, Optional

import numpy as np
import torch

from .._compat import log_once
from .base import PLACEHOLDER_GREY, Batch, BaseLoader, Normalizer
from .decode import CIFAR_PAD, EXIF_ORIENTATION_TAG, cifar_crop, crop_window, open_rgb, orient
from .index import ShardPlan, center_crop_offset, shorter_side_size, val_resize_size


_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_WATCHDOG_INTERVAL_S = 0.1


def _parent_gone(parent_pid: int, forked: bool) -> bool:
    """True when the training process ``parent_pid`` has exited (gone, re-parented us, or a zombie
    nobody has reaped yet)."""
    if forked and os.getppid() != parent_pid:
        return True
    try:
        os.kill(parent_pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        with open(f"/proc/{parent_pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except (OSError, IndexError):
        return False


def _worker_init(parent_pid: int, worker_id: int) -> None:
    """Make a DataLoader worker exit with the training process, even after a SIGKILL of it.

    PyTorch's own check runs only every 5 s, and only while a worker waits for work. Here: on
    Linux, when the worker was forked by the training process's main thread, the kernel kills
    it the moment that process dies (``PR_SET_PDEATHSIG``; the signal follows the forking
    *thread*, hence the main-thread condition); in every case a watchdog thread polls the
    training process every 0.1 s and ends the worker once it is gone.
    """
    forked = os.getppid() == parent_pid  # the "fork" start method (not spawn / forkserver)
    info = torch.utils.data.get_worker_info()
    from_main_thread = bool(getattr(info.dataset, "iterated_from_main_thread", False)) if info else False
    if forked and from_main_thread and sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal

            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the watchdog below still ends the worker
    if _parent_gone(parent_pid, forked):  # it died before the prctl took effect
        os._exit(1)

    def watch():
        while not _parent_gone(parent_pid, forked):
            threading.Event().wait(_WATCHDOG_INTERVAL_S)
        os._exit(1)

    threading.Thread(target=watch, name="fastkd-parent-watchdog", daemon=True).start()


class _PlanDataset(torch.utils.data.Dataset):
    """Maps a key ``(dataset index, entry, order position, epoch)`` to a decoded sample.

    Returns ``(entry, dataset index, payload, error)``: ``error`` is None or the reason the file
    could not be read; the main process decides whether that is fatal (workers never drop data).
    """

    def __init__(self, paths, *, train: bool, seed: int, sizes: tuple, raw_bytes: bool, normalizers=None,
                 augment: str = "imagenet", opener=None):
        self.paths = paths
        # opener(i) -> a file object of sample i's bytes (tar shards); None: open ``paths[i]``
        self.opener = opener
        self.train = train
        self.augment = augment
        self.seed = seed
        self.sizes = sizes  # output sides: (student,) or (student, teacher)
        self.raw_bytes = raw_bytes
        # CPU target: [(Normalizer, index into sizes)] applied here, per sample, in the workers
        self.normalizers = normalizers
        self.iterated_from_main_thread = True  # set before workers start (see _worker_init)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key):
        index, entry, order_pos, epoch, known_bad = key
        path = self.paths[index]
        if self.raw_bytes:
            if known_bad:
                return entry, index, (None, 1), None
            return self._read_bytes(entry, index, path)
        error = None
        if known_bad:  # skipped before (skip_corrupt): not read again
            views = self._placeholder()
        else:
            try:
                views = self._views(open_rgb(path if self.opener is None else self.opener(index)), epoch, order_pos)
            except Exception as exc:  # any decoder failure is reported, with the file, to the main process
                error = f"{type(exc).__name__}: {exc}"
                views = self._placeholder()  # the row stays; the main process flags it invalid (or raises)
        if self.normalizers is None:  # uint8 HWC arrays; the main process normalises on the GPU
            return entry, index, [np.asarray(v) for v in views], error
        # straight from PIL to a (writable) float32 array, then the Normalizer's arithmetic
        # (several normalisations may read one view: a teacher that differs only in mean / std)
        floats = [torch.from_numpy(np.asarray(v, dtype=np.float32)) for v in views]
        return entry, index, [norm.sample(floats[v]) for norm, v in self.normalizers], error

    def _cifar_views(self, img, epoch: int, order_pos: int) -> list:
        """The "cifar" augmentation: the image at the student's size, then (training) zero-padded,
        randomly cropped and flipped; a view of another size is that crop resized."""
        import torchvision.transforms.functional as F
        from torchvision.transforms import InterpolationMode

        bilinear = InterpolationMode.BILINEAR
        side = self.sizes[0]
        width, height = img.size
        if (height, width) != (side, side):  # shorter side to ``side``, centre crop
            rh, rw = shorter_side_size(height, width, side)
            img = F.resize(img, [rh, rw], interpolation=bilinear, antialias=True)
            img = F.crop(img, center_crop_offset(rh, side), center_crop_offset(rw, side), side, side)
        if self.train:
            top, left, flip = cifar_crop(self.seed, epoch, order_pos)
            img = F.crop(F.pad(img, [CIFAR_PAD] * 4, fill=0), top, left, side, side)
            img = F.hflip(img) if flip else img
        return [img if size == side else F.resize(img, [size, size], interpolation=bilinear, antialias=True)
                for size in self.sizes]

    def _placeholder(self) -> list:
        """The views of a row standing in for a corrupt file: uniform grey."""
        from PIL import Image

        return [Image.new("RGB", (size, size), (PLACEHOLDER_GREY,) * 3) for size in self.sizes]

    def _views(self, img, epoch: int, order_pos: int) -> list:
        import torchvision.transforms.functional as F
        from torchvision.transforms import InterpolationMode

        bilinear = InterpolationMode.BILINEAR
        if self.augment == "cifar":
            return self._cifar_views(img, epoch, order_pos)
        width, height = img.size
        out = []
        if self.train:
            top, left, h, w, flip = crop_window(height, width, self.seed, epoch, order_pos)
            for size in self.sizes:  # every view from the same window and flip
                view = F.resized_crop(img, top, left, h, w, [size, size], interpolation=bilinear, antialias=True)
                out.append(F.hflip(view) if flip else view)
        else:
            for size in self.sizes:
                rh, rw = shorter_side_size(height, width, val_resize_size(size))
                view = F.resize(img, [rh, rw], interpolation=bilinear, antialias=True)
                out.append(F.crop(view, center_crop_offset(rh, size), center_crop_offset(rw, size), size, size))
        return out

    def _read_bytes(self, entry, index, path):
        from PIL import Image

        try:
            with (open(path, "rb") if self.opener is None else self.opener(index)) as fh:
                data = fh.read()
            orientation = 1
            try:  # header-only parse; the GPU decoder does not apply EXIF orientation itself
                with Image.open(io.BytesIO(data)) as im:
                    orientation = int(im.getexif().get(EXIF_ORIENTATION_TAG, 1))
            except Exception:
                pass  # an unparsable header is the decoder's problem, reported there
        except OSError as exc:
            return entry, index, (None, 1), f"{type(exc).__name__}: {exc}"
        return entry, index, (torch.frombuffer(bytearray(data), dtype=torch.uint8), orientation), None


class _Collate:
    """Stacks decoded samples (uint8 for a CUDA target, normalised on a CPU one) and reports
    the files that failed."""

    def __init__(self, normalized: bool, channels_last: bool):
        self.normalized = normalized
        self.channels_last = channels_last

    def __call__(self, items):
        # Every item has a payload (a failed file's is the placeholder), so batches keep their size.
        batch = {"entries": torch.tensor([it[0] for it in items], dtype=torch.int64),
                 "bad": [(it[0], it[1], it[3]) for it in items if it[3] is not None]}
        if isinstance(items[0][2], tuple):  # raw bytes for GPU decoding (None: unreadable or known bad)
            batch["data"] = [it[2][0] for it in items]
            batch["orientation"] = [it[2][1] for it in items]
        elif self.normalized:
            batch["images"] = [Normalizer.stack([it[2][v] for it in items], self.channels_last)
                               for v in range(len(items[0][2]))]
        else:
            batch["views"] = [torch.from_numpy(np.stack([it[2][v] for it in items]))
                              for v in range(len(items[0][2]))]
        return batch


class _PlanBatchSampler:
    """Yields the key lists of the pass being run; read in the main process on every ``iter``."""

    def __init__(self):
        self.batches: list = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class TorchLoader(BaseLoader):
    backend = "torch"

    def __init__(self, index, spec, *, gpu_decode: Optional[bool] = None):
        super().__init__(index, spec, num_samples_total=len(index), classes=index.classes)
        import torchvision  # noqa: F401  (fail early, in the caller, when it is missing)

        # Off unless asked for: torchvision's nvJPEG path decodes the Huffman stream on the CPU of
        # the main process (no hardware JPEG engine), so on a many-core machine the workers' PIL
        # decoding is as fast and leaves the training loop its CPU.
        self.gpu_decode = bool(gpu_decode)
        self.decoder = "nvJPEG (torchvision)" if self.gpu_decode else "PIL"
        self._norms = [Normalizer(v, spec) for v in self._views]
        # On a CPU target the workers normalise sample by sample (in parallel, in cache); on a CUDA
        # target the uint8 batch travels (4x smaller than fp32) and is normalised on the GPU.
        on_cpu = spec.device.type == "cpu"
        self._dataset = _PlanDataset(index.paths, train=spec.train, seed=spec.seed, sizes=self._sizes,
                                     raw_bytes=self.gpu_decode,
                                     normalizers=list(zip(self._norms, self._view_of)) if on_cpu else None,
                                     augment=spec.augment, opener=getattr(index, "open", None))
        self._sampler = _PlanBatchSampler()
        workers = spec.num_threads
        collate = _Collate(normalized=on_cpu, channels_last=spec.channels_last)
        # A private generator: every ``iter`` of a DataLoader draws its workers' base seed, from
        # torch's global generator unless given one. That draw would shift the global stream (which
        # checkpoints save for dropout, DPK masks, ...) at a point a resumed run does not repeat.
        # Augmentation is keyed per sample, so the base seed itself affects nothing.
        self._dataloader = torch.utils.data.DataLoader(
            self._dataset, batch_sampler=self._sampler, num_workers=workers, collate_fn=collate,
            pin_memory=spec.device.type == "cuda", persistent_workers=workers > 0,
            worker_init_fn=functools.partial(_worker_init, os.getpid()) if workers > 0 else None,
            prefetch_factor=4 if workers > 0 else None, generator=torch.Generator().manual_seed(spec.seed))
        if self.gpu_decode:
            log_once("fastkd.data: torch backend decodes JPEGs on the GPU (nvJPEG via torchvision)")

    def close(self) -> None:
        """Stop the persistent worker processes (what the DataLoader's own finaliser does, but now:
        left to the garbage collector, they were stopped inside a later run, where each waited out
        PyTorch's 5-second join timeout)."""
        it, self._dataloader._iterator = getattr(self._dataloader, "_iterator", None), None
        if it is not None and hasattr(it, "_shutdown_workers"):
            try:
                it._shutdown_workers()
            except RuntimeError:  # "DataLoader worker ... is killed by signal": a signal to the whole
                pass  # process group ended them already; the error that stops the run is the caller's

    def _run(self, plan: ShardPlan, start: int, resume_extra) -> Iterator[tuple[Batch, int]]:
        bs = self.spec.batch_size
        entries = np.arange(start, len(plan), dtype=np.int64)
        chunks = [entries[i:i + bs] for i in range(0, len(entries), bs)]
        known_bad = set(self._skipped)  # not read again: their rows are placeholders from the start
        self._sampler.batches = [[(int(plan.indices[k]), int(k), int(plan.keys[k]), plan.epoch,
                                   int(plan.indices[k]) in known_bad) for k in chunk] for chunk in chunks]
        self._dataset.iterated_from_main_thread = threading.current_thread() is threading.main_thread()
        # The DataLoader keeps the order of the batch sampler (in_order=True), so chunk i <-> batch i.
        # A corrupt file keeps its row (a placeholder flagged invalid), so every pass yields
        # len(self) batches and every shard the same number: DDP ranks stay in step.
        for chunk, out in zip(chunks, self._dataloader):
            for _entry, index, error in out["bad"]:
                self._skip_or_raise(index, error)
            if self.gpu_decode:
                views = self._decode_on_gpu(plan, out)
                out["images"] = [norm(views[v], "NCHW") for norm, v in zip(self._norms, self._view_of)]
            elif "views" in out:  # uint8 batch for the device
                out["images"] = [norm(out["views"][v], "NHWC") for norm, v in zip(self._norms, self._view_of)]
            yield self._batch(out["images"], *self._labels_valid_indices(plan, chunk)), int(chunk[-1]) + 1

    # ---- GPU decoding ------------------------------------------------------------------------
    def _decode_on_gpu(self, plan: ShardPlan, out: dict) -> list:
        """Decode a batch of JPEG bytes with nvJPEG; returns one float (N, 3, S, S) batch per size.

        Rows without bytes (an unreadable file, or one known to be corrupt) and files no decoder
        takes (skip_corrupt) become placeholders, so the batch keeps its size.
        """
        from torchvision.io import ImageReadMode, decode_jpeg

        dev = self.spec.device
        data = out["data"]
        present = [i for i, d in enumerate(data) if d is not None]
        decoded = [None] * len(data)
        if present:
            try:
                for i, img in zip(present, decode_jpeg([data[i] for i in present], mode=ImageReadMode.RGB,
                                                       device=dev)):
                    decoded[i] = img
            except RuntimeError:
                for i in present:  # find the files nvJPEG cannot take, one by one
                    try:
                        decoded[i] = decode_jpeg(data[i], mode=ImageReadMode.RGB, device=dev)
                    except RuntimeError:
                        pass
        entries = out["entries"].numpy()
        per_view = [[] for _ in self._sizes]
        for i, img in enumerate(decoded):
            if img is None and data[i] is not None:
                try:  # nvJPEG declines CMYK JPEGs and non-JPEG files: PIL decodes those
                    img = torch.from_numpy(np.array(open_rgb(io.BytesIO(data[i].numpy().tobytes()))))
                    img = img.permute(2, 0, 1).to(dev, non_blocking=True)
                    log_once("fastkd.data: some files are not nvJPEG-decodable (CMYK or non-JPEG); "
                             "decoding those with PIL on the CPU")
                except Exception as exc:
                    self._skip_or_raise(int(plan.indices[entries[i]]), f"{type(exc).__name__}: {exc}")
            elif img is not None:
                img = orient(img, out["orientation"][i])
            if img is None:  # a placeholder row, flagged invalid by _labels_valid_indices
                views = [torch.full((3, s, s), float(PLACEHOLDER_GREY), device=dev) for s in self._sizes]
            else:
                views = self._gpu_views(img, plan.epoch, int(plan.keys[entries[i]]))
            for v, view in enumerate(views):
                per_view[v].append(view)
        return [torch.stack(v) for v in per_view]

    def _gpu_views(self, img: torch.Tensor, epoch: int, order_pos: int) -> list:
        """Crop / resize one (3, H, W) uint8 CUDA image into float views in [0, 255]."""
        import torch.nn.functional as F

        _, height, width = img.shape
        x = img.unsqueeze(0).float()
        if self.spec.augment == "cifar":
            return self._gpu_cifar_views(x, epoch, order_pos)
        out = []
        if self.spec.train:
            top, left, h, w, flip = crop_window(height, width, self.spec.seed, epoch, order_pos)
            window = x[:, :, top:top + h, left:left + w]
            for size in self._sizes:
                view = F.interpolate(window, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
                out.append((view.flip(-1) if flip else view)[0])
        else:
            for size in self._sizes:
                rh, rw = shorter_side_size(height, width, val_resize_size(size))
                view = F.interpolate(x, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
                top, left = center_crop_offset(rh, size), center_crop_offset(rw, size)
                out.append(view[0, :, top:top + size, left:left + size])
        return out

    def _gpu_cifar_views(self, x: torch.Tensor, epoch: int, order_pos: int) -> list:
        """:meth:`_PlanDataset._cifar_views` on a (1, 3, H, W) float CUDA image."""
        import torch.nn.functional as F

        side = self._sizes[0]
        _, _, height, width = x.shape
        if (height, width) != (side, side):
            rh, rw = shorter_side_size(height, width, side)
            x = F.interpolate(x, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
            top, left = center_crop_offset(rh, side), center_crop_offset(rw, side)
            x = x[:, :, top:top + side, left:left + side]
        if self.spec.train:
            top, left, flip = cifar_crop(self.spec.seed, epoch, order_pos)
            x = F.pad(x, [CIFAR_PAD] * 4, value=0.0)[:, :, top:top + side, left:left + side]
            x = x.flip(-1) if flip else x
        return [(x if size == side else F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                                                      align_corners=False))[0] for size in self._sizes]
