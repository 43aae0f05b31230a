"""A teacher's classes against the data's.

* ``--teacher-classes imagenet|FILE`` maps a teacher's classes to the data's by name: a 1000-class
  ImageNet teacher distils onto a subset of ImageNet (Imagenette, ImageNet-100, a product's classes
  drawn from ImageNet) when the data's class folders carry WordNet ids (``n01440764``, ...); the
  teacher's logits are reduced to the data's classes, in the data's order, by one ``index_select``
  on the device before anything reads them (the loss, the teacher's validation, ``fastkd analyze``,
  the teacher cache). The names of ImageNet's classes come from timm (``timm.data.ImageNetInfo``),
  not from a hand-made list.
* Without a mapping, a teacher trained on other classes than the data set holds would distil every
  label shifted (its output k means its own k-th class): ``fastkd train`` and ``fastkd cache
  build`` call :func:`check_teacher_classes` wherever the teacher's classes are known (a fastkd
  checkpoint records them: :func:`recorded_classes`), before any teacher weights are loaded or any
  output is written.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
from torch import nn

__all__ = ["recorded_classes", "check_teacher_classes", "teacher_class_names", "class_index",
           "map_teacher_classes", "ClassMap"]


def recorded_classes(path) -> Optional[list[str]]:
    """The class names a fastkd checkpoint records (its ``"classes"``), or None when the file does not
    say (a bare ``state_dict``, a timm/torchvision file) or cannot be read (:func:`load_weights`
    reports that with a clear error). Memory-mapped, so a large checkpoint costs little."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return None
    obj = None
    for kw in ({"mmap": True}, {}):  # mmap needs the zip format of torch.save; older files load whole
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, **kw)
            break
        except Exception:
            continue
    if isinstance(obj, dict) and isinstance(obj.get("classes"), (list, tuple)):
        return [str(c) for c in obj["classes"]]
    return None


def _few(names) -> str:
    names = list(names)
    return ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")


def check_teacher_classes(teacher_classes: Optional[Sequence[str]], data_classes: Sequence[str], *, teacher: str,
                          data: str) -> None:
    """Raise ``ValueError`` naming the differing classes when the teacher's class list (in label
    order) is not the data set's; nothing to check when ``teacher_classes`` is None (unknown).

    ``teacher`` and ``data`` name the two sides in the message (e.g. the checkpoint path and
    ``--data DIR``)."""
    if teacher_classes is None:
        return
    t, d = [str(c) for c in teacher_classes], [str(c) for c in data_classes]
    if t == d:
        return
    only_t = [c for c in t if c not in set(d)]
    only_d = [c for c in d if c not in set(t)]
    if only_t or only_d:
        parts = []
        if only_t:
            parts.append(f"only the teacher's: {_few(only_t)}")
        if only_d:
            parts.append(f"only the data's: {_few(only_d)}")
        what = f"other classes ({len(t)} vs {len(d)}; {'; '.join(parts)})"
    else:
        k = next(i for i, (a, b) in enumerate(zip(t, d)) if a != b)
        what = f"the same {len(t)} classes in another order (label {k}: the teacher's {t[k]!r}, the data's {d[k]!r})"
    raise ValueError(f"the teacher {teacher} was trained on {what} than {data} holds: every label would be "
                     f"distilled from another class's output; point --data at the classes the teacher was trained on")


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
