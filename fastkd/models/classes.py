"""A teacher's classes mapped to the data's by name (``--teacher-classes imagenet|FILE``).

A 1000-class ImageNet teacher distils onto a subset of ImageNet (Imagenette, ImageNet-100, a
product's classes drawn from ImageNet) when the data's class folders carry WordNet ids
(``n01440764``, ...): the teacher's logits are reduced to the data's classes, in the data's order,
by one ``index_select`` on the device before anything reads them (the loss, the teacher's
validation, ``fastkd analyze``, the teacher cache). The names of ImageNet's classes come from
timm (``timm.data.ImageNetInfo``), not from a hand-made list.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
from torch import nn

__all__ = ["teacher_class_names", "class_index", "map_teacher_classes", "ClassMap"]

# Output counts of the ImageNet label sets timm knows, for a teacher timm cannot name itself.
_SUBSET_BY_COUNT = {1000: "imagenet-1k", 21841: "imagenet-22k", 11821: "imagenet-12k", 21843: "imagenet-21k-goog"}


def teacher_class_names(spec: str, num_outputs: Optional[int], model: Optional[nn.Module] = None) -> list[str]:
    """The name of each of the teacher's ``num_outputs`` logits (None: as many as ``spec`` names).

    ``spec``: ``imagenet`` (the WordNet ids of the ImageNet label set of the teacher: timm's
    ``infer_imagenet_subset`` on a timm model, else the set with that many classes; ImageNet-1k's
    1000 when the count is not known yet) or a text file with one name per teacher output, in
    output order.
    """
    if spec == "imagenet":
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = None
        if model is not None and getattr(model, "pretrained_cfg", None):
            subset = infer_imagenet_subset(model)
        subset = subset or _SUBSET_BY_COUNT.get(1000 if num_outputs is None else num_outputs)
        if subset is None:
            raise ValueError(f"--teacher-classes imagenet: the teacher has {num_outputs} outputs, which is none of "
                             f"ImageNet's label sets ({', '.join(f'{v}: {k}' for k, v in _SUBSET_BY_COUNT.items())});"
                             f" give --teacher-classes FILE (one name per output)")
        names = list(ImageNetInfo(subset).label_names())
    else:
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"--teacher-classes {spec}: neither 'imagenet' nor an existing file (one class "
                                    f"name per teacher output)")
        with open(spec, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"--teacher-classes {spec}: names appear more than once: {', '.join(dup[:5])}")
    if num_outputs is not None and len(names) != num_outputs:
        raise ValueError(f"--teacher-classes {spec}: {len(names)} names for a teacher with {num_outputs} outputs")
    return names


def class_index(teacher_names: Sequence[str], data_classes: Sequence[str], *, spec: str = "") -> torch.Tensor:
    """For each data class (in the data's order), the teacher output of the same name."""
    where = {n: i for i, n in enumerate(teacher_names)}
    unknown = [c for c in data_classes if c not in where]
    if unknown:
        raise ValueError(f"--teacher-classes {spec}: {len(unknown)} of the data's {len(data_classes)} class folders "
                         f"are not among the teacher's classes (e.g. {', '.join(unknown[:4])}; the teacher's start "
                         f"{', '.join(list(teacher_names)[:3])})")
    return torch.tensor([where[c] for c in data_classes], dtype=torch.long)


class ClassMap:
    """A forward hook that keeps the teacher's logits of the data's classes (``logits[:, index]``).

    The hook sits on the model itself, so layer names (DPK's stages), ``.to(device)``, CUDA graphs
    and every caller (training, validation, analyze, cache build) see the mapped logits.
    """

    def __init__(self, model: nn.Module, index: torch.Tensor):
        self.index = index
        self._on = {}
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        index = self._on.get(output.device)
        if index is None:  # moved to the output's device once
            index = self._on[output.device] = self.index.to(output.device)
        return output.index_select(1, index)

    def remove(self) -> None:
        self.handle.remove()


def map_teacher_classes(model: nn.Module, spec: str, data_classes: Sequence[str], num_outputs: int) -> ClassMap:
    """Attach a :class:`ClassMap` to ``model`` (``num_outputs`` logits named by ``spec``) for ``data_classes``."""
    names = teacher_class_names(spec, num_outputs, model)
    return ClassMap(model, class_index(names, data_classes, spec=spec))
