"""The teacher's classes against the data's: a teacher trained on other classes than the data set
holds would distil every label shifted (its output k means its own k-th class).

``fastkd train`` and ``fastkd cache build`` call :func:`check_teacher_classes` wherever the
teacher's classes are known (a fastkd checkpoint records them: :func:`recorded_classes`), before
any teacher weights are loaded or any output is written.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

__all__ = ["recorded_classes", "check_teacher_classes"]


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
