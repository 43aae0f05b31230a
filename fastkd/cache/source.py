"""``fastkd train --teacher-cache DIR``: the teacher source that reads a cache instead of a model.

:class:`CachedTeacher` is a :class:`fastkd.engine.teacher.TeacherSource` without a model: for
each batch it gathers the cached rows of ``batch.indices`` at the current epoch (one memory-
mapped read on the host in :meth:`~CachedTeacher.submit`, one batch ahead, then an asynchronous
copy to the device) and returns them as the batch's teacher output: a dense ``(N, C)`` tensor
(full format, in the stored dtype; the losses upcast to fp32) or a
:class:`fastkd.losses.compressed.TopKTeacher` (top-k format, read by the losses as is).

Before the first batch, :func:`check_cache` compares the cache's manifest with the run (data
index, classes, seed, augmentation, teacher view size and normalisation, the epochs the run
needs, and the teacher / checkpoint when the run names them) and refuses a mismatch with a
one-line message naming the field.
"""
from __future__ import annotations

import logging
import threading
from typing import Iterable, Optional

import numpy as np
import torch

from ..engine.teacher import TeacherOutput, TeacherSource
from . import store
from .build import first_mismatch, run_fields

logger = logging.getLogger("fastkd")


def epochs_needed(cfg) -> range:
    """The epochs in which a run reads its teacher (ESKD stops at ``--eskd-stop-epoch``)."""
    stop = cfg.epochs if cfg.eskd_stop_epoch is None else min(cfg.epochs, cfg.eskd_stop_epoch)
    return range(stop)


def check_cache(manifest: dict, wanted: dict, epochs: Iterable[int], *, root="", teacher: Optional[str] = None,
                teacher_checkpoint: Optional[str] = None) -> None:
    """Raise :class:`~fastkd.cache.store.CacheMismatchError` naming the first field that does not fit."""
    where = f"teacher cache {root}: " if root else "teacher cache: "
    problem = first_mismatch(manifest, wanted)
    if problem is None:
        missing = sorted(set(epochs) - set(int(e) for e in manifest.get("epochs_done", [])))
        if missing:
            done = store._ranges(manifest.get("epochs_done", []))
            problem = (f"epochs not covered: this run needs epoch(s) {store._ranges(missing)}, the cache holds "
                       f"{done} (build more with 'fastkd cache build --epochs {max(missing) + 1}')")
    if problem is None and teacher is not None and teacher != manifest.get("teacher"):
        problem = f"teacher: cache has {manifest.get('teacher')!r}, this run names {teacher!r}"
    if problem is None and teacher_checkpoint is not None:
        sha = store.file_sha256(teacher_checkpoint)
        if sha != manifest.get("teacher_checkpoint_sha256"):
            problem = (f"teacher checkpoint: {teacher_checkpoint} (sha256 {sha[:12]}..) is not the one the cache "
                       f"was built from ({str(manifest.get('teacher_checkpoint_sha256'))[:12]}..)")
    if problem is not None:
        raise store.CacheMismatchError(where + "does not match this run: " + problem)


def teacher_temperatures(cfg) -> list:
    """The temperatures the run's logit method applies to the teacher (ISATS: its candidates too)."""
    from ..engine import config as C
    from ..losses.methods import defaults, loss_kwargs, params_for

    method = C.logit_method(cfg)
    params = {**defaults(method), **loss_kwargs(method, cfg)}
    temps = []
    for p in params_for(method):  # the table says which parameters divide the teacher's logits
        if p.kind in ("temperature", "candidates") and p.scales != "student" and params.get(p.name) is not None:
            value = params[p.name]
            temps += list(value) if p.kind == "candidates" else [value]
    return [float(t) for t in temps]


def warn_topk_temperature(cfg) -> None:
    """Top-K rows keep the tail's softmax mass exactly at T = 1 only (docs/methods.md §10); at
    T = 4 on a 100-class task they cost tens of points of student top-1 (see
    benchmarks/results/cache-cpu-topk-accuracy.md). Say so when the run's teacher temperature is not 1."""
    temps = sorted({t for t in teacher_temperatures(cfg) if t != 1.0})
    if temps:
        logger.warning("fastkd: a top-k teacher cache with teacher temperature(s) %s: the fill value keeps the "
                       "absent classes' mass only at T = 1, so at these temperatures the soft targets over-weight "
                       "the tail (measured: large accuracy losses at T = 4 for K <= 10); prefer --format full",
                       ", ".join(f"{t:g}" for t in temps))


def _expect(trainer) -> dict:
    """The run's manifest fields. A run that says nothing of the teacher's normalisation (no
    --teacher-pretrained, --teacher-mean/--teacher-std or checkpoint record) takes the cache's: it
    never runs the teacher, so only a normalisation it states can contradict the cache."""
    expect = run_fields(trainer.cfg, trainer.train_loader)
    view = getattr(trainer, "teacher_view", None)
    if view is not None and not view.stated:
        try:
            cached = store.read_manifest(trainer.cfg.teacher_cache).get("view", {})
        except (OSError, ValueError):
            return expect  # the reader reports it
        for key in ("mean", "std"):
            if key in cached:
                expect["view"][key] = cached[key]
    return expect


def _check_hub_teacher(cfg, manifest: dict) -> None:
    """A run naming hub weights (--teacher-pretrained) or --teacher-classes must name the cache's."""
    if cfg.teacher_pretrained:
        from ..engine.teacher_setup import weights_identity

        mine, theirs = weights_identity(cfg), manifest.get("teacher_weights")
        if mine != theirs:
            raise store.CacheMismatchError(f"teacher cache {cfg.teacher_cache}: does not match this run: teacher "
                                           f"weights: cache has {theirs!r}, this run names {mine!r}")
    if cfg.teacher_classes is not None and cfg.teacher_classes != manifest.get("teacher_classes"):
        raise store.CacheMismatchError(f"teacher cache {cfg.teacher_cache}: does not match this run: teacher classes: "
                                       f"cache has {manifest.get('teacher_classes')!r}, this run names "
                                       f"{cfg.teacher_classes!r}")


class CachedTeacher(TeacherSource):
    """Teacher outputs read from a cache built by ``fastkd cache build``.

    Args:
        root: the cache folder.
        device: where the outputs go.
        expect: the run's :func:`fastkd.cache.build.run_fields` (checked against the manifest).
        epochs: the epochs the run will ask for.
        teacher, teacher_checkpoint: when the run names them, they must be the cache's.
    """

    has_model = False
    provides_features = False
    concurrent = False

    def __init__(self, root, device: torch.device, *, expect: dict, epochs: Iterable[int],
                 teacher: Optional[str] = None, teacher_checkpoint: Optional[str] = None, paths=None,
                 labels=None):
        epochs = list(epochs)
        self.reader = store.CacheReader(root)
        check_cache(self.reader.manifest, expect, epochs, root=root, teacher=teacher,
                    teacher_checkpoint=teacher_checkpoint)
        if paths is not None:
            check_data_files(self.reader, paths)
        self._labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self._check: Optional[_EpochCheck] = None
        for epoch in epochs:  # a missing, truncated or misshapen epoch file is refused now, not epochs later
            self.reader.epoch(int(epoch))
        self.reader._open.clear()
        self.device = torch.device(device)
        self.epoch: Optional[int] = None
        self._pin = self.device.type == "cuda"
        m = self.reader.manifest
        logger.info("fastkd: teacher outputs from the cache %s (%s, %s %s%s): no teacher model, no teacher forward",
                    root, m.get("teacher"), m["format"], m["dtype"], f" K={m['top_k']}" if m.get("top_k") else "")

    @classmethod
    def for_trainer(cls, trainer) -> "CachedTeacher":
        """The source for a :class:`~fastkd.engine.trainer.Trainer` whose config has ``teacher_cache``
        (pass it as ``Trainer(cfg, teacher_source=CachedTeacher.for_trainer)``)."""
        cfg = trainer.cfg
        index = trainer.train_loader.index
        src = cls(cfg.teacher_cache, trainer.device, expect=_expect(trainer), epochs=epochs_needed(cfg),
                  teacher=cfg.teacher, teacher_checkpoint=cfg.teacher_checkpoint, paths=index,
                  labels=index.labels)
        _check_hub_teacher(cfg, src.reader.manifest)
        build = src.reader.manifest.get("build", {})
        here = {"amp": getattr(trainer, "amp", None), "channels_last": cfg.channels_last,
                "device": trainer.device.type}
        differ = [f"{k} {build.get(k)!r} (cache) vs {v!r} (run)" for k, v in here.items()
                  if v is not None and k in build and build[k] != v]
        if differ:
            # Same views, same teacher; only how its forward was computed differs (rounding).
            logger.warning("fastkd: the teacher cache was computed with other numerics than this run would use "
                           "(%s): the logits may differ from the online teacher's in the last bits",
                           "; ".join(differ))
        if src.format == "topk":
            warn_topk_temperature(cfg)
        return src

    def identity(self) -> dict:
        """What this cache holds (saved in checkpoints: a resume from a rebuilt cache is noticed)."""
        m = self.reader.manifest
        keys = ("teacher", "teacher_checkpoint_sha256", "format", "dtype", "top_k", "seed", "augmentation", "view")
        return {"cache": {k: m.get(k) for k in keys}, "index_sha256": m["data"].get("index_sha256"),
                "build": {k: m.get("build", {}).get(k) for k in ("amp", "channels_last", "device")}}

    @property
    def format(self) -> str:
        return self.reader.format

    @property
    def teacher_name(self) -> str:
        """How the run names its teacher: the cached teacher and the cache folder."""
        return f"{self.reader.manifest.get('teacher')} (cached in {self.reader.root})"

    def set_epoch(self, epoch: int) -> None:
        arr = self.reader.epoch(int(epoch))  # maps the file (and checks its shape) before the first batch
        if self.reader.format == "topk":  # a damaged class index would reach scatter_ (a device assert)
            store.check_topk_rows(arr, self.reader.num_classes, self.reader.root / store.epoch_name(int(epoch)))
        self.epoch = int(epoch)
        if self._check is None or self._check.epoch != self.epoch:
            if self._check is not None:
                self._check.join()
            self._check = _EpochCheck(self.reader, self.epoch, self._labels)

    def epoch_report(self, epoch: Optional[int] = None) -> dict:
        """Wait for the background check of the open epoch (``epoch``: only if it is that one) and
        return what it measured: ``teacher_train_top1``, the cached teacher's top-1 (%) on this
        epoch's training views. Raises ``ValueError`` when the epoch file fails its checksum or
        holds a non-finite row; the trainer calls this before writing any checkpoint."""
        check = self._check
        if check is None or (epoch is not None and check.epoch != int(epoch)):
            return {}
        return check.result()

    def submit(self, batch):
        if self.epoch is None:
            raise RuntimeError("CachedTeacher.submit before set_epoch")
        if batch.indices is None:
            raise ValueError("the teacher cache needs batch.indices (the dataset sample index of every row); "
                             "this loader gives none (synthetic data?)")
        rows = self.reader.rows(self.epoch, batch.indices.numpy())
        if self.device.type != "cpu":
            rows = {k: (v.pin_memory() if self._pin else v).to(self.device, non_blocking=True) for k, v in rows.items()}
        return rows

    def result(self, handle) -> TeacherOutput:
        if self.reader.format == "full":
            return TeacherOutput(handle["logits"])
        from ..losses.compressed import TopKTeacher

        return TeacherOutput(TopKTeacher(values=handle["values"], indices=handle["indices"],
                                         label_logit=handle["label"], fill=handle["fill"],
                                         num_classes=self.reader.num_classes))

    def close(self) -> None:
        if self._check is not None:
            self._check.join()
        self.reader._open.clear()


def check_data_files(reader: store.CacheReader, paths) -> None:
    """Refuse a cache whose training images changed (size or modification time) since its build:
    their cached logits would be another image's. ``fastkd cache verify`` compares contents."""
    records = store.read_data_files(reader.root, reader.manifest)
    if records is None:
        logger.warning("fastkd: the teacher cache %s was built before fastkd recorded the data files: images "
                       "changed since its build cannot be detected", reader.root)
        return
    data, paths = paths, list(getattr(paths, "paths", paths))  # a data index (tar shards too) or paths
    if len(paths) != len(records):
        return  # the sample count differs: check_cache has refused it already
    changed = store.changed_files(records, data)
    if changed:
        raise store.CacheMismatchError(
            f"teacher cache {reader.root}: the data file {paths[changed[0]]} changed after the cache was built "
            f"(size or modification time differ{f'; {len(changed) - 1} more file(s) too' if len(changed) > 1 else ''}"
            f"): its cached teacher logits are stale; rebuild the cache, or check the contents with 'fastkd cache "
            f"verify {reader.root} --data DIR'")


class _EpochCheck:
    """One epoch file, checked in a background thread while the epoch trains: its SHA-256 against
    the manifest's, every row finite, and the teacher's top-1 on the training views (the rows'
    argmax against the labels; all-zero rows, left by files skipped as corrupt, are not counted)."""

    CHUNK_ROWS = 8192

    def __init__(self, reader: store.CacheReader, epoch: int, labels: Optional[np.ndarray]):
        self.reader, self.epoch, self.labels = reader, epoch, labels
        self.path = reader.root / store.epoch_name(epoch)
        self.want = reader.manifest.get("epoch_sha256", {}).get(str(epoch))
        self.error: Optional[BaseException] = None
        self.report: dict = {}
        self._thread = threading.Thread(target=self._run, name=f"fastkd-cache-check-{epoch}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            if self.want is not None:
                got = store.epoch_sha256(self.path)
                if got != self.want:
                    raise ValueError(f"teacher cache {self.reader.root}: {self.path.name} fails its checksum (its bytes "
                                     "changed after the build: disk or copy damage); rebuild it with 'fastkd cache "
                                     "build' (no checkpoint of this epoch was written)")
            self.report = self._rows()
        except BaseException as exc:  # handed to the training thread by result()
            self.error = exc

    def _rows(self) -> dict:
        arr = np.load(self.path, mmap_mode="r", allow_pickle=False)
        r = self.reader
        hits = counted = 0
        for start in range(0, len(arr), self.CHUNK_ROWS):
            rows = arr[start:start + self.CHUNK_ROWS]
            if r.format == "full":
                v = from_storage_float(rows, r.dtype)
                pred, nonzero = v.argmax(1), (v != 0).any(1)
            else:
                v = torch.cat([from_storage_float(rows["values"], r.dtype),
                               from_storage_float(rows["label"], r.dtype)[:, None],
                               from_storage_float(rows["fill"], r.dtype)[:, None]], 1)
                pred = torch.from_numpy(np.ascontiguousarray(rows["indices"][:, 0]).astype(np.int64))
                nonzero = (v != 0).any(1)
            bad = ~torch.isfinite(v).all(1)
            if bool(bad.any()):
                row = start + int(bad.nonzero()[0])
                raise ValueError(f"teacher cache {r.root}: {self.path.name} row {row} is not finite (NaN or inf); "
                                 "rebuild the cache with 'fastkd cache build'")
            if self.labels is not None:
                y = torch.from_numpy(self.labels[start:start + len(rows)])
                hits += int(((pred == y) & nonzero).sum())
                counted += int(nonzero.sum())
        if self.labels is None or counted == 0:
            return {}
        return {"teacher_train_top1": 100.0 * hits / counted}

    def join(self) -> None:
        self._thread.join()

    def result(self) -> dict:
        self._thread.join()
        if self.error is not None:
            raise self.error
        return self.report


def from_storage_float(a: np.ndarray, dtype: str) -> torch.Tensor:
    return store.from_storage(np.array(a), dtype).float()  # a copy: the memory map is read-only


__all__ = ["CachedTeacher", "check_cache", "epochs_needed"]
