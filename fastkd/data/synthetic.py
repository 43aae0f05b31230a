"""The synthetic backend: random batches made on the device, for benchmarks and tests.

Images are standard-normal (what normalised images look like to a model), labels uniform over the
classes. Every batch is drawn from a generator seeded with ``(seed, epoch, shard, batch)``, so the
stream is reproducible and a resumed run continues with the same batches. Shards, padding flags
and lengths follow the same plan as the real backends; nothing is decoded.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch

from .base import Batch, BaseLoader
from .index import ShardPlan, derive_seed

IMAGENET_TRAIN_SAMPLES = 1_281_167
IMAGENET_VAL_SAMPLES = 50_000
IMAGENET_CLASSES = 1000


class SyntheticLoader(BaseLoader):
    backend = "synthetic"
    decoder = "random tensors"

    def __init__(self, spec, *, index=None, num_samples: Optional[int] = None, num_classes: Optional[int] = None):
        if index is not None:
            if num_samples is not None or num_classes is not None:
                raise ValueError("synthetic_samples / synthetic_classes cannot be combined with a data root "
                                 "(the root already fixes both)")
            total, classes = len(index), index.classes
        else:
            total = num_samples if num_samples is not None else (
                IMAGENET_TRAIN_SAMPLES if spec.train else IMAGENET_VAL_SAMPLES)
            n_cls = num_classes if num_classes is not None else IMAGENET_CLASSES
            for name, value in (("synthetic_samples", total), ("synthetic_classes", n_cls)):
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"{name} must be a positive integer, got {value!r}")
            classes = tuple(str(i) for i in range(n_cls))
        if total < spec.num_shards:
            raise ValueError(f"{total} synthetic samples cannot fill {spec.num_shards} shards")
        super().__init__(index, spec, num_samples_total=total, classes=classes)
        self._memory_format = torch.channels_last if spec.channels_last else torch.contiguous_format

    def _run(self, plan: ShardPlan, start: int, resume_extra) -> Iterator[tuple[Batch, int]]:
        s = self.spec
        for first in range(start, len(plan), s.batch_size):
            last = min(first + s.batch_size, len(plan))
            n = last - first
            gen = torch.Generator(device=s.device)
            gen.manual_seed(derive_seed(s.seed, plan.epoch, s.shard_id, first))
            images = self._images(n, s.student.size, gen)
            teacher = None
            if s.teacher is not None:
                teacher = images if s.teacher_is_student else self._images(n, s.teacher.size, gen)
            labels = torch.randint(len(self._classes), (n,), generator=gen, device=s.device)
            valid = plan.valid[first:last]
            yield (Batch(images=images, labels=labels, teacher_images=teacher,
                         valid=None if valid.all() else self._to_device(torch.from_numpy(valid))), last)

    def _images(self, n: int, size: int, gen: torch.Generator) -> torch.Tensor:
        s = self.spec
        x = torch.randn((n, 3, size, size), generator=gen, device=s.device, dtype=torch.float32)
        return x.to(s.dtype).contiguous(memory_format=self._memory_format)
