"""Pretrained weights from the model hubs, the way timm and torchvision fetch them.

* ``timm:NAME.TAG``: ``timm.create_model(NAME.TAG, pretrained=True)``: timm's own mechanism (the
  Hugging Face hub and its cache, which honours ``HF_HOME`` / ``HF_HUB_CACHE`` and
  ``HF_HUB_OFFLINE=1``). Without ``.TAG`` timm picks the architecture's default tag.
* ``torchvision:NAME``: a weights enum of ``torchvision.models.get_model_weights(NAME)``
  (``DEFAULT`` unless another member is named, e.g. ``IMAGENET1K_V2``), read with
  ``weights.get_state_dict`` from ``$TORCH_HOME/hub/checkpoints/<the URL's file name>``. As in
  torchvision's own builders (``check_hash=True``), a download is checked against the hash prefix
  in the file name; a file already in the cache is read as it is (torch.hub checks only downloads).

Besides the model, :class:`Pretrained` says what the weights expect: the input normalisation and
size (timm's ``pretrained_cfg`` through ``timm.data.resolve_data_config``; torchvision's
``weights.transforms()``), the class count, and an identity (hub id and tag / enum name) that a
teacher cache records. :func:`preprocessing` gives the same without building or loading anything.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from .. import _compat

__all__ = ["Pretrained", "preprocessing", "load_pretrained", "PretrainedNotFound"]


class PretrainedNotFound(FileNotFoundError):
    """Pretrained weights that are neither in the local cache nor downloadable (e.g. offline)."""


@dataclass
class Pretrained:
    """What pretrained weights expect and are: ``mean``/``std`` in [0, 1] pixel units, ``image_size``
    (the crop they were evaluated at), ``num_classes``, ``identity`` (a JSON-able dict)."""

    mean: tuple
    std: tuple
    image_size: Optional[int]
    num_classes: Optional[int]
    identity: dict = field(default_factory=dict)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------------------------
# timm
# --------------------------------------------------------------------------------------------
def _timm_cfg(arch: str):
    if not _compat.has_timm():
        raise ImportError(f"timm:{arch} needs timm: pip install 'fastkd[models]' (or pip install timm)")
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(arch)
    except RuntimeError as exc:  # an unknown tag
        raise ValueError(f"timm:{arch}: {_first_line(exc)} (see timm.list_pretrained('{arch.split('.')[0]}*'))") \
            from None
    if cfg is None:
        raise ValueError(f"timm:{arch}: timm has no pretrained weights for this name (see timm.list_pretrained())")
    return cfg


def _timm_info(arch: str, cfg) -> Pretrained:
    from timm.data import resolve_data_config

    data = resolve_data_config(pretrained_cfg=cfg.to_dict())
    name = arch if "." in arch else f"{arch}.{cfg.tag}"
    identity = {"source": "timm", "name": name, "hub": cfg.hf_hub_id or cfg.url or None}
    return Pretrained(tuple(float(v) for v in data["mean"]), tuple(float(v) for v in data["std"]),
                      int(data["input_size"][-1]), cfg.num_classes, identity)


def _hf_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _load_timm(arch: str, num_classes: Optional[int], kwargs: dict) -> tuple[nn.Module, Pretrained]:
    import timm

    cfg = _timm_cfg(arch)
    info = _timm_info(arch, cfg)
    if num_classes is not None:
        kwargs = {**kwargs, "num_classes": num_classes}  # timm leaves a head of another size newly initialised
    try:
        model = timm.create_model(arch, pretrained=True, **kwargs)
    except (OSError, ConnectionError) as exc:
        from huggingface_hub import constants

        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        where = (f"the Hugging Face cache {_hf_cache_dir()} (repository {cfg.hf_hub_id})" if cfg.hf_hub_id
                 else f"{cfg.url}")
        raise PretrainedNotFound(f"timm:{info.identity['name']}: pretrained weights not found in {where} and not "
                                 f"downloadable{offline}: {_first_line(exc)}") from None
    return model, info


# --------------------------------------------------------------------------------------------
# torchvision
# --------------------------------------------------------------------------------------------
def _tv_weights(arch: str, weights: Optional[str]):
    if not _compat.has_torchvision():
        raise ImportError(f"torchvision:{arch} needs torchvision: pip install 'fastkd[models]'")
    import torchvision

    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"torchvision has no classification model named {arch!r} (see "
                         f"torchvision.models.list_models())")
    enum = torchvision.models.get_model_weights(arch)
    name = weights or "DEFAULT"
    if "." in name:  # "ResNet50_Weights.IMAGENET1K_V2" is accepted too
        prefix, name = name.rsplit(".", 1)
        if prefix != enum.__name__:
            raise ValueError(f"torchvision:{arch}: weights {weights!r} belong to {prefix}, not {enum.__name__}")
    try:
        return enum[name]
    except KeyError:
        raise ValueError(f"torchvision:{arch} has no weights {name!r}; it has "
                         f"{', '.join(['DEFAULT', *enum.__members__])}") from None


def _tv_info(w) -> Pretrained:
    t = w.transforms()
    size = getattr(t, "crop_size", None)
    size = int(size[0]) if isinstance(size, (list, tuple)) and size else None
    return Pretrained(tuple(float(v) for v in t.mean), tuple(float(v) for v in t.std), size,
                      len(w.meta.get("categories") or []) or None,
                      {"source": "torchvision", "weights": f"{type(w).__name__}.{w.name}", "url": w.url})


def torchvision_file(w) -> str:
    """Where torchvision keeps (and looks for) the file of weights enum ``w``."""
    import torch.hub

    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(w.url))


def _load_torchvision(arch: str, weights: Optional[str], num_classes: Optional[int],
                      kwargs: dict) -> tuple[nn.Module, Pretrained]:
    import torchvision

    w = _tv_weights(arch, weights)
    info = _tv_info(w)
    path = torchvision_file(w)
    try:
        state = w.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except RuntimeError as exc:
        if "invalid hash value" in str(exc):
            raise ValueError(f"torchvision:{arch} {info.identity['weights']}: the download of {w.url} does not match "
                             f"the hash in its name (a broken transfer?): {_first_line(exc)}") from None
        raise
    except OSError as exc:  # URLError, no network, a read-only cache
        raise PretrainedNotFound(f"torchvision:{arch} {info.identity['weights']}: {os.path.basename(path)} is not in "
                                 f"{os.path.dirname(path)} (TORCH_HOME) and could not be downloaded: "
                                 f"{_first_line(exc)}") from None
    n = info.num_classes or num_classes
    model = torchvision.models.get_model(arch, weights=None, num_classes=n, **kwargs)
    model.load_state_dict(state, strict=True)
    if num_classes is not None and n is not None and num_classes != n:
        model = _new_head(torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs),
                          model, f"torchvision:{arch}")
    return model, info


def _new_head(target: nn.Module, loaded: nn.Module, name: str) -> nn.Module:
    """``target`` with every weight of ``loaded`` whose shape fits; the classifier stays new (logged)."""
    have = loaded.state_dict()
    own = target.state_dict()
    fresh = [k for k in own if k not in have or have[k].shape != own[k].shape]
    target.load_state_dict({k: v for k, v in have.items() if k in own and k not in fresh}, strict=False)
    _compat.log_once(f"fastkd: {name}: pretrained weights loaded; {', '.join(fresh)} newly initialised for "
                     f"{own[fresh[0]].shape[0] if fresh else '?'} classes")
    return target


# --------------------------------------------------------------------------------------------
# Public
# --------------------------------------------------------------------------------------------
def preprocessing(name: str, weights: Optional[str] = None) -> Pretrained:
    """What the pretrained weights of model ``name`` expect (no model is built, nothing is read)."""
    from . import split_name

    source, arch = split_name(name)
    if source == "timm":
        return _timm_info(arch, _timm_cfg(arch))
    if source == "torchvision":
        return _tv_info(_tv_weights(arch, weights))
    raise ValueError(f"{name}: fastkd's own models have no hub weights; give a checkpoint file instead")


def load_pretrained(name: str, num_classes: Optional[int] = None, *, weights: Optional[str] = None,
                    **kwargs) -> tuple[nn.Module, Pretrained]:
    """Build ``name`` with its pretrained weights (timm or torchvision); returns (model, :class:`Pretrained`).

    ``num_classes``: None keeps the weights' own classifier; another count gives a newly initialised
    classifier (fine-tuning a student). ``weights``: the torchvision enum member (default ``DEFAULT``).
    Offline without the weights in the cache: :class:`PretrainedNotFound`, naming the cache looked in.
    """
    from . import split_name

    source, arch = split_name(name)
    if weights is not None and source != "torchvision":
        raise ValueError(f"{name}: weights {weights!r} name a torchvision weights enum member; a timm model takes "
                         f"its weights from the tag in its name (timm:NAME.TAG)")
    if source == "timm":
        return _load_timm(arch, num_classes, kwargs)
    if source == "torchvision":
        return _load_torchvision(arch, weights, num_classes, kwargs)
    raise ValueError(f"{name}: fastkd's own models have no hub weights; give a checkpoint file instead")
