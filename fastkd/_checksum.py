"""Checksums of fastkd checkpoints: SHA-256 over the payload, verified wherever a checkpoint is read.

:func:`fastkd.engine.checkpoint.save_atomic` stores ``payload_checksum(state)`` under
``"checksum"``; :func:`verify` recomputes it (the engine's resume, ``fastkd.models.load_weights``
for ``--teacher-checkpoint`` / ``--student-checkpoint`` / ``fastkd analyze``). The payload is walked
in key order: each tensor's dtype, shape and bytes, every other value's type and repr.
"""
from __future__ import annotations

import hashlib

import torch

CHECKSUM_KEY = "checksum"


def _feed(h, obj) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(b"D%d" % len(obj))
        for key in sorted(obj, key=repr):
            h.update(repr(key).encode())
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(b"L%d" % len(obj))  # lists and tuples alike: pickling may turn one into the other
        for item in obj:
            _feed(h, item)
    else:
        h.update(f"{type(obj).__name__}:{obj!r}".encode())


def payload_checksum(state: dict) -> str:
    """SHA-256 (hex) of a checkpoint's payload: every entry except the checksum itself."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != CHECKSUM_KEY})
    return h.hexdigest()


def verify(state: dict, path) -> None:
    """Raise ``ValueError`` naming ``path`` when the state's stored checksum does not match."""
    stored = state.get(CHECKSUM_KEY)
    if stored is None:
        return  # a checkpoint from before checksums (or a plain state_dict): nothing to verify
    if not isinstance(stored, str) or stored != payload_checksum(state):
        raise ValueError(f"checkpoint {str(path)!r} fails its checksum: its bytes changed after it was written "
                         f"(disk or copy corruption); it cannot be trusted")
