"""The NVIDIA DALI backend.

Pipeline (one per pass over a shard plan; built with ``enable_checkpointing=True``):

* ``fn.readers.file`` reads the shard's files in the order of :func:`fastkd.data.index.shard_plan`
  (DALI's own shuffling and sharding are off: we hand it the exact list, so DALI and the torch
  backend read the same samples, and the order is fixed by seed and epoch). Its "label" output is
  the sample's position in that list; labels, validity flags and dataset indices are looked up
  from it in Python.
* Tar shards (:mod:`fastkd.data.shards`): ``fn.external_source`` hands the pipeline the planned
  samples' bytes (read by offset from the shards) in place of ``fn.readers.file``; the rest of the
  graph is the same, with the same seeds, so shards give the batches of the folder they were
  written from. (``fn.readers.webdataset`` reads each shard front to back, so it cannot follow the
  per-epoch order of the whole data set.)
* Train: ``fn.decoders.image_random_crop`` decodes only the random window (area 0.08-1,
  aspect 3/4-4/3; nvJPEG on the GPU with ``device="mixed"``), then one ``fn.resize`` per output
  size and one ``fn.crop_mirror_normalize`` per view with a shared ``fn.random.coin_flip``: the
  teacher view is cut from the same window with the same flip, never a second random crop.
* Validation: decode, resize the shorter side to ``image_size / 0.875``, centre crop.
* ``augment="cifar"``: decode, the image at ``image_size`` (resize + centre crop, the identity for
  an image of that size); training then cuts a window of the image zero-padded by 4 pixels
  (``fn.slice`` with padding) and flips it. The window and flip are drawn in Python per sample,
  keyed like the torch backend's (so both backends cut the same crops, with or without a DALI
  checkpoint), and reach the graph through the reader's integer label.
* Output NCHW, or NHWC memory (channels_last), in fp32/fp16 straight from DALI; DALI has no bf16
  output, so bf16 is produced from its fp32 output on the device (said once in the log).

Without a GPU (or on a CPU device) the same graph runs CPU-only: ``device_id=None``, CPU decoders.

A pipeline's file list is fixed when it is built, so every epoch gets a new pipeline; the next
one is built on a background thread as soon as a pass ends (hidden behind validation).

Resume: a state_dict taken mid-epoch carries the DALI pipeline checkpoint (reader position and the
states of every random generator), so a resumed run produces the very same batches. A state
without a usable checkpoint (taken by the torch backend, or with other pipeline settings) resumes
at the same remaining samples with fresh augmentation draws.

Corrupt files: a decoding error stops a DALI pipeline, so the files of the failing batches are
re-checked with PIL to name the culprit; with ``skip_corrupt`` the pass continues from there
with a new pipeline that reads a placeholder file (uniform grey) in the corrupt file's place, its
row flagged ``valid=False``: batches keep their size and every shard its number of batches.
"""
from __future__ import annotations

import base64
import hashlib
import json
from typing import Iterator, Optional

import numpy as np
import torch

from .._compat import log_once
from .base import PLACEHOLDER_GREY, Batch, BaseLoader
from .decode import CIFAR_PAD, cifar_crops, decode_error
from .index import TRAIN_RATIO, TRAIN_SCALE, ShardPlan, derive_seed, val_resize_size

# Batches DALI may be working on ahead of the one that failed (pipeline prefetch plus the
# reader's queue); the files of this many batches are re-checked when a decode fails.
_SUSPECT_BATCHES = 4


# "cifar" training crops are drawn in Python, keyed per sample like the torch backend's, and
# travel through the reader's integer label: label = position * _CODE_BASE + code, with
# code = (top * (2 * pad + 1) + left) * 2 + flip.
_CODE_BASE = 256
_CIFAR_OFFSETS = 2 * CIFAR_PAD + 1
assert _CIFAR_OFFSETS * _CIFAR_OFFSETS * 2 <= _CODE_BASE


def _cifar_codes(seed: int, epoch: int, keys) -> list:
    tops, lefts, flips = cifar_crops(seed, epoch, keys)
    return ((tops * _CIFAR_OFFSETS + lefts) * 2 + flips).tolist()


def _make_pipeline(files, *, train: bool, sizes: tuple, norms: list, decoder_device: str, on_gpu: bool,
                   out_dtype: str, layout: str, batch_size: int, num_threads: int, device_id, seed: int,
                   checkpoint: Optional[str], augment: str = "imagenet", codes: Optional[list] = None,
                   read=None):
    """Build the DALI pipeline for one pass over ``files`` (see the module docstring).

    ``codes``: for "cifar" training, the crop code of every file (see ``_cifar_codes``).
    ``read``: None, or ``read(item) -> bytes`` for each item of ``files`` (tar shards): the
    bytes reach the same graph through ``fn.external_source`` instead of ``fn.readers.file``.
    """
    from nvidia.dali import fn, pipeline_def, types

    dtype = {"float32": types.FLOAT, "float16": types.FLOAT16}[out_dtype]
    op_device = "gpu" if on_gpu else "cpu"

    @pipeline_def(batch_size=batch_size, num_threads=max(1, num_threads), device_id=device_id, seed=seed,
                  enable_checkpointing=True, prefetch_queue_depth=2)
    def pipeline():
        # labels = position in ``files``: Python maps it back to label / validity / dataset index.
        labels = list(range(len(files)))
        if codes is not None:
            labels = [p * _CODE_BASE + c for p, c in zip(labels, codes)]
        if read is None:
            jpegs, pos = fn.readers.file(files=list(files), labels=labels, random_shuffle=False,
                                         pad_last_batch=True, name="Reader")
        else:
            jpegs, pos = fn.external_source(source=_ShardSource(list(files), labels, read, batch_size),
                                            num_outputs=2, batch=True, batch_info=True,
                                            dtype=[types.UINT8, types.INT32])
        resize = dict(device=op_device, interp_type=types.INTERP_LINEAR, antialias=True, subpixel_scale=False)
        if augment == "cifar":
            images = fn.decoders.image(jpegs, device=decoder_device, output_type=types.RGB,
                                       jpeg_fancy_upsampling=True)
            if on_gpu and decoder_device == "cpu":
                images = images.gpu()
            side = sizes[0]
            # the image at the student's size: a resize to the size it has is the identity
            images = fn.resize(images, resize_shorter=side, **resize)
            images = fn.crop(images, device=op_device, crop=(side, side), crop_pos_x=0.5, crop_pos_y=0.5)
            mirror = 0
            if codes is not None:  # training: decode the crop drawn in Python from the label
                code = pos - (pos // _CODE_BASE) * _CODE_BASE
                pos = pos // _CODE_BASE
                top = code // (2 * _CIFAR_OFFSETS)
                rest = code - top * (2 * _CIFAR_OFFSETS)
                left = rest // 2
                mirror = rest - left * 2
                images = fn.slice(images, device=op_device, start=fn.cat(top - CIFAR_PAD, left - CIFAR_PAD),
                                  shape=[side, side], axes=[0, 1], out_of_bounds_policy="pad", fill_values=0)
            resized = [images if s == side else fn.resize(images, resize_x=s, resize_y=s, **resize) for s in sizes]
            return (*[fn.crop_mirror_normalize(
                resized[size_idx], device=op_device, dtype=dtype, output_layout=layout, mirror=mirror,
                mean=[255.0 * m for m in mean], std=[255.0 * s for s in std]) for size_idx, mean, std in norms], pos)
        # Fancy (smooth) chroma upsampling is what libjpeg, PIL and torchvision do; with it the
        # CPU decoder matches PIL bit for bit. nvJPEG before 13.2 cannot combine it with the
        # region-of-interest decode of the training crop (DALI ignores it there, with a warning
        # per thread), so the GPU training decode uses plain upsampling.
        fancy = decoder_device == "cpu" or not train
        if train:
            # Explicit seeds: DALI's automatic ones follow the operators' places in the graph, so a
            # reader swapped for another (tar shards) would draw other crops from the same seed.
            images = fn.decoders.image_random_crop(
                jpegs, device=decoder_device, output_type=types.RGB, seed=derive_seed(seed, 1),
                random_area=list(TRAIN_SCALE),
                random_aspect_ratio=list(TRAIN_RATIO), num_attempts=10, jpeg_fancy_upsampling=fancy)
        else:
            images = fn.decoders.image(jpegs, device=decoder_device, output_type=types.RGB,
                                       jpeg_fancy_upsampling=fancy)
        if on_gpu and decoder_device == "cpu":
            images = images.gpu()
        # subpixel_scale=False: scale = input / rounded output size, as PIL and torchvision resize.
        if train:  # one flip for all views; each view resizes the one decoded window
            mirror = fn.random.coin_flip(probability=0.5, seed=derive_seed(seed, 2))
            resized = [fn.resize(images, resize_x=s, resize_y=s, **resize) for s in sizes]
        else:
            mirror = 0
            resized = [fn.resize(images, resize_shorter=val_resize_size(s), **resize) for s in sizes]
        outs = []
        for size_idx, mean, std in norms:
            side = sizes[size_idx]
            crop = {} if train else dict(crop=(side, side), crop_pos_x=0.5, crop_pos_y=0.5)  # val: centre crop
            outs.append(fn.crop_mirror_normalize(
                resized[size_idx], device=op_device, dtype=dtype, output_layout=layout, mirror=mirror,
                mean=[255.0 * m for m in mean], std=[255.0 * s for s in std], **crop))
        return (*outs, pos)

    return pipeline(checkpoint=checkpoint) if checkpoint is not None else pipeline()


class _ShardSource:
    """``fn.external_source`` callback: batch ``iteration`` of a pass, as (bytes, label) lists.

    Keyed by DALI's iteration counter, which a pipeline checkpoint restores, so a resumed pass
    continues at the batch it stopped at; the last batch may be short (no padding to drop).
    """

    def __init__(self, items: list, labels: list, read, batch_size: int):
        self.items, self.labels, self.read, self.batch_size = items, labels, read, batch_size

    def __call__(self, info):
        lo = info.iteration * self.batch_size
        if lo >= len(self.items):
            raise StopIteration
        hi = min(lo + self.batch_size, len(self.items))
        data = [np.frombuffer(self.read(item), dtype=np.uint8) for item in self.items[lo:hi]]
        return data, [np.array([label], dtype=np.int32) for label in self.labels[lo:hi]]


class DaliLoader(BaseLoader):
    backend = "dali"

    def __init__(self, index, spec, *, gpu_decode: Optional[bool] = None):
        super().__init__(index, spec, num_samples_total=len(index), classes=index.classes)
        import nvidia.dali  # noqa: F401  (fail early, in the caller, when it is missing)

        self._on_gpu = spec.device.type == "cuda"
        # On a GPU, decode there by default ("mixed": nvJPEG, with the hardware JPEG engine where
        # the GPU has one); gpu_decode=False decodes on the CPU and does the rest on the GPU.
        self._decoder_device = "mixed" if self._on_gpu and gpu_decode is not False else "cpu"
        self.decoder = "nvJPEG" if self._decoder_device == "mixed" else "libjpeg-turbo"
        self._norms = [(i, v.mean, v.std) for i, v in zip(self._view_of, self._views)]
        self._out_dtype = "float16" if spec.dtype == torch.float16 else "float32"
        if spec.dtype == torch.bfloat16:
            log_once("fastkd.data: DALI has no bfloat16 output; it normalises to fp32 and the batch is "
                     "cast to bf16 on the device (same values, one extra pass)")
        self._layout = "HWC" if spec.channels_last else "CHW"
        self._names = [f"view{i}" for i in range(len(self._views))] + ["pos"]
        # Identifies the pipeline graph: a checkpoint only restores into an identical one.
        self._config_id = hashlib.sha1(json.dumps(
            ["v2", spec.train, spec.augment, self._sizes, self._norms, self._decoder_device, self._out_dtype,
             self._layout],
            default=str).encode()).hexdigest()[:16]
        self._active = None  # the running pass: {"it", "entries", "start", "substituted", "consumed"}
        self._ahead = None  # (epoch, start, substituted, future) of a pipeline built in the background
        self._builder = None  # a one-thread executor for those builds, made on first use
        self._placeholder = None  # path of the grey image read in place of corrupt files, made on first use
        # dataset index -> a UTF-8 path DALI can take (tar shards are read by offset, not by name)
        self._aliases = {} if hasattr(self.index, "read") else self._alias_undecodable_names()

    def close(self) -> None:
        """Drop the running and the prebuilt pipelines (their threads end with them) and the
        builder thread."""
        self._active = None
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead[3].cancel()
        if self._builder is not None:
            self._builder.shutdown(wait=True)
            self._builder = None

    def _placeholder_path(self) -> str:
        """A small uniform-grey PNG that stands in for corrupt files (removed with the loader)."""
        if self._placeholder is None:
            import os
            import shutil
            import tempfile
            import weakref

            from PIL import Image

            folder = tempfile.mkdtemp(prefix="fastkd-placeholder-")
            path = os.path.join(folder, "placeholder.png")
            Image.new("RGB", (32, 32), (PLACEHOLDER_GREY,) * 3).save(path)
            weakref.finalize(self, shutil.rmtree, folder, True)
            self._placeholder = path
        return self._placeholder

    def _read_sample(self, i: int) -> bytes:
        """Bytes of dataset sample ``i`` of a shard index (-1: the placeholder image)."""
        if i < 0:
            with open(self._placeholder_path(), "rb") as fh:
                return fh.read()
        return self.index.read(i)

    def _alias_undecodable_names(self) -> dict:
        """Symbolic links with UTF-8 names to the files whose names are not UTF-8.

        DALI's reader takes file names as UTF-8 strings only (a name such as ``caf\\xe9.jpg``
        written in Latin-1 stops it with "Unsupported argument type with name files"); the torch
        backend reads such files, so DALI reads them through a link in a temporary folder (removed
        with the loader). Error messages still name the original file.
        """
        import os

        aliases = {}
        folder = None
        for index, path in enumerate(self.index.paths):
            if path.isascii():
                continue
            try:
                path.encode("utf-8")
                continue
            except UnicodeEncodeError:
                pass
            if folder is None:
                import shutil
                import tempfile
                import weakref

                folder = tempfile.mkdtemp(prefix="fastkd-names-")
                weakref.finalize(self, shutil.rmtree, folder, True)
            suffix = os.path.splitext(path)[1]
            link = os.path.join(folder, f"{index}{suffix if suffix.isascii() else ''}")
            try:
                os.symlink(os.path.abspath(os.fsencode(path)), link)
            except OSError as exc:
                raise OSError(f"DALI cannot read {path!r}: its name is not UTF-8 and no link to it could be made "
                              f"({exc.strerror}); rename the file or use the torch backend (--data-backend torch)"
                              ) from None
            aliases[index] = link
        if aliases:
            example = self.index.paths[next(iter(aliases))]
            log_once(f"fastkd.data: {len(aliases)} file name(s) are not UTF-8 (e.g. {example!r}); "
                     f"DALI reads them through links with UTF-8 names")
        return aliases

    # ---- one pass ------------------------------------------------------------------------------
    def _build(self, plan: ShardPlan, start: int, substituted: list, checkpoint: Optional[str] = None):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        s = self.spec
        entries = np.arange(start, len(plan), dtype=np.int64)
        bad = set(substituted)
        read = None
        if hasattr(self.index, "read"):  # tar shards: the planned samples' bytes, read by offset
            files = [-1 if i in bad else i for i in plan.indices[entries].tolist()]
            read = self._read_sample
        else:
            paths, aliases = self.index.paths, self._aliases
            files = [self._placeholder_path() if i in bad else aliases.get(i) or paths[i]
                     for i in plan.indices[entries].tolist()]
        codes = None
        if s.augment == "cifar" and s.train:
            if len(files) * _CODE_BASE >= 2**31:
                raise ValueError(f"augment='cifar' with the DALI backend reads at most {2**31 // _CODE_BASE} files "
                                 f"per shard and epoch, this shard has {len(files)}; use more shards or backend='torch'")
            codes = _cifar_codes(s.seed, plan.epoch, plan.keys[entries])
        pipe = _make_pipeline(
            files, augment=s.augment, codes=codes, train=s.train, sizes=self._sizes,
            norms=self._norms, decoder_device=self._decoder_device, on_gpu=self._on_gpu,
            out_dtype=self._out_dtype, layout=self._layout, batch_size=s.batch_size, num_threads=s.num_threads,
            device_id=s.device.index if self._on_gpu else None,
            seed=derive_seed(s.seed, plan.epoch, s.shard_id, start), checkpoint=checkpoint, read=read)
        # The epoch length comes from the reader (reader_name); PARTIAL keeps the last, short batch.
        # prepare_first_batch=False: the first batch would run inside the constructor, where a
        # decode error would escape the recovery in _run.
        it = DALIGenericIterator([pipe], self._names, reader_name=None if read else "Reader",
                                 last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=False,
                                 prepare_first_batch=False)
        return {"it": it, "entries": entries, "start": start, "substituted": substituted, "consumed": 0}

    def _run(self, plan: ShardPlan, start: int, resume_extra: Optional[dict]) -> Iterator[tuple[Batch, int]]:
        active = self._restore(plan, start, resume_extra)
        if active is None:
            if start >= len(plan):
                return
            active = self._take_ahead(plan.epoch, start)
            if active is None:
                active = self._build(plan, start, sorted(self._skipped))
        self._active = active
        finished = False
        try:
            while active["consumed"] < len(active["entries"]):
                try:
                    out = next(active["it"])[0]
                except StopIteration:
                    break
                except RuntimeError as exc:  # DALI stops on a file it cannot decode
                    active = self._recover(plan, active, exc)
                    self._active = active
                    continue
                pos = out["pos"].view(-1).numpy().astype(np.int64)
                entries = active["entries"][pos]
                active["consumed"] = int(pos[-1]) + 1
                views = [self._finish(out[name]) for name in self._names[:-1]]
                left = active["entries"][active["consumed"]:]
                position = int(left[0]) if len(left) else len(plan)
                yield self._batch(views, *self._labels_valid_indices(plan, entries)), position
            finished = True
        finally:
            if self._active is active:  # a newer pass may have replaced it already
                self._active = None
            active["it"] = None  # free this pass's pipeline before another one is built
        if finished:
            self._build_ahead(plan.epoch + 1)  # the epoch a finished pass moves on to

    # ---- the next epoch's pipeline, built while the engine validates / checkpoints -------------
    def _build_ahead(self, epoch: int) -> None:
        """Start building the first pipeline of ``epoch`` on a background thread.

        A pass reads a per-epoch file list, so every epoch needs a new DALI pipeline (about a
        second on a GPU: nvJPEG state, buffers); building it as soon as a pass ends hides that
        behind the engine's validation and checkpointing. The result is the pipeline the next
        pass would build itself (same files, same seed), so it changes timing only.
        """
        from concurrent.futures import ThreadPoolExecutor

        plan = self._plan(epoch)
        if self._builder is None:
            self._builder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastkd-dali-build")
        substituted = sorted(self._skipped)
        self._ahead = (epoch, 0, substituted, self._builder.submit(self._build, plan, 0, substituted))

    def _take_ahead(self, epoch: int, start: int) -> Optional[dict]:
        """The pipeline built ahead, if it is the one this pass needs (else it is dropped)."""
        ahead, self._ahead = self._ahead, None
        if ahead is None or ahead[:3] != (epoch, start, sorted(self._skipped)):
            return None
        return ahead[3].result()  # a build error surfaces here, as it would have inline

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        if self._layout == "HWC":
            x = x.permute(0, 3, 1, 2)  # NCHW view of NHWC memory: channels_last
        if self.spec.dtype == torch.bfloat16:
            x = x.to(torch.bfloat16)  # keeps the memory format
        return x

    def _recover(self, plan: ShardPlan, active: dict, exc: RuntimeError) -> dict:
        """A decode error: name the file (and raise), or skip it and rebuild from the failed batch
        with a placeholder in its place."""
        left = active["entries"][active["consumed"]:]
        suspects = left[: _SUSPECT_BATCHES * self.spec.batch_size]
        bad = []
        for k in suspects:
            index = int(plan.indices[k])
            try:  # a file, or a member of a tar shard (an index with ``open``)
                source = self.index.open(index) if hasattr(self.index, "open") else self.index.paths[index]
            except OSError as exc:
                error = f"{type(exc).__name__}: {exc}"
            else:
                error = decode_error(source)
            if error is not None:
                bad.append((index, error))
        if not bad:
            names = ", ".join(repr(self.index.paths[int(plan.indices[k])]) for k in suspects[:8])
            raise RuntimeError(f"DALI failed while reading these files (PIL decodes them all, so the failure "
                               f"is DALI's; e.g. 32-bit integer or bilevel TIFFs: convert such files to PNG "
                               f"or JPEG, or use backend='torch'): {names} ...\n{exc}") from exc
        for index, error in bad:
            self._skip_or_raise(index, error)  # raises CorruptImageError unless skip_corrupt
        active["it"] = None  # the failed pipeline is unusable; drop it before building the next
        return self._build(plan, int(left[0]), sorted(self._skipped))

    # ---- resume --------------------------------------------------------------------------------
    def _extra_state(self) -> dict:
        active = self._active
        if active is None or not hasattr(active["it"], "checkpoints"):
            return {}
        checkpoint = active["it"].checkpoints()[0]
        if isinstance(checkpoint, bytes):
            checkpoint = "b64:" + base64.b64encode(checkpoint).decode("ascii")
        return {"dali_checkpoint": checkpoint, "dali_config": self._config_id, "dali_start": active["start"],
                "dali_substituted": list(active["substituted"]), "dali_consumed": active["consumed"]}

    def _restore(self, plan: ShardPlan, start: int, extra: Optional[dict]) -> Optional[dict]:
        if not extra or "dali_checkpoint" not in extra:
            return None
        if extra.get("dali_config") != self._config_id:
            log_once("fastkd.data: the DALI checkpoint in the loader state was made with other pipeline settings; "
                     "resuming at the same samples with fresh augmentation draws")
            return None
        checkpoint = extra["dali_checkpoint"]
        if isinstance(checkpoint, str) and checkpoint.startswith("b64:"):
            checkpoint = base64.b64decode(checkpoint[4:])
        active = self._build(plan, int(extra["dali_start"]), [int(i) for i in extra["dali_substituted"]],
                             checkpoint=checkpoint)
        active["consumed"] = int(extra["dali_consumed"])
        left = active["entries"][active["consumed"]:]
        if (int(left[0]) if len(left) else len(plan)) != start:
            raise ValueError("loader state is inconsistent: its DALI checkpoint does not resume at its position")
        return active
