"""Model factory: ``create_model("fastkd:resnet8" | "timm:NAME" | "torchvision:NAME", num_classes)``.

Every model is built randomly initialised; weights come from local files through
:func:`load_weights` (a fastkd checkpoint, a state_dict or a safetensors file), or from the hubs
through :func:`fastkd.models.hub.load_pretrained` (timm's and torchvision's own mechanisms and
caches). timm and torchvision are imported inside the branch that uses them.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from .. import _compat
from .cifar_resnet import CONFIGS as FASTKD_MODELS
from .cifar_resnet import CifarResNet, cifar_resnet

__all__ = ["create_model", "load_weights", "split_name", "fixed_input_size", "check_input_size", "FASTKD_MODELS",
           "CifarResNet"]

PREFIXES = ("fastkd", "timm", "torchvision")


def split_name(name: str) -> tuple[str, str]:
    """``"timm:resnet50"`` -> ``("timm", "resnet50")``; the prefix is required."""
    if not isinstance(name, str) or ":" not in name:
        raise ValueError(
            f"model name {name!r} needs a source prefix: 'fastkd:NAME' (built-in: {', '.join(FASTKD_MODELS)}), "
            f"'timm:NAME' or 'torchvision:NAME'"
        )
    source, arch = name.split(":", 1)
    if source not in PREFIXES or not arch:
        raise ValueError(f"model name {name!r}: the prefix must be one of {', '.join(PREFIXES)} followed by a name")
    return source, arch


def create_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build a randomly initialised classifier with ``num_classes`` outputs.

    ``kwargs`` go to the underlying constructor (e.g. ``drop_path_rate`` for timm models).
    """
    source, arch = split_name(name)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if source == "fastkd":
        return cifar_resnet(arch, num_classes=num_classes, **kwargs)
    if source == "timm":
        if not _compat.has_timm():
            raise ImportError(f"model {name!r} needs timm: pip install 'fastkd[models]' (or pip install timm)")
        import timm

        if not timm.is_model(arch):
            raise ValueError(f"timm has no model named {arch!r} (see timm.list_models())")
        return timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)
    if not _compat.has_torchvision():
        raise ImportError(f"model {name!r} needs torchvision: pip install 'fastkd[models]' (or pip install torchvision)")
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if arch not in known:
        raise ValueError(f"torchvision has no classification model named {arch!r} (see torchvision.models.list_models())")
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)


def fixed_input_size(model: nn.Module):
    """``(height, width)`` when ``model`` only takes inputs of that size, else None.

    timm marks such models in their ``pretrained_cfg`` (``fixed_input_size``: ViT, DeiT, Swin,
    MLP-Mixer, LeViT...) unless built with ``dynamic_img_size=True``; the size is the patch
    embedding's (``patch_embed.img_size``, which follows an ``img_size=`` given at build time) or the
    config's ``input_size``. torchvision's VisionTransformer keeps it in ``image_size``.
    """
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, Mapping) and cfg.get("fixed_input_size") and not getattr(model, "dynamic_img_size", False):
        embed = getattr(model, "patch_embed", None)
        if embed is not None and getattr(embed, "strict_img_size", True) is False:
            return None
        size = getattr(embed, "img_size", None) if embed is not None else None
        if size is None and cfg.get("input_size"):
            size = tuple(cfg["input_size"][-2:])
        if size is not None:
            return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if type(model).__name__ == "VisionTransformer" and type(model).__module__.startswith("torchvision."):
        return (int(model.image_size), int(model.image_size))
    return None


def check_input_size(model: nn.Module, name: str, image_size: int, flag: str = "--image-size") -> None:
    """Refuse ``image_size`` for a model with a fixed input size of another size (ValueError naming
    the model, its size and ``flag``), before any training step would fail on it."""
    size = fixed_input_size(model)
    if size is not None and size != (image_size, image_size):
        shown = f"{size[0]}" if size[0] == size[1] else f"{size[0]} x {size[1]}"
        raise ValueError(f"{name} has a fixed input size of {size[0]} x {size[1]} pixels, but {flag} is {image_size}: "
                         f"use {flag} {shown}" + (" (or a timm model built with dynamic_img_size=True)"
                                                  if name.startswith("timm:") else ""))


def _extract_state_dict(obj, path) -> dict:
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):  # fastkd checkpoints, timm/Lightning-style checkpoints
            if key in obj and isinstance(obj[key], Mapping):
                return dict(obj[key])
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
    raise ValueError(
        f"{path}: not a model checkpoint: expected a state_dict or a dict with a 'model' or 'state_dict' entry"
    )


def _strip_wrapper_prefix(sd: dict, path) -> dict:
    # DDP saves parameters as "module.x", torch.compile as "_orig_mod.x": the same weights.
    for prefix in ("module.", "_orig_mod."):
        if sd and all(k.startswith(prefix) for k in sd):
            _compat.log_once(f"fastkd: {path}: removed the wrapper prefix {prefix!r} from every key")
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def load_weights(model: nn.Module, path) -> nn.Module:
    """Load a fastkd checkpoint (``{"model": state_dict, ...}``), a bare ``state_dict`` or a
    safetensors file into ``model``.

    A PyTorch file is read with ``torch.load(weights_only=True)`` (no arbitrary code runs). Every key
    must match in name and shape; otherwise a ``ValueError`` names the file and the mismatches.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path!r} does not exist")
    if is_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj = load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ValueError(f"{path}: cannot be read as a safetensors file ({first})") from None
        return _load_state_dict(model, _strip_wrapper_prefix(dict(obj), path), path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"{path}: cannot be read as a weights-only PyTorch checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); a file holding pickled Python objects beyond tensors "
            f"can be re-saved with torch.save(model.state_dict(), path)"
        ) from exc
    if isinstance(obj, dict) and "checksum" in obj:  # a fastkd checkpoint: refuse one whose bytes changed
        from .._checksum import verify

        verify(obj, path)
    sd = _strip_wrapper_prefix(_extract_state_dict(obj, path), path)
    return _load_state_dict(model, sd, path)


def is_safetensors(path) -> bool:
    """A ``.safetensors`` file, or one that starts like one (8-byte header length, then ``{``)."""
    if str(path).endswith(".safetensors"):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 30)


def _load_state_dict(model: nn.Module, sd: dict, path) -> nn.Module:
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        def few(items):
            return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {few(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {few(shapes)}")
        raise ValueError(f"{path}: weights do not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(sd, strict=True)
    return model
