"""Typed configuration of ``fastkd train``: dataclass -> YAML -> CLI flags -> resolved YAML.

One flat :class:`TrainConfig` holds every setting. Its field names are the YAML keys, and the
command-line flags are the same names with dashes (``teacher_checkpoint`` <-> ``--teacher-checkpoint``),
so a config file and a command line read the same. Resolution order (timm, nanoGPT):

1. the dataclass defaults;
2. ``--config FILE.yaml`` (a path, or the name of a preset shipped in ``fastkd/configs``);
   an unknown key is an error that names it;
3. flags given on the command line;
4. :func:`validate` checks the combination; the engine fills the ``auto`` / unset values
   (device, AMP, learning rate, loss weights) and writes the resolved config to
   ``OUTPUT/config.yaml``.

Fields carry their help text, their argparse group and (for method parameters) the methods
they apply to, so the CLI is generated from this file and stays in step with it.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..losses import METHODS as LOSS_METHODS

METHODS = LOSS_METHODS + ("dpk",)
OPTIMIZERS = ("sgd", "adamw", "lamb")
SCHEDULES = ("cosine", "step")
AMP_MODES = ("auto", "bf16", "fp16", "none")
LOSS_BACKENDS = ("auto", "torch", "triton")
PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"

# Loss weights (ce_weight, kd_weight) when not given: the common ImageNet settings of methods.md.
DEFAULT_WEIGHTS = {
    "ce": (1.0, 0.0),
    "kd": (0.5, 0.5),
    "ats": (0.5, 0.5),
    "isats": (0.5, 0.5),
    "dkd": (1.0, 1.0),
    "dist": (1.0, 2.0),
}
# The reference learning rate for a global batch of 256 (the linear scaling rule, see resolve_lr).
DEFAULT_LR_BASE = {"sgd": 0.1, "adamw": 1e-3, "lamb": 5e-3}


class ConfigError(ValueError):
    """A bad key, value or combination in a config file or on the command line."""


def _f(default, help, group, *, choices=None, methods=None, metavar=None):
    meta = {"help": help, "group": group}
    if choices is not None:
        meta["choices"] = choices
    if methods is not None:
        meta["methods"] = methods  # only meaningful for these (logit) methods
    if metavar is not None:
        meta["metavar"] = metavar
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # ---- data ------------------------------------------------------------------------------
    data: Optional[str] = _f(None, "data set root holding train/ and val/ (ImageNet layout)", "data", metavar="DIR")
    data_backend: str = _f("auto", "loader backend of fastkd.data.create_loader (auto: DALI when usable, "
                           "else the torch loader; 'synthetic' for random tensors)", "data",
                           choices=("auto", "dali", "torch", "synthetic"))
    batch_size: int = _f(128, "batch size per process (the global batch is batch_size x world size)", "data")
    val_batch_size: Optional[int] = _f(None, "validation batch size per process (default: --batch-size)", "data")
    image_size: int = _f(224, "student input size (pixels)", "data")
    teacher_image_size: Optional[int] = _f(None, "teacher input size, cut from the same crop (default: --image-size)",
                                           "data")
    workers: Optional[int] = _f(None, "loader worker threads per process (default: the loader's choice)", "data")
    synthetic_samples: Optional[int] = _f(None, "--data-backend synthetic without --data: training samples "
                                          "(validation gets the same count / 25)", "data")
    synthetic_classes: Optional[int] = _f(None, "--data-backend synthetic without --data: class count", "data")
    # ---- models ----------------------------------------------------------------------------
    student: Optional[str] = _f(None, "student model: fastkd:resnet8|resnet20|resnet56|resnet8x4|resnet32x4, "
                                "timm:NAME or torchvision:NAME", "models", metavar="NAME")
    teacher: Optional[str] = _f(None, "teacher model (same naming); needed by every method except ce", "models",
                                metavar="NAME")
    teacher_checkpoint: Optional[str] = _f(None, "teacher weights: a fastkd checkpoint or a state_dict file",
                                           "models", metavar="PATH")
    student_checkpoint: Optional[str] = _f(None, "initial student weights (optional)", "models", metavar="PATH")
    teacher_cache: Optional[str] = _f(None, "read the teacher's logits from a cache built by 'fastkd cache build' "
                                      "instead of running the teacher (logit methods only)", "models", metavar="DIR")
    # ---- method ----------------------------------------------------------------------------
    method: str = _f("kd", "distillation method (ce trains without a teacher)", "method", choices=METHODS)
    ce_weight: Optional[float] = _f(None, "weight of the hard-label CE term (default per method: "
                                    + ", ".join(f"{m} {w[0]:g}" for m, w in DEFAULT_WEIGHTS.items()) + ")", "method")
    kd_weight: Optional[float] = _f(None, "weight of the distillation term (default per method: "
                                    + ", ".join(f"{m} {w[1]:g}" for m, w in DEFAULT_WEIGHTS.items() if m != "ce")
                                    + ")", "method")
    label_smoothing: float = _f(0.0, "label smoothing of the CE term", "method")
    loss_backend: str = _f("auto", "loss backend (auto: fused Triton kernels on CUDA, PyTorch reference on CPU)",
                           "method", choices=LOSS_BACKENDS)
    temperature: Optional[float] = _f(None, "KD / DKD / DIST temperature (default: fastkd.DistillLoss's)", "method",
                                      methods=("kd", "dkd", "dist"))
    tau_target: Optional[float] = _f(None, "ATS/ISATS teacher temperature on the label class", "method",
                                     methods=("ats", "isats"))
    tau_other: Optional[float] = _f(None, "ATS teacher temperature on the other classes", "method",
                                    methods=("ats",))
    student_temperature: Optional[float] = _f(None, "ATS/ISATS student temperature", "method",
                                              methods=("ats", "isats"))
    isats_candidates: Optional[list[float]] = _f(None, "ISATS candidate temperatures (default: 16 values in "
                                                 "[0.5, tau_target])", "method", methods=("isats",))
    dkd_alpha: Optional[float] = _f(None, "DKD weight of TCKD", "method", methods=("dkd",))
    dkd_beta: Optional[float] = _f(None, "DKD weight of NCKD", "method", methods=("dkd",))
    dkd_warmup_epochs: Optional[float] = _f(None, "DKD warm-up epochs of the KD weight", "method", methods=("dkd",))
    dist_beta: Optional[float] = _f(None, "DIST inter-class weight", "method", methods=("dist",))
    dist_gamma: Optional[float] = _f(None, "DIST intra-class weight", "method", methods=("dist",))
    tolerant_eta: Optional[float] = _f(None, "teacher training (--method ce) with the tolerant-teacher loss "
                                       "CE + eta * gap (our reconstruction of Yang et al. 2018)", "method")
    tolerant_k: Optional[int] = _f(None, "tolerant-teacher K: the gap is top-1 minus the mean of the next K-1 "
                                   "logits (default 5)", "method")
    dpk_logit: str = _f("ce", "with --method dpk: the logit-level term added to DPK", "method",
                        choices=LOSS_METHODS)
    dpk_weight: float = _f(1.0, "with --method dpk: weight of the DPK feature loss", "method")
    dpk_stages: Optional[list[str]] = _f(None, "with --method dpk: student layer names to distil "
                                         "(default: fastkd.losses.dpk.default_stages)", "method")
    dpk_teacher_stages: Optional[list[str]] = _f(None, "with --method dpk: teacher layer names (default: "
                                                 "the teacher's default stages)", "method")
    eskd_stop_epoch: Optional[int] = _f(None, "early-stopped KD: from this epoch on the KD weight is 0 and the "
                                        "teacher forward is skipped", "method")
    # ---- optimisation ----------------------------------------------------------------------
    epochs: int = _f(90, "training epochs", "optim")
    opt: str = _f("sgd", "optimizer (fused SGD / AdamW from PyTorch; apex FusedLAMB for lamb)", "optim",
                  choices=OPTIMIZERS)
    lr: Optional[float] = _f(None, "learning rate; default: lr_base x global batch / 256 (linear scaling rule)",
                             "optim")
    lr_base: Optional[float] = _f(None, "learning rate for a global batch of 256, used when --lr is not given "
                                  "(default: " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR_BASE.items()) + ")",
                                  "optim")
    momentum: float = _f(0.9, "SGD momentum (Nesterov off)", "optim")
    weight_decay: float = _f(1e-4, "weight decay (applied to every student parameter)", "optim")
    sched: str = _f("cosine", "learning-rate schedule, stepped every iteration", "optim", choices=SCHEDULES)
    warmup_epochs: float = _f(0.0, "linear learning-rate warm-up (epochs, fractional allowed)", "optim")
    min_lr: float = _f(0.0, "cosine: final learning rate", "optim")
    decay_epochs: float = _f(30.0, "step: epochs between decays", "optim")
    decay_rate: float = _f(0.1, "step: decay factor", "optim")
    clip_grad: Optional[float] = _f(None, "clip the student's gradient norm to this value", "optim")
    # ---- performance -----------------------------------------------------------------------
    device: str = _f("auto", "cpu, cuda, cuda:N or auto (CUDA when available; under torchrun cuda:LOCAL_RANK)",
                     "performance")
    amp: str = _f("auto", "mixed precision (auto: bf16 on CUDA, none on CPU)", "performance", choices=AMP_MODES)
    channels_last: bool = _f(False, "channels_last memory format for both models and the inputs", "performance")
    compile: bool = _f(False, "torch.compile the student and the teacher", "performance")
    teacher_cuda_graph: bool = _f(False, "capture the teacher forward as a CUDA graph (static batch shape)",
                                  "performance")
    sequential: bool = _f(False, "run the teacher in order before the student on one stream (the correctness "
                          "oracle of the concurrent teacher stream)", "performance")
    deterministic: bool = _f(False, "deterministic algorithms (torch.use_deterministic_algorithms), no cuDNN "
                             "autotuning", "performance")
    # ---- run -------------------------------------------------------------------------------
    output: str = _f("runs/fastkd", "output directory (config, metrics.jsonl, checkpoints)", "run", metavar="DIR")
    resume: Optional[str] = _f(None, "'auto' (newest valid checkpoint in --output, if any) or a checkpoint path",
                               "run", metavar="PATH|auto")
    seed: int = _f(0, "random seed (model init, data order, augmentation)", "run")
    save_every: int = _f(0, "also keep epoch_N.pt every N epochs (0: only last.pt and best.pt)", "run")
    checkpoint_interval: int = _f(0, "also write last.pt every N training steps within an epoch (0: at epoch "
                                  "ends only)", "run")
    log_interval: int = _f(50, "steps between progress/metrics updates (each costs one device sync)", "run")


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


# --------------------------------------------------------------------------------------------
# Field types
# --------------------------------------------------------------------------------------------
def _kind(name: str) -> tuple[str, bool]:
    """(base kind, optional) of a field: kind in bool, int, float, str, float_list, str_list."""
    tp = typing.get_type_hints(TrainConfig)[name]
    optional = False
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional, tp = True, args[0]
    if typing.get_origin(tp) is list:
        return f"{typing.get_args(tp)[0].__name__}_list", optional
    return tp.__name__, optional


_KINDS = {name: _kind(name) for name in FIELDS}


def _coerce(name: str, value, where: str):
    """Check (and losslessly convert) a value for field ``name``; errors name the key and the source."""
    kind, optional = _KINDS[name]
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: key {name!r} cannot be empty (null)")

    def bad(expected):
        return ConfigError(f"{where}: key {name!r} must be {expected}, got {value!r}")

    if kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if kind == "str":
        if not isinstance(value, str):
            raise bad("a string")
        choices = FIELDS[name].metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{where}: key {name!r} must be one of {', '.join(choices)}, got {value!r}")
        return value
    if kind in ("float_list", "str_list"):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise bad("a list")
        item = float if kind == "float_list" else str
        out = []
        for v in value:
            if item is float and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise bad("a list of numbers")
            if item is str and not isinstance(v, str):
                raise bad("a list of strings")
            out.append(item(v))
        return out
    raise AssertionError(kind)  # pragma: no cover


# --------------------------------------------------------------------------------------------
# YAML
# --------------------------------------------------------------------------------------------
def presets() -> list[str]:
    """Names of the shipped presets (``fastkd/configs/NAME.yaml``)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def find_config(path_or_name: str) -> Path:
    """A config path, or the name of a shipped preset (with or without ``.yaml``)."""
    p = Path(path_or_name).expanduser()
    if p.is_file():
        return p
    preset = PRESET_DIR / (p.name if p.suffix == ".yaml" else p.name + ".yaml")
    if p.parent == Path(".") and preset.is_file():
        return preset
    raise ConfigError(f"config file {path_or_name!r} does not exist (shipped presets: {', '.join(presets()) or 'none'})")


def load_yaml(path_or_name) -> dict:
    """Read a config file into ``{key: checked value}``; unknown keys and bad values are errors."""
    import yaml

    path = find_config(os.fspath(path_or_name))
    try:
        with open(path) as fh:
            raw = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: not valid YAML: {exc}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: expected a mapping of keys to values, got {type(raw).__name__}")
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            close = difflib.get_close_matches(name, FIELDS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"config file {path}: unknown key {key!r}{hint}")
        out[name] = _coerce(name, value, f"config file {path}")
    return out


def to_yaml(cfg: TrainConfig, extra: Optional[dict] = None) -> str:
    import yaml

    data = dataclasses.asdict(cfg)
    text = yaml.safe_dump(data, sort_keys=False)
    if extra:
        text += "# resolved at run time (informational; not read back):\n"
        text += "".join(f"# {line}\n" for line in yaml.safe_dump(extra, sort_keys=False).splitlines())
    return text


def save_yaml(cfg: TrainConfig, path, extra: Optional[dict] = None) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_text(to_yaml(cfg, extra))
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# argparse
# --------------------------------------------------------------------------------------------
_GROUPS = {
    "data": "data",
    "models": "models",
    "method": "method and its parameters",
    "optim": "optimisation",
    "performance": "performance",
    "run": "run, checkpoints, logging",
}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field, default SUPPRESS (so only flags actually given override the file)."""
    parser.add_argument("--config", metavar="FILE.yaml", default=argparse.SUPPRESS,
                        help="read settings from a YAML file (same keys as the flags, with underscores) or a shipped "
                             f"preset ({', '.join(presets()) or 'none yet'}); flags given here override it")
    groups = {k: parser.add_argument_group(v) for k, v in _GROUPS.items()}
    for name, f in FIELDS.items():
        kind, _ = _KINDS[name]
        meta = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_ = meta["help"]
        if meta.get("methods"):
            help_ += f" [{', '.join(meta['methods'])}]"
        if default is not None and kind != "bool":
            help_ += f" (default: {default})"
        kw = dict(default=argparse.SUPPRESS, help=help_, dest=name)
        if "metavar" in meta:
            kw["metavar"] = meta["metavar"]
        g = groups[meta["group"]]
        if kind == "bool":
            g.add_argument(flag(name), action=argparse.BooleanOptionalAction, **kw)
        elif kind.endswith("_list"):
            g.add_argument(flag(name), nargs="+", type=float if kind == "float_list" else str, **kw)
        else:
            g.add_argument(flag(name), type={"int": int, "float": float, "str": str}[kind],
                           choices=meta.get("choices"), **kw)


def from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults, then ``args.config`` (if given), then the flags present in ``args``; validated."""
    values = {}
    config_path = getattr(args, "config", None)
    if config_path:
        values.update(load_yaml(config_path))
    for name in FIELDS:
        if hasattr(args, name):
            values[name] = _coerce(name, getattr(args, name), f"flag {flag(name)}")
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


def make_config(**overrides) -> TrainConfig:
    """A validated config from keyword overrides (the Python-API twin of the command line)."""
    unknown = sorted(set(overrides) - set(FIELDS))
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
    cfg = TrainConfig(**{k: _coerce(k, v, "config") for k, v in overrides.items()})
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------------------------
# Validation of the combination
# --------------------------------------------------------------------------------------------
def logit_method(cfg: TrainConfig) -> str:
    """The logit-level loss method (``dpk`` adds DPK on top of ``dpk_logit``)."""
    return cfg.dpk_logit if cfg.method == "dpk" else cfg.method


def weights(cfg: TrainConfig) -> tuple[float, float]:
    """(ce_weight, kd_weight) after the per-method defaults."""
    dce, dkd = DEFAULT_WEIGHTS[logit_method(cfg)]
    return (dce if cfg.ce_weight is None else cfg.ce_weight, dkd if cfg.kd_weight is None else cfg.kd_weight)


def needs_teacher(cfg: TrainConfig) -> bool:
    return cfg.method == "dpk" or (logit_method(cfg) != "ce" and weights(cfg)[1] > 0)


def validate(cfg: TrainConfig) -> None:
    """Raise :class:`ConfigError` naming the first problem of the combination."""
    def need(cond, msg):
        if not cond:
            raise ConfigError(msg)

    for name in FIELDS:
        _coerce(name, getattr(cfg, name), "config")  # types and choices (also for configs built in Python)
    if cfg.data_backend == "synthetic":
        need((cfg.synthetic_samples is None and cfg.synthetic_classes is None) or cfg.data is None,
             "--synthetic-samples/--synthetic-classes size a synthetic data set without --data; with --data "
             "the synthetic loader takes size and classes from that folder")
    else:
        need(cfg.data is not None, "no data set: give --data DIR (a folder holding train/ and val/)")
        need(cfg.synthetic_samples is None and cfg.synthetic_classes is None,
             "--synthetic-samples/--synthetic-classes need --data-backend synthetic")
    need(cfg.student is not None, "no student model: give --student NAME (e.g. fastkd:resnet8, timm:resnet18)")
    for name in ("batch_size", "image_size", "epochs", "log_interval"):
        need(getattr(cfg, name) >= 1, f"{flag(name)} must be >= 1, got {getattr(cfg, name)}")
    for name in ("val_batch_size", "teacher_image_size", "synthetic_samples", "synthetic_classes"):
        v = getattr(cfg, name)
        need(v is None or v >= 1, f"{flag(name)} must be >= 1, got {v}")
    for name in ("save_every", "checkpoint_interval", "workers"):
        v = getattr(cfg, name)
        need(v is None or v >= 0, f"{flag(name)} must be >= 0, got {v}")
    for name in ("ce_weight", "kd_weight", "label_smoothing", "weight_decay", "warmup_epochs", "min_lr",
                 "momentum", "dpk_weight"):
        v = getattr(cfg, name)
        need(v is None or (math.isfinite(v) and v >= 0), f"{flag(name)} must be a finite number >= 0, got {v}")
    for name in ("lr", "lr_base", "clip_grad", "decay_epochs"):
        v = getattr(cfg, name)
        need(v is None or (math.isfinite(v) and v > 0), f"{flag(name)} must be a finite number > 0, got {v}")
    need(0 < cfg.decay_rate <= 1, f"--decay-rate must be in (0, 1], got {cfg.decay_rate}")
    need(cfg.label_smoothing <= 1, f"--label-smoothing must be in [0, 1], got {cfg.label_smoothing}")
    need(cfg.warmup_epochs < cfg.epochs or cfg.warmup_epochs == 0,
         f"--warmup-epochs ({cfg.warmup_epochs}) must be shorter than --epochs ({cfg.epochs})")
    dev = cfg.device
    need(dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit()),
         f"--device must be auto, cpu, cuda or cuda:N, got {dev!r}")
    need(cfg.resume is None or cfg.resume == "auto" or cfg.resume.strip() != "",
         "--resume must be 'auto' or a checkpoint path")

    lm = logit_method(cfg)
    # Method parameters that the chosen method would not use are errors, never silently ignored.
    for name, f in FIELDS.items():
        methods = f.metadata.get("methods")
        if methods and getattr(cfg, name) is not None and lm not in methods:
            raise ConfigError(f"{flag(name)} applies to --method {'/'.join(methods)}, not {lm!r}"
                              + (" (the logit term of dpk, --dpk-logit)" if cfg.method == "dpk" else ""))
    if cfg.tolerant_eta is not None or cfg.tolerant_k is not None:
        need(cfg.method == "ce", "--tolerant-eta/--tolerant-k train a teacher: they need --method ce")
        need(cfg.tolerant_eta is not None, "--tolerant-k needs --tolerant-eta")
        need(cfg.tolerant_k is None or cfg.tolerant_k >= 2, f"--tolerant-k must be >= 2, got {cfg.tolerant_k}")
    if cfg.method != "dpk":
        need(cfg.dpk_logit == "ce" and cfg.dpk_weight == 1.0 and cfg.dpk_stages is None
             and cfg.dpk_teacher_stages is None, "--dpk-* options need --method dpk")
    if lm == "ce" and cfg.method != "dpk":
        need(cfg.kd_weight in (None, 0.0), "--kd-weight needs a distillation method (--method ce has no KD term)")
    ce_w, kd_w = weights(cfg)
    need(ce_w > 0 or kd_w > 0 or cfg.method == "dpk", "--ce-weight and --kd-weight are both 0: nothing to train")
    if needs_teacher(cfg):
        need(cfg.method != "dpk" or cfg.teacher_cache is None, "--method dpk distils teacher features, which a "
             "--teacher-cache does not hold: it needs the online teacher (--teacher NAME)")
        need(cfg.teacher is not None or cfg.teacher_cache is not None, f"--method {cfg.method} needs a teacher: "
             f"give --teacher NAME (and --teacher-checkpoint PATH) or --teacher-cache DIR")
    else:
        need(cfg.teacher is None and cfg.teacher_checkpoint is None and cfg.teacher_cache is None,
             f"--teacher/--teacher-checkpoint/--teacher-cache given but --method {cfg.method} with kd weight "
             f"{kd_w:g} uses no teacher")
        need(cfg.teacher_image_size is None, "--teacher-image-size given but no teacher is used")
        need(not cfg.teacher_cuda_graph, "--teacher-cuda-graph given but no teacher is used")
    if cfg.teacher_checkpoint is not None:
        need(cfg.teacher is not None, "--teacher-checkpoint needs --teacher NAME (the architecture)")
    if cfg.eskd_stop_epoch is not None:
        need(needs_teacher(cfg), "--eskd-stop-epoch needs a distillation method with a teacher")
        need(1 <= cfg.eskd_stop_epoch < cfg.epochs,
             f"--eskd-stop-epoch must be in [1, epochs) = [1, {cfg.epochs}) to have an effect, "
             f"got {cfg.eskd_stop_epoch}")


def resolve_lr(cfg: TrainConfig, world_size: int) -> float:
    """The learning rate: ``--lr`` as given, else ``lr_base * batch_size * world_size / 256``.

    The linear scaling rule (Goyal et al. 2017): ``--lr`` is the rate of the global batch, and
    when it is omitted it is derived from a per-256-images base rate. Changing the number of
    processes without ``--lr`` therefore rescales the rate; with ``--lr`` it does not.
    """
    if cfg.lr is not None:
        return cfg.lr
    base = cfg.lr_base if cfg.lr_base is not None else DEFAULT_LR_BASE[cfg.opt]
    return base * cfg.batch_size * world_size / 256
