"""Dynamic Prior Knowledge (DPK, Qiu et al., ICLR 2023): feature-level distillation for CNNs.

Our reconstruction (docs/methods.md §8; no official code exists). Per distilled stage:

1. the teacher feature ``F_t`` (B, Ct, Ht, Wt) is projected to the student's channels by a
   trainable 1x1 conv, ``P(F_t)`` (B, Cs, H, W);
2. ``r`` is a moving average (momentum 0.9, start 0.5) of the linear CKA between the flattened
   batch features ``F_s`` and ``F_t`` (no gradient): how much the student already resembles the
   teacher;
3. a random spatial mask takes the teacher feature with probability ``1 - r`` and the student
   feature otherwise: ``H = M * P(F_t) + (1 - M) * F_s`` (the "dynamic prior": the better the
   student, the less of the teacher it is given);
4. a small encoder-decoder (3x3 conv + ReLU, then a 3x3 conv to the teacher's channels, as in
   MGD's generation block) maps ``H`` to a prediction of ``F_t``, trained with MSE.

The loss is the sum over stages of the per-stage MSE (mean over elements). Its gradient reaches
the student (through the unmasked positions), the projections and the encoder-decoders, never
the teacher: teacher features are detached. The trainable modules live in this ``nn.Module``;
the engine adds ``DPKLoss.parameters()`` to the optimizer.

Stages are taken with forward hooks (:class:`FeatureHooks`); :func:`default_stages` names them
for the built-in ResNets.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as tF
from torch import Tensor, nn

from .. import _compat
from . import reference as ref

__all__ = ["FeatureHooks", "DPKLoss", "default_stages", "feature_channels", "mix_features"]


# --------------------------------------------------------------------------------------------
# Taking stages with forward hooks
# --------------------------------------------------------------------------------------------
class FeatureHooks:
    """Collect the forward outputs of named sub-modules of ``model``.

    ``hooks.features`` is the list of the latest outputs, in ``layer_names`` order; it raises if a
    layer has not run since the last :meth:`clear`. Use as a context manager (hooks are removed
    on exit) or call :meth:`remove`. Outputs are kept as produced (with their autograd graph for
    a student; run the teacher under ``torch.no_grad``).
    """

    def __init__(self, model: nn.Module, layer_names: Sequence[str]):
        layer_names = list(layer_names)
        if not layer_names:
            raise ValueError("FeatureHooks needs at least one layer name")
        if len(set(layer_names)) != len(layer_names):
            raise ValueError(f"duplicate layer names: {layer_names}")
        modules = dict(model.named_modules())
        missing = [n for n in layer_names if n not in modules]
        if missing:
            top = [n for n, _ in model.named_children()]
            raise ValueError(f"{type(model).__name__} has no sub-module(s) {missing}; "
                             f"its top-level children are {top}")
        self.layer_names = layer_names
        self._outputs: dict[str, Tensor] = {}
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in layer_names]

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            if not isinstance(output, Tensor):
                raise TypeError(f"layer {name!r} returned {type(output).__name__}; FeatureHooks needs a Tensor")
            self._outputs[name] = output
        return hook

    @property
    def features(self) -> list[Tensor]:
        missing = [n for n in self.layer_names if n not in self._outputs]
        if missing:
            raise RuntimeError(f"layer(s) {missing} produced no output; run the model's forward first")
        return [self._outputs[n] for n in self.layer_names]

    def clear(self) -> None:
        self._outputs.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._outputs.clear()

    def __enter__(self) -> "FeatureHooks":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@torch.no_grad()
def feature_channels(model: nn.Module, layer_names: Sequence[str], example: Tensor) -> list[int]:
    """Channel count of each named stage, from one forward of ``example`` in eval mode.

    Eval mode keeps batch-norm running statistics untouched; the model's mode is restored.
    """
    was_training = model.training
    model.eval()
    try:
        with FeatureHooks(model, layer_names) as hooks:
            model(example)
            feats = hooks.features
    finally:
        model.train(was_training)
    for name, f in zip(layer_names, feats):
        if f.dim() != 4:
            raise ValueError(f"layer {name!r} gives a {f.dim()}-D output {tuple(f.shape)}; DPK needs (B, C, H, W)")
    return [f.shape[1] for f in feats]


# ImageNet ResNets of timm and torchvision (both name their stages layer1..layer4).
_IMAGENET_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def default_stages(model_name: str) -> list[str]:
    """Layer names DPK distils for a built-in ResNet (``fastkd:resnet8``, ``timm:resnet50``, ...).

    CIFAR ResNets have three stages (``layer1..3``); the ImageNet ResNets of torchvision and
    timm have four (``layer1..4``). Other models: pass the stage names explicitly.
    """
    from ..models import FASTKD_MODELS  # the built-in CIFAR ResNets: stages layer1..layer3

    backend, _, arch = str(model_name).rpartition(":")
    if backend == "fastkd" and arch in FASTKD_MODELS:
        return ["layer1", "layer2", "layer3"]
    if backend in ("timm", "torchvision") and arch in _IMAGENET_RESNETS:
        return ["layer1", "layer2", "layer3", "layer4"]
    known = [f"fastkd:{a}" for a in FASTKD_MODELS] + [f"timm|torchvision:{a}" for a in _IMAGENET_RESNETS]
    raise ValueError(f"no default DPK stages for model {model_name!r} (known: {', '.join(known)}); "
                     f"name the stages explicitly")


# --------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------
def mix_features(student: Tensor, teacher: Tensor, teacher_prob,
                 generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """``M * teacher + (1 - M) * student`` with a random spatial mask ``M`` (B, 1, H, W).

    Each spatial position independently takes the teacher feature (all channels) with
    probability ``teacher_prob`` (a float or a 0-d tensor). Returns ``(hybrid, M)`` with ``M`` a float 0/1 tensor.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student and projected teacher features differ: {tuple(student.shape)} vs "
                         f"{tuple(teacher.shape)}")
    B, _, H, W = student.shape
    u = torch.rand((B, 1, H, W), device=student.device, generator=generator)
    mask = (u < teacher_prob).to(student.dtype)
    return mask * teacher + (1 - mask) * student, mask


def _valid_rows_at_mean(mats: Sequence[Tensor], valid: Optional[Tensor]) -> list[Tensor]:
    """Padding rows replaced by the mean of the valid rows (fp32): the column means are then the
    valid rows' and centring zeroes the padding rows, so a linear CKA counts the valid rows only."""
    if valid is None:
        return list(mats)
    keep = valid[:, None]
    count = valid.sum().clamp_min(1)
    return [torch.where(keep, m.float(), (m.float() * keep).sum(0) / count) for m in mats]


class _EncoderDecoder(nn.Sequential):
    """The small generator: 3x3 conv + ReLU in the student's width, 3x3 conv to the teacher's."""

    def __init__(self, student_channels: int, teacher_channels: int):
        super().__init__(
            nn.Conv2d(student_channels, student_channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(student_channels, teacher_channels, 3, padding=1),
        )


class DPKLoss(nn.Module):
    """DPK over several stages (see the module docstring).

    Args:
        student_channels, teacher_channels: channels of each distilled stage (same length).
        momentum: the moving average's momentum: ``r <- momentum * r + (1 - momentum) * CKA``.
        r_init: the starting ``r`` of every stage.
        seed: seeds the spatial masks (one generator per device) for reproducible runs;
            ``None`` draws from torch's global generator.

    ``forward(student_feats, teacher_feats)`` returns the scalar loss. In training mode it
    first updates each stage's ``r`` from the batch, then masks with the updated ``r``; in eval
    mode ``r`` is left alone. ``ratios`` gives the current ``r`` per stage (Python floats).
    Student and teacher stages must share their spatial size, or the teacher's must be an
    integer multiple of the student's (it is then average-pooled down, said once in the log).
    """

    def __init__(self, student_channels: Sequence[int], teacher_channels: Sequence[int], momentum: float = 0.9,
                 r_init: float = 0.5, seed: Optional[int] = None):
        super().__init__()
        student_channels, teacher_channels = list(student_channels), list(teacher_channels)
        if not student_channels or len(student_channels) != len(teacher_channels):
            raise ValueError(f"need one channel count per stage for both models, got student {student_channels} "
                             f"and teacher {teacher_channels}")
        for c in student_channels + teacher_channels:
            if int(c) != c or c < 1:
                raise ValueError(f"channel counts must be positive integers, got {c!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if not 0 <= r_init <= 1:
            raise ValueError(f"r_init must be in [0, 1], got {r_init!r}")
        self.student_channels, self.teacher_channels = student_channels, teacher_channels
        self.momentum = float(momentum)
        self.seed = seed
        self.proj = nn.ModuleList(nn.Conv2d(ct, cs, 1, bias=False) for cs, ct in zip(student_channels, teacher_channels))
        self.gen = nn.ModuleList(_EncoderDecoder(cs, ct) for cs, ct in zip(student_channels, teacher_channels))
        # r is state, not a parameter: saved with the module, moved with .to(), never trained.
        self.register_buffer("r", torch.full((len(student_channels),), float(r_init), dtype=torch.float32))
        self._generators: dict[str, torch.Generator] = {}

    @property
    def ratios(self) -> list[float]:
        return self.r.tolist()

    def extra_repr(self) -> str:
        return (f"student_channels={self.student_channels}, teacher_channels={self.teacher_channels}, "
                f"momentum={self.momentum}")

    def _generator(self, device: torch.device) -> Optional[torch.Generator]:
        if self.seed is None:
            return None
        key = str(device)
        if key not in self._generators:
            g = torch.Generator(device=device)
            g.manual_seed(int(self.seed))
            self._generators[key] = g
        return self._generators[key]

    def _match_teacher(self, i: int, f_s: Tensor, f_t: Tensor) -> Tensor:
        (B, cs, h, w), (Bt, ct, ht, wt) = f_s.shape, f_t.shape
        if B != Bt:
            raise ValueError(f"stage {i}: student batch {B} != teacher batch {Bt}")
        if cs != self.student_channels[i] or ct != self.teacher_channels[i]:
            raise ValueError(f"stage {i}: expected {self.student_channels[i]} student / {self.teacher_channels[i]} "
                             f"teacher channels, got {cs} / {ct}")
        if (ht, wt) == (h, w):
            return f_t
        if ht % h or wt % w:
            raise ValueError(f"stage {i}: teacher feature {ht}x{wt} is not an integer multiple of the student's "
                             f"{h}x{w}; choose stages with matching resolution")
        _compat.log_once(f"DPK stage {i}: average-pooling teacher features {ht}x{wt} -> {h}x{w}")
        return tF.adaptive_avg_pool2d(f_t, (h, w))

    def forward(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor],
                valid: Optional[Tensor] = None) -> Tensor:
        """``valid``: optional (B,) bool row mask; rows with False (shard padding) are left out
        of the CKA ratio and the reconstruction error (no host sync)."""
        n = len(self.proj)
        if len(student_feats) != n or len(teacher_feats) != n:
            raise ValueError(f"DPKLoss has {n} stages, got {len(student_feats)} student and "
                             f"{len(teacher_feats)} teacher features")
        total = None
        for i, (f_s, f_t) in enumerate(zip(student_feats, teacher_feats)):
            if f_s.dim() != 4 or f_t.dim() != 4:
                raise ValueError(f"stage {i}: DPK needs (B, C, H, W) features, got {tuple(f_s.shape)} and "
                                 f"{tuple(f_t.shape)}")
            if f_t.is_inference():
                # A teacher run under torch.inference_mode: such tensors cannot be saved for
                # backward (the projection saves its input), an ordinary copy can.
                f_t = f_t.clone()
            f_t = self._match_teacher(i, f_s, f_t.detach())
            if valid is not None:
                # Padding rows zeroed (a where, not a product): they add exactly 0 to the loss and
                # to every gradient (the convolutions' weights included), whatever they held.
                keep = valid.reshape(-1, 1, 1, 1)
                f_s = torch.where(keep, f_s, torch.zeros((), dtype=f_s.dtype, device=f_s.device))
                f_t = torch.where(keep, f_t, torch.zeros((), dtype=f_t.dtype, device=f_t.device))
            if self.training:
                # CKA in fp32 even under autocast (whose matmuls would run in bf16/fp16 and move
                # r visibly: 0.96875 against 0.96538); linear_cka upcasts its inputs itself.
                with torch.no_grad(), torch.autocast(f_s.device.type, enabled=False):
                    cka = ref.linear_cka(*_valid_rows_at_mean([f_s.detach().flatten(1), f_t.flatten(1)], valid))
                    self.r[i] = self.momentum * self.r[i] + (1 - self.momentum) * cka.to(self.r.dtype)
            # 1 - r stays on the device: the mask compares against a tensor, no host sync.
            teacher_prob = (1 - self.r[i]).to(f_s.dtype)
            hybrid, _ = mix_features(f_s, self.proj[i](f_t.to(f_s.dtype)), teacher_prob, self._generator(f_s.device))
            pred = self.gen[i](hybrid)
            if valid is None:
                loss = tF.mse_loss(pred.float(), f_t.float())
            else:
                per_row = (pred.float() - f_t.float()).pow(2).flatten(1).mean(1)
                loss = torch.where(valid, per_row, 0.0).sum() / valid.sum().clamp_min(1)
            total = loss if total is None else total + loss
        return total
