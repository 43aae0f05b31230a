"""``fastkd cache build``: run a teacher over exactly the views ``fastkd train`` will draw.

The training loader's augmentation is keyed by (seed, epoch, position in the epoch's order)
(see :mod:`fastkd.data.torch_loader`), so the teacher view of every sample in every epoch is a
function of the data, the seed and the view settings alone. The builder makes the same
``create_loader`` call the trainer makes (same :class:`~fastkd.engine.config.TrainConfig`
fields), runs the teacher the way the trainer runs it (:class:`~fastkd.engine.runner.TeacherRunner`:
eval mode, inference mode, the same autocast and memory format), and stores each epoch's logits
by dataset sample index (:mod:`fastkd.cache.store`).

Several processes (``torchrun``): each rank reads its shard, as in training, and writes its
rows into the one shared epoch file; padding rows (``valid=False``, a duplicate sample with
another crop) are not written, so the files do not depend on the world size. Every epoch checks
that exactly N rows were written before it is marked done.
"""
from __future__ import annotations

import dataclasses
import errno
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .. import __version__
from ..engine.runlock import lock_output
from ..engine import config as C
from ..engine import distributed as D
from ..engine.teacher_setup import weights_identity
from . import store

logger = logging.getLogger("fastkd")

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


# --------------------------------------------------------------------------------------------
# What a cache is keyed on
# --------------------------------------------------------------------------------------------
def teacher_view_size(cfg: C.TrainConfig) -> int:
    return cfg.teacher_image_size or cfg.image_size


def train_loader(cfg: C.TrainConfig, dist: D.DistInfo, *, teacher_view: bool):
    """The training loader exactly as :meth:`fastkd.engine.trainer.Trainer._make_loaders` builds it."""
    from ..data import create_loader
    from ..engine.teacher_setup import loader_norms

    tis = None
    if teacher_view and cfg.teacher_image_size not in (None, cfg.image_size):
        tis = cfg.teacher_image_size
    extra = {"augment": cfg.augment} if cfg.augment != "imagenet" else {}
    extra.update(loader_norms(cfg, teacher=teacher_view, what="fastkd cache build")[0])
    return create_loader(cfg.data, train=True, batch_size=cfg.batch_size, backend=cfg.data_backend,
                         image_size=cfg.image_size, teacher_image_size=tis, shard_id=dist.rank,
                         num_shards=dist.world_size, seed=cfg.seed, num_threads=cfg.workers, device=dist.device,
                         channels_last=cfg.channels_last, skip_corrupt=cfg.skip_corrupt, **extra)


def augmentation_settings(loader) -> dict:
    """The crop + flip settings that decide the teacher views (and what keys them)."""
    from ..data.index import TRAIN_RATIO, TRAIN_SCALE

    name = getattr(loader.spec, "augment", "imagenet")
    if name == "imagenet":
        aug = {"name": name, "backend": loader.backend, "crop": "random-resized", "scale": list(TRAIN_SCALE),
               "ratio": list(TRAIN_RATIO), "hflip": 0.5}
    else:
        from ..data.decode import CIFAR_PAD

        aug = {"name": name, "backend": loader.backend, "crop": "padded", "pad": CIFAR_PAD, "hflip": 0.5}
    if loader.backend == "dali":
        # DALI draws from per-pipeline generators seeded by (seed, epoch, shard, start): its crops
        # depend on the shard layout, so a DALI cache is only valid for the same world size and batch.
        aug["world_size"] = loader.spec.num_shards
        aug["batch_size"] = loader.spec.batch_size
    return aug


def run_fields(cfg: C.TrainConfig, loader) -> dict:
    """The manifest fields a training run must match (besides the epochs it needs)."""
    index = loader.index
    view = loader.spec.teacher or loader.spec.student  # the normalisation the teacher view gets
    if index is None:
        raise ValueError("the teacher cache needs a real data set (--data DIR): synthetic data has no sample index")
    return {
        "data": {"index_sha256": store.index_sha256(index), "num_samples": len(index),
                 "num_classes": len(loader.classes), "classes": list(loader.classes)},
        "augmentation": augmentation_settings(loader),
        "view": {"teacher_image_size": teacher_view_size(cfg), "mean": [float(v) for v in view.mean],
                 "std": [float(v) for v in view.std]},
        "seed": cfg.seed,
    }


# Order of the checks and the words of the refusal.
FIELD_NAMES = {
    ("data", "num_classes"): "classes",
    ("data", "classes"): "classes",
    ("data", "num_samples"): "data index (sample count)",
    ("data", "index_sha256"): "data index (paths and labels)",
    ("seed",): "seed",
    ("augmentation",): "augmentation",
    ("view", "teacher_image_size"): "image size (teacher view)",
    ("view", "mean"): "normalisation mean",
    ("view", "std"): "normalisation std",
}


def _get(d: dict, key: tuple):
    for k in key:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def first_mismatch(cached: dict, wanted: dict) -> Optional[str]:
    """None, or a one-line description of the first field where a cache differs from a run."""
    for key, name in FIELD_NAMES.items():
        a, b = _get(cached, key), _get(wanted, key)
        if a != b:
            if key == ("data", "classes"):
                diff = sorted(set(map(str, a or [])) ^ set(map(str, b or [])))[:3]
                return f"{name}: the class names differ (e.g. {', '.join(diff) or 'their order'})"
            if key == ("data", "index_sha256"):
                return f"{name}: the cache was built on another file list (hash {str(a)[:12]}.. vs {str(b)[:12]}..)"
            if isinstance(a, dict) and isinstance(b, dict):  # name the sub-fields that differ
                keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
                a, b = {k: a.get(k) for k in keys}, {k: b.get(k) for k in keys}
            return f"{name}: cache has {a!r}, this run has {b!r}"
    return None


# --------------------------------------------------------------------------------------------
# Top-k compression (docs/methods.md §10)
# --------------------------------------------------------------------------------------------
def compress(logits: torch.Tensor, labels: torch.Tensor, k: int):
    """(values (N, K), indices (N, K), label logit (N,), fill (N,)) of teacher rows, in fp32:
    :func:`fastkd.losses.compressed.compress_topk` (``S`` = the K largest logits plus the label)."""
    from ..losses.compressed import compress_topk

    t = compress_topk(logits.float(), labels.to(logits.device), k)
    return t.values, t.indices, t.label_logit, t.fill


# --------------------------------------------------------------------------------------------
# The builder
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class CacheSpec:
    """What to store: ``fmt`` full|topk, ``dtype`` fp32|bf16|fp16, ``top_k`` K (topk only)."""

    fmt: str = "full"
    dtype: str = "fp32"
    top_k: Optional[int] = None

    def validate(self, num_classes: Optional[int] = None) -> None:
        if self.fmt not in store.FORMATS:
            raise ValueError(f"--format must be one of {', '.join(store.FORMATS)}, got {self.fmt!r}")
        if self.dtype not in store.DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(store.DTYPES)}, got {self.dtype!r}")
        if self.fmt == "topk":
            if self.top_k is None or self.top_k < 1:
                raise ValueError(f"--format topk needs --top-k K >= 1, got {self.top_k}")
            if num_classes is not None and self.top_k >= num_classes:
                raise ValueError(f"--top-k {self.top_k} must be smaller than the class count {num_classes} "
                                 "(use --format full to store every logit)")
        elif self.top_k is not None:
            raise ValueError("--top-k applies to --format topk only")


def _check_fp16_range(logits: torch.Tensor) -> None:
    """fp16 rounds finite logits beyond +-65504 to inf (the losses would then give NaN): refuse."""
    finite = torch.isfinite(logits)
    big = logits.detach().float().abs().masked_fill(~finite, 0).max()
    limit = torch.finfo(torch.float16).max
    if float(big) > limit:
        raise ValueError(f"the teacher's logits reach {float(big):.4g}, beyond the fp16 range ({limit:g}): they "
                         "would be stored as inf; use --dtype bf16 or fp32")


def _encode(logits: torch.Tensor, labels: torch.Tensor, spec: CacheSpec, row_dtype: np.dtype) -> np.ndarray:
    """Teacher logits (N, C) of a batch -> numpy rows of the epoch file (on the CPU)."""
    if spec.dtype == "fp16":
        _check_fp16_range(logits)
    if spec.fmt == "full":
        return store.to_storage(logits.detach().float().cpu(), spec.dtype)
    values, indices, label, fill = (t.detach().cpu() for t in compress(logits, labels, spec.top_k))
    rows = np.empty(len(label), dtype=row_dtype)
    rows["values"] = store.to_storage(values, spec.dtype)
    rows["indices"] = indices.numpy().astype(row_dtype["indices"].base)
    rows["label"] = store.to_storage(label, spec.dtype)
    rows["fill"] = store.to_storage(fill, spec.dtype)
    return rows


def _progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="row", unit_scale=True, desc="fastkd cache build",
                dynamic_ncols=True, disable=not (enabled and sys.stderr.isatty()))


def build_cache(cfg: C.TrainConfig, output, spec: CacheSpec) -> dict:
    """Build (or finish) the cache of epochs ``0..cfg.epochs-1`` in ``output``; returns a summary.

    ``cfg`` is a training config: its data, backend, batch size, image sizes, seed, workers,
    device, AMP, channels_last, compile, teacher and teacher checkpoint fields are used.
    """
    if cfg.teacher is None:
        raise ValueError("no teacher: give --teacher NAME and --teacher-checkpoint PATH (or --teacher-pretrained)")
    if not cfg.teacher_checkpoint and not cfg.teacher_pretrained:
        raise ValueError("no --teacher-checkpoint (nor --teacher-pretrained): a cache of a randomly initialised "
                         "teacher would match no run")
    if cfg.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {cfg.epochs}")
    if cfg.data is None:
        raise ValueError("no data set: give --data DIR (a folder holding train/ and val/)")
    if cfg.data_backend == "synthetic":
        raise ValueError("--data-backend synthetic has no sample index to cache by; use torch or dali")
    spec.validate()
    C.check_input_files(cfg)  # before the data is indexed
    out = Path(output)
    dist = D.init(cfg.device)
    device = dist.device
    amp = cfg.amp if cfg.amp != "auto" else ("bf16" if device.type == "cuda" else "none")
    lock = loader = None
    try:
        loader = train_loader(cfg, dist, teacher_view=True)
        classes = loader.classes
        if cfg.teacher_checkpoint and cfg.teacher_classes is None:  # before the output folder exists
            from ..models.classes import check_teacher_classes, recorded_classes

            check_teacher_classes(recorded_classes(cfg.teacher_checkpoint), classes,
                                  teacher=f"{cfg.teacher} ({cfg.teacher_checkpoint})", data=f"--data {cfg.data}")
        spec.validate(len(classes))
        fields = run_fields(cfg, loader)
        sha = store.file_sha256(cfg.teacher_checkpoint) if dist.is_main and cfg.teacher_checkpoint else None
        manifest = {
            "version": store.FORMAT,
            **fields,
            "teacher": cfg.teacher,
            "teacher_checkpoint_sha256": sha,
            "teacher_weights": weights_identity(cfg, file_hash=lambda path: sha),
            "teacher_classes": cfg.teacher_classes,
            "format": spec.fmt,
            "dtype": spec.dtype,
            "top_k": spec.top_k,
            "epochs": cfg.epochs,
            "epochs_done": [],
            "build": {"image_size": cfg.image_size, "batch_size": cfg.batch_size, "world_size": dist.world_size,
                      "amp": amp, "channels_last": cfg.channels_last, "device": device.type,
                      "fastkd": __version__, "torch": str(torch.__version__)},
        }
        lock = lock_output(out, "cache", dist)  # one build per folder; refuses a run's folder
        started = None
        if dist.is_main:
            try:
                started = _open_or_start(out, manifest, loader.index)
            except (ValueError, OSError) as exc:
                started = exc
        started = D.broadcast_object(started, dist)  # every rank stops on the main rank's refusal
        if isinstance(started, Exception):
            raise started
        manifest = started
        done = set(manifest["epochs_done"])
        todo = [e for e in range(cfg.epochs) if e not in done]
        n = len(loader.index)
        shape, row_dtype = store.row_layout(spec.fmt, spec.dtype, len(classes), spec.top_k)
        summary = {"output": str(out), "epochs_built": todo, "epochs_done_before": sorted(done),
                   "rows_per_s": [], "rows_per_epoch": n, "bytes_per_row": store.bytes_per_row(spec.fmt, spec.dtype, len(classes),
                                                                         spec.top_k)}
        if not todo:
            logger.info("fastkd cache build: %s already holds %s", out, epochs_text(range(cfg.epochs)))
            return summary

        from ..engine.runner import TeacherRunner
        from ..engine.teacher_setup import build_teacher
        from ..models import check_input_size

        teacher = build_teacher(cfg, classes)  # its weights (file or hub), its logits mapped to the data's classes
        check_input_size(teacher, cfg.teacher, teacher_view_size(cfg),
                         "--teacher-image-size" if cfg.teacher_image_size else "--image-size")
        runner = TeacherRunner(teacher, device, amp_dtype=AMP_DTYPES[amp], channels_last=cfg.channels_last,
                               concurrent=device.type == "cuda", compile=cfg.compile)
        if cfg.check_teacher:
            try:
                _check_teacher(cfg, runner, dist, classes)
            except BaseException:
                runner.close()
                raise
        logger.info("fastkd cache build: %s on %d samples x %d classes, %s, %s %s%s -> %s (%s/row), "
                    "device %s x %d", cfg.teacher, n, len(classes), epochs_text(todo), spec.fmt, spec.dtype,
                    f" K={spec.top_k}" if spec.top_k else "", out, _size(summary["bytes_per_row"]), device,
                    dist.world_size)
        bar = _progress(n * len(todo), 0, dist.is_main)
        epoch = None
        try:
            for epoch in todo:
                t0 = time.perf_counter()
                written = _build_epoch(out, epoch, loader, runner, spec, (n, *shape), row_dtype, dist, bar)
                total = torch.tensor([written], dtype=torch.int64)
                if dist.distributed and device.type == "cuda":
                    total = total.to(device)
                D.all_reduce_sum(total, dist)
                if int(total) != n:
                    raise ValueError(f"epoch {epoch}: {int(total)} rows written for {n} samples (unreadable "
                                     "files?); the epoch is not marked done")
                D.barrier(dist)
                if dist.is_main:
                    _commit_epoch(out, epoch)
                D.barrier(dist)
                dt = time.perf_counter() - t0
                summary["rows_per_s"].append(n / max(dt, 1e-9))
                logger.info("fastkd cache build: epoch %d: %d rows in %.1f s (%.0f rows/s)", epoch, n, dt, n / dt)
            epoch = None
        except BaseException:
            if dist.is_main and epoch is not None:  # an error or a signal: the partial epoch is discarded
                (out / store.temp_name(epoch)).unlink(missing_ok=True)
            raise
        finally:
            bar.close()
            runner.close()
        return summary
    finally:
        if loader is not None:
            loader.close()
        if lock is not None:
            lock.release()
        D.shutdown(dist)


def _has_val_split(root) -> bool:
    from ..data.index import resolve_split_root

    try:
        return resolve_split_root(root, train=False) != resolve_split_root(root, train=True)
    except OSError:
        return False


def _check_teacher(cfg: C.TrainConfig, runner, dist, classes) -> None:
    """The teacher's top-1 on a few batches of the validation split (when there is one), before the
    build pays for every epoch (:func:`fastkd.engine.teacher_setup.check_teacher`)."""
    from ..data import create_loader
    from ..engine.teacher_setup import check_teacher, loader_norms

    if not _has_val_split(cfg.data):
        logger.info("fastkd cache build: %s has no val/ split: the teacher is not checked", cfg.data)
        return
    norms, view = loader_norms(cfg, teacher=True, what="fastkd cache build")
    tis = cfg.teacher_image_size if cfg.teacher_image_size not in (None, cfg.image_size) else None
    extra = {"augment": cfg.augment} if cfg.augment != "imagenet" else {}
    val = create_loader(cfg.data, train=False, batch_size=cfg.batch_size, backend=cfg.data_backend,
                        image_size=cfg.image_size, teacher_image_size=tis, shard_id=dist.rank,
                        num_shards=dist.world_size, seed=cfg.seed, num_threads=cfg.workers, device=dist.device,
                        channels_last=cfg.channels_last, skip_corrupt=cfg.skip_corrupt, **norms, **extra)
    if list(val.classes) != list(classes):
        raise ValueError(f"the training and validation splits of {cfg.data} hold different classes")
    with val:
        check_teacher(runner, val, dist.device, len(classes), name=cfg.teacher, view=view,
                      what="fastkd cache build", dist=dist)


#: How the teacher forward was computed: a continued build must keep them (the trainer warns on them).
NUMERICS = ("amp", "channels_last", "device")


def _open_or_start(out: Path, manifest: dict, index=None) -> dict:
    """Continue the cache in ``out`` if it was built with the same settings, else start one.

    ``index``: the data set's index (its files, or tar shards); a new cache records their sizes, times and
    SHA-256 (``data_files.npy``), a continued one refuses files changed since it was started.
    """
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".epoch_*.npy.tmp"):
        stale.unlink()  # a killed build's partial epoch: rebuilt from scratch, never used
    path = out / store.MANIFEST
    old_files = None
    if path.exists():
        old = store.read_manifest(out)
        problem = first_mismatch(old, manifest)
        for key in ("teacher", "teacher_checkpoint_sha256", "teacher_weights", "teacher_classes", "format", "dtype",
                    "top_k"):
            if key in ("teacher_weights", "teacher_classes") and key not in old:
                continue  # a cache from before these were recorded: teacher_checkpoint_sha256 decides
            if problem is None and old.get(key) != manifest.get(key):
                problem = f"{key}: cache has {old.get(key)!r}, this build has {manifest.get(key)!r}"
        if problem is not None:
            raise store.CacheMismatchError(f"--output {out} holds a cache built with other settings ({problem}); "
                                           "choose another --output or delete it")
        done = sorted(e for e in old.get("epochs_done", []) if _readable(out, e))
        was = old.get("build", {})
        for key in NUMERICS:  # one cache, one teacher forward: done epochs are not recomputed
            if done and key in was and was[key] != manifest["build"][key]:
                raise store.CacheMismatchError(
                    f"--output {out} holds epochs {_ranges(done)} computed with {key} {was[key]!r}, this build "
                    f"would compute the rest with {manifest['build'][key]!r}; continue with the same setting, "
                    "or choose another --output")
        old_files = store.read_data_files(out, old) if done else None
        if old_files is not None and index is not None:
            changed = store.changed_files(old_files, index)
            if changed:
                raise store.CacheMismatchError(
                    f"--output {out} holds epochs {_ranges(done)} computed from data that changed since: "
                    f"{index.paths[changed[0]]} (and {len(changed) - 1} more file(s)) differ in size or modification "
                    "time; choose another --output, or delete it and build again")
        manifest = {**old, "epochs": max(int(old["epochs"]), manifest["epochs"]), "epochs_done": done,
                    "build": manifest["build"]}
        if done:
            logger.info("fastkd cache build: continuing %s (epochs %s already done)", out, _ranges(done))
    if old_files is None and index is not None:
        t0 = time.perf_counter()
        records = store.data_file_records(index)
        manifest["data_files_sha256"] = store.write_data_files(out, records)
        logger.info("fastkd cache build: recorded the size, time and SHA-256 of %d data files in %.1f s", len(index.paths),
                    time.perf_counter() - t0)
    store.write_json_atomic(path, manifest)
    return manifest


def _readable(out: Path, epoch: int) -> bool:
    """Whether a done epoch's file is there, whole and of the manifest's shape (else it is rebuilt)."""
    try:
        store.CacheReader(out).epoch(int(epoch))
    except (ValueError, OSError) as exc:
        logger.warning("fastkd cache build: epoch %s is rebuilt: %s", epoch, exc)
        return False
    return True


def _build_epoch(out: Path, epoch: int, loader, runner, spec: CacheSpec, shape: tuple, row_dtype, dist, bar) -> int:
    """Write one epoch's rows of this rank into the shared temp file; returns the rows written."""
    tmp = out / store.temp_name(epoch)
    error = None
    if dist.is_main:
        try:
            _create_epoch_file(tmp, row_dtype, shape)
        except OSError as exc:
            error = exc
    error = D.broadcast_object(error, dist)  # every rank stops on a full disk, none waits on a barrier
    if error is not None:
        raise error
    mm = np.load(tmp, mmap_mode="r+")
    written = 0
    loader.set_epoch(epoch)
    it = iter(loader)
    batch = next(it, None)
    pending = runner.submit(_teacher_input(batch)) if batch is not None else None
    while batch is not None:
        out_t = runner.result(pending)
        nxt = next(it, None)
        pending = runner.submit(_teacher_input(nxt)) if nxt is not None else None  # overlaps the copy below
        _check_finite(out_t.logits, batch, epoch)
        rows = _encode(out_t.logits, batch.labels, spec, row_dtype)
        idx = batch.indices.numpy()
        if batch.valid is not None:
            keep = batch.valid.cpu().numpy()
            rows, idx = rows[keep], idx[keep]
        mm[idx] = rows
        written += len(idx)
        bar.update(len(idx) * dist.world_size)
        batch = nxt
    mm.flush()
    del mm
    # --skip-corrupt: a corrupt file's rows are placeholders (valid=False) that no loss reads; its
    # row stays zero and counts as accounted for.
    return written + int(getattr(loader, "skipped_in_epoch", 0) or 0)


def _create_epoch_file(tmp: Path, row_dtype, shape: tuple) -> None:
    """The epoch's temporary ``.npy`` with its whole size reserved on disk (``posix_fallocate``): a
    full disk is a clear ENOSPC here, not a SIGBUS when the memory map writes into a hole later."""
    try:
        np.lib.format.open_memmap(tmp, mode="w+", dtype=row_dtype, shape=shape).flush()
        fd = os.open(tmp, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    _warn_no_fallocate(tmp, exc)
                else:
                    raise
        finally:
            os.close(fd)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            need = int(row_dtype.itemsize * int(np.prod(shape, dtype=np.int64)))
            free = shutil.disk_usage(tmp.parent).free
            full = OSError(f"no space left on device for {tmp.parent / tmp.name[1:-4]}: the epoch needs "
                           f"{_size(need)}, {_size(free)} are free (the finished epochs are kept; free space and run "
                           "the same command to continue)")
            full.errno = exc.errno  # one line (no "[Errno 28]" prefix), the errno kept for callers
            raise full from None
        raise


_warned_fallocate = []


def _warn_no_fallocate(tmp: Path, exc: OSError) -> None:
    if not _warned_fallocate:
        _warned_fallocate.append(True)
        logger.warning("fastkd cache build: the filesystem of %s cannot reserve file space (%s): a disk that fills "
                       "during the build may end it with SIGBUS instead of an error", tmp.parent, exc.strerror)


def _check_finite(logits: torch.Tensor, batch, epoch: int) -> None:
    """A teacher row with NaN or inf would poison every run that reads it: refuse (the rows go to the
    host next anyway, so this costs no extra synchronisation worth counting)."""
    finite = torch.isfinite(logits).all(1).cpu()
    if batch.valid is not None:
        finite |= ~batch.valid.cpu()
    if not bool(finite.all()):
        row = int((~finite).nonzero()[0])
        sample = int(batch.indices[row])
        raise ValueError(f"epoch {epoch}: the teacher's logits for sample {sample} are not finite (NaN or inf); a "
                         "cache of them would make every run from it NaN: check the teacher and its checkpoint")


def _teacher_input(batch):
    return batch.teacher_images if batch.teacher_images is not None else batch.images


def _commit_epoch(out: Path, epoch: int) -> None:
    tmp, final = out / store.temp_name(epoch), out / store.epoch_name(epoch)
    store.fsync_path(tmp)
    checksum = store.epoch_sha256(tmp)  # the bytes as written, read back once before the commit
    os.replace(tmp, final)
    store.fsync_path(out)
    manifest = store.read_manifest(out)
    manifest["epochs_done"] = sorted(set(manifest.get("epochs_done", [])) | {epoch})
    manifest["epoch_sha256"] = {**manifest.get("epoch_sha256", {}), str(epoch): checksum}
    store.write_json_atomic(out / store.MANIFEST, manifest)


def _size(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if nbytes < 1000 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1000
    return f"{nbytes} B"  # pragma: no cover


def _ranges(values) -> str:
    return store._ranges(values)


def epochs_text(epochs) -> str:
    """``"1 epoch (epoch 0)"``, ``"3 epochs (0-2)"``: a count, then the 0-based indices."""
    epochs = list(epochs)
    if len(epochs) == 1:
        return f"1 epoch (epoch {epochs[0]})"
    return f"{len(epochs)} epochs ({_ranges(epochs)})"


def storage_table(num_classes: int, num_samples: int, top_ks=(5, 10, 20)) -> list[dict]:
    """Bytes per image per epoch of each format, and per epoch for ``num_samples`` images."""
    rows = []
    for dtype in store.DTYPES:
        b = store.bytes_per_row("full", dtype, num_classes, None)
        rows.append({"format": f"full {dtype}", "bytes_per_image": b, "bytes_per_epoch": b * num_samples})
    for k in top_ks:
        for dtype in ("fp16", "fp32"):
            b = store.bytes_per_row("topk", dtype, num_classes, k)
            rows.append({"format": f"topk K={k} {dtype}", "bytes_per_image": b, "bytes_per_epoch": b * num_samples})
    return rows


__all__ = ["CacheSpec", "build_cache", "run_fields", "first_mismatch", "storage_table", "train_loader"]
