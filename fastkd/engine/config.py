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

Fields carry their help text and their argparse group, so the CLI is generated from this file
and stays in step with it; which method a loss-parameter field feeds, the default loss weights and
the resolved YAML's parameter values come from the one method table, :mod:`fastkd.losses.methods`.
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
from ..losses import functional as LF
from ..losses import methods as M

METHODS = LOSS_METHODS + ("dpk",)
OPTIMIZERS = ("sgd", "adamw", "lamb")
SCHEDULES = ("cosine", "step", "multistep")
AMP_MODES = ("auto", "bf16", "fp16", "none")
LOSS_BACKENDS = ("auto", "torch", "triton")
PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"

# Loss weights (ce_weight, kd_weight) when not given: the common ImageNet settings of docs/methods.md,
# from the one method table (fastkd.losses.methods), as is which method each parameter field feeds.
DEFAULT_WEIGHTS = {name: tuple(m.weights) for name, m in M.METHOD_TABLE.items()}
# The reference learning rate for a global batch of 256 (the linear scaling rule, see resolve_lr).
DEFAULT_LR_BASE = {"sgd": 0.1, "adamw": 1e-3, "lamb": 5e-3}


class ConfigError(ValueError):
    """A bad key, value or combination in a config file or on the command line."""


def _f(default, help, group, *, choices=None, metavar=None):
    meta = {"help": help, "group": group}
    if choices is not None:
        meta["choices"] = choices
    if metavar is not None:
        meta["metavar"] = metavar
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def _loss_param(name: str):
    """A loss-parameter field: its help comes from the method table (fastkd.losses.methods), like which
    methods it feeds; None means the method's own default."""
    f = M.config_fields()[name]
    return _f(None, f"{f.help} (default: the method's, see fastkd.DistillLoss)", "method")


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
    augment: str = _f("imagenet", "training augmentation: imagenet (RandomResizedCrop 0.08-1 + flip; validation "
                      "resize + centre crop) or cifar (pad 4 + random crop + flip; validation images as they are)",
                      "data", choices=("imagenet", "cifar"))
    skip_corrupt: bool = _f(False, "skip image files that fail to decode instead of stopping (each epoch's count "
                            "is logged and written to metrics.jsonl as skipped_files)", "data")
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
    random_teacher: bool = _f(False, "allow a teacher without --teacher-checkpoint (randomly initialised: for "
                              "benchmarks only, useless for distillation)", "models")
    teacher_cache: Optional[str] = _f(None, "read the teacher's logits from a cache built by 'fastkd cache build' "
                                      "instead of running the teacher (logit methods only)", "models", metavar="DIR")
    teacher_pretrained: bool = _f(False, "the teacher's pretrained hub weights: timm:NAME.TAG through timm (Hugging "
                                  "Face cache; HF_HOME, HF_HUB_OFFLINE), torchvision:NAME through its weights enum "
                                  "(TORCH_HOME cache); its preprocessing (mean/std) comes with them", "models")
    teacher_weights: Optional[str] = _f(None, "with --teacher-pretrained and a torchvision teacher: the weights enum "
                                        "member, e.g. IMAGENET1K_V2 (default: DEFAULT)", "models", metavar="NAME")
    teacher_mean: Optional[list[float]] = _f(None, "the teacher view's normalisation mean (3 values in [0, 1]); "
                                             "default: the teacher's pretrained config, its fastkd checkpoint's "
                                             "record, else the student's", "models")
    teacher_std: Optional[list[float]] = _f(None, "the teacher view's normalisation std (3 values in [0, 1]); "
                                            "default as --teacher-mean", "models")
    teacher_classes: Optional[str] = _f(None, "map the teacher's outputs to the data's class folders by name: "
                                        "'imagenet' (a teacher of ImageNet's classes, folders named by WordNet id "
                                        "such as n01440764) or FILE (one class name per teacher output)", "models",
                                        metavar="imagenet|FILE")
    check_teacher: bool = _f(True, "before training (and before a cache build), evaluate the teacher on at most "
                             "20 validation batches, print its top-1, and stop when it is near chance (below "
                             "min(1.5 x chance, chance + 10 percent of the rest) over at least 100 images): wrong "
                             "preprocessing, class order or weights; a randomly initialised teacher is not checked",
                             "models")
    student_pretrained: bool = _f(False, "start the student from its pretrained hub weights (as --teacher-pretrained; "
                                  "a classifier of another class count is newly initialised); the student's "
                                  "normalisation then comes from its pretrained config", "models")
    student_weights: Optional[str] = _f(None, "with --student-pretrained and a torchvision student: the weights enum "
                                        "member (default: DEFAULT)", "models", metavar="NAME")
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
    # The method table's parameters (one field each; the table gives their help and methods, and
    # tests/losses/test_methods.py fails when a table field is missing here).
    temperature: Optional[float] = _loss_param("temperature")
    tau_target: Optional[float] = _loss_param("tau_target")
    tau_other: Optional[float] = _loss_param("tau_other")
    student_temperature: Optional[float] = _loss_param("student_temperature")
    isats_candidates: Optional[list[float]] = _loss_param("isats_candidates")
    dkd_alpha: Optional[float] = _loss_param("dkd_alpha")
    dkd_beta: Optional[float] = _loss_param("dkd_beta")
    dkd_warmup_epochs: Optional[float] = _loss_param("dkd_warmup_epochs")
    logit_standardize: Optional[bool] = _loss_param("logit_standardize")
    dist_beta: Optional[float] = _loss_param("dist_beta")
    dist_gamma: Optional[float] = _loss_param("dist_gamma")
    jsd_beta: Optional[float] = _loss_param("jsd_beta")
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
    decay_milestones: Optional[list[float]] = _f(None, "multistep: the epochs at which the rate is multiplied by "
                                                 "--decay-rate (e.g. 150 180 210)", "optim")
    decay_rate: float = _f(0.1, "step/multistep: decay factor", "optim")
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
    threads: Optional[int] = _f(None, "math threads of this process (torch.set_num_threads; default: on CPU "
                                "half the cores, at most 8, leaving the rest to the loader; OMP_NUM_THREADS is "
                                "respected; on CUDA PyTorch's default)", "performance")
    dist_timeout: float = _f(600.0, "DDP: seconds a collective waits for the other processes before the run "
                             "fails (a stopped or crashed rank otherwise blocks the rest; gloo's own default is "
                             "30 minutes); raise it if checkpoints or validation take longer", "performance")
    # ---- run -------------------------------------------------------------------------------
    output: str = _f("runs/fastkd", "output directory (config, metrics.jsonl, checkpoints)", "run", metavar="DIR")
    resume: Optional[str] = _f(None, "'auto' (newest valid checkpoint in --output, if any) or a checkpoint path",
                               "run", metavar="PATH|auto")
    seed: int = _f(0, "random seed (model init, data order, augmentation), in [0, 2**63)", "run")
    save_every: int = _f(0, "also keep epoch_N.pt every N epochs (0: only last.pt and best.pt)", "run")
    checkpoint_interval: int = _f(0, "also write last.pt every N training steps within an epoch (0: at epoch "
                                  "ends only)", "run")
    log_interval: int = _f(50, "steps between progress/metrics updates (each costs one device sync)", "run")


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def field_methods(name: str) -> tuple:
    """The logit methods a loss-parameter field applies to (from the method table); () for others."""
    return M.methods_using(name)


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
        if isinstance(value, bool) and FIELDS[name].metadata.get("choices"):
            # YAML 1.1 reads no/off/yes/on as booleans: `amp: no` arrives as False.
            raise ConfigError(f"{where}: key {name!r} must be one of {', '.join(FIELDS[name].metadata['choices'])}, "
                              f"got {value!r} (YAML reads yes/no/on/off/true/false as booleans; quote the value "
                              f"or use one of those names)")
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


# Names users reach for that are spelled differently here (suggested for an unknown key).
ALIASES = {
    "learning_rate": "lr", "base_lr": "lr_base", "bs": "batch_size", "batch": "batch_size",
    "wd": "weight_decay", "decay": "weight_decay", "num_epochs": "epochs", "n_epochs": "epochs",
    "epoch": "epochs", "max_epochs": "epochs", "optimizer": "opt", "optim": "opt", "scheduler": "sched",
    "lr_scheduler": "sched", "schedule": "sched", "warmup": "warmup_epochs", "warmup_epoch": "warmup_epochs",
    "t": "temperature", "temp": "temperature", "tau": "temperature", "T": "temperature",
    "alpha": "kd_weight", "beta": "dkd_beta", "kd_loss_weight": "kd_weight", "ce_loss_weight": "ce_weight",
    "num_workers": "workers", "data_dir": "data", "data_path": "data", "dataset": "data", "root": "data",
    "output_dir": "output", "out": "output", "out_dir": "output", "save_dir": "output",
    "model": "student", "arch": "student", "student_model": "student", "teacher_model": "teacher",
    "mixed_precision": "amp", "precision": "amp", "fp16": "amp", "bf16": "amp",
    "img_size": "image_size", "input_size": "image_size", "resolution": "image_size",
    "milestones": "decay_milestones", "lr_decay_epochs": "decay_milestones", "gamma": "decay_rate",
    "lr_decay_rate": "decay_rate", "clip_grad_norm": "clip_grad", "grad_clip": "clip_grad",
    "smoothing": "label_smoothing", "num_threads": "threads", "timeout": "dist_timeout",
}
# The first line of a resolved config (OUTPUT/config.yaml): such a file records its run's folder
# under ``output:``, but loading it never sends a new run there (see :func:`load_yaml`).
RESOLVED_MARKER = "# fastkd resolved config"


def suggest(name: str) -> str:
    """`` (did you mean 'lr'?)`` for an unknown key: known aliases first, then close spellings."""
    if name in ALIASES:
        return f" (did you mean {ALIASES[name]!r}?)"
    if name.lower() in ALIASES:
        return f" (did you mean {ALIASES[name.lower()]!r}?)"
    if name.lower() in FIELDS:  # keys are lower case: 'Lr', 'EPOCHS'
        return f" (did you mean {name.lower()!r}?)"
    close = difflib.get_close_matches(name, FIELDS, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unique_key_loader():
    """A yaml SafeLoader whose mappings refuse a key given twice (PyYAML keeps the last silently)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        pass

    def construct_mapping(loader, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # a YAML merge key (<<: *defaults): PyYAML merges it, explicit keys win
            key = loader.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: let PyYAML report it
                continue
            if first is not None:
                raise ConfigError(f"key {key!r} appears twice (lines {first} and {key_node.start_mark.line + 1}); "
                                  f"keep one")
            seen[key] = key_node.start_mark.line + 1
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    # YAML 1.1 (PyYAML) reads 1e-3 and 5e-4 as strings (its floats need a dot): read them as numbers,
    # as YAML 1.2 and every other config tool do.
    import re

    UniqueKeyLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    UniqueKeyLoader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"))
    return UniqueKeyLoader


def is_resolved_config(path) -> bool:
    """True for a run's resolved ``config.yaml`` (written by the engine, first line the marker)."""
    try:
        with open(path) as fh:
            return fh.readline().startswith(RESOLVED_MARKER)
    except OSError:
        return False


def load_yaml(path_or_name, *, drop_resolved_output: bool = True) -> dict:
    """Read a config file into ``{key: checked value}``; unknown keys, keys given twice and bad values
    are errors.

    The rule for ``output``: a config written by hand may name the run's folder; a run's resolved
    ``config.yaml`` records where that run went, but that entry is dropped on load (with
    ``drop_resolved_output``), so reusing or copying a resolved config never sends a new run, or
    ``--resume auto``, into the original run's folder. :func:`from_args` then asks for ``--output``.
    """
    import yaml

    path = find_config(os.fspath(path_or_name))
    try:
        with open(path) as fh:
            raw = yaml.load(fh, Loader=_unique_key_loader())
    except ConfigError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
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
            raise ConfigError(f"config file {path}: unknown key {key!r}{suggest(name)}")
        if name in out:
            raise ConfigError(f"config file {path}: key {name!r} is given twice (as '-' and '_' spellings); keep one")
        out[name] = _coerce(name, value, f"config file {path}")
    if drop_resolved_output and "output" in out and is_resolved_config(path):
        del out["output"]
    return out


def to_yaml(cfg: TrainConfig, extra: Optional[dict] = None) -> str:
    import yaml

    data = dataclasses.asdict(cfg)
    text = (f"{RESOLVED_MARKER}: every setting of the run in {cfg.output}. Loading this file never redirects\n"
            f"# a run here: its output: entry is ignored, give --output (the same folder to continue this run).\n")
    text += yaml.safe_dump(data, sort_keys=False)
    if extra:
        text += "# resolved at run time (informational; not read back):\n"
        text += "".join(f"# {line}\n" for line in yaml.safe_dump(extra, sort_keys=False).splitlines())
    return text


def save_yaml(cfg: TrainConfig, path, extra: Optional[dict] = None) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        tmp.write_text(to_yaml(cfg, extra))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # e.g. a full disk: no stray temporary file
        raise


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
        if field_methods(name):
            help_ += f" [{', '.join(field_methods(name))}]"
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
        if not hasattr(args, "output") and "output" not in values and is_resolved_config(find_config(config_path)):
            raise ConfigError(f"--config {config_path} is the resolved config of another run, and it never "
                              f"chooses the output folder: give --output DIR (that run's own folder to continue it)")
    for name in FIELDS:
        if hasattr(args, name):
            values[name] = _coerce(name, getattr(args, name), f"flag {flag(name)}")
    cfg = TrainConfig(**values)
    validate(cfg)
    check_teacher_weights(cfg)
    return cfg


def check_teacher_weights(cfg: TrainConfig) -> None:
    """The command line refuses to distil from a randomly initialised teacher unless asked to.

    (The Python API, :func:`make_config`, allows it with a warning at run time: tests and
    benchmarks build such runs on purpose.)
    """
    if (cfg.teacher is not None and needs_teacher(cfg) and cfg.teacher_checkpoint is None and not cfg.random_teacher
            and cfg.teacher_cache is None  # a cache holds the teacher's outputs: --teacher only names it
            and not cfg.teacher_pretrained):
        raise ConfigError(f"--method {cfg.method} distils from the teacher {cfg.teacher}, but no --teacher-checkpoint "
                          f"PATH or --teacher-pretrained is given: its weights would be random; pass --random-teacher "
                          f"to allow that "
                          f"(benchmarks only)")


# The file that makes a folder a teacher cache (fastkd.cache.store.MANIFEST; the engine never
# imports the cache, which builds on it).
CACHE_MANIFEST = "manifest.json"


def check_input_files(cfg: TrainConfig) -> None:
    """The files and folders a run reads exist, checked before the data is indexed (minutes on a
    large data set): ``--teacher-checkpoint``, ``--student-checkpoint``, a ``--resume`` path and
    ``--teacher-cache`` (a folder holding a cache manifest). Raises ``FileNotFoundError`` naming
    the flag."""
    for name in ("teacher_checkpoint", "student_checkpoint", "resume"):
        value = getattr(cfg, name)
        if value is None or (name == "resume" and value == "auto"):
            continue
        path = Path(value).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{flag(name)} {value} does not exist")
        if not path.is_file():
            raise FileNotFoundError(f"{flag(name)} {value} is a folder, not a checkpoint file")
    if cfg.teacher_cache is not None:
        path = Path(cfg.teacher_cache).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"--teacher-cache {cfg.teacher_cache} does not exist (build one with "
                                    f"'fastkd cache build')")
        if not (path / CACHE_MANIFEST).is_file():
            raise FileNotFoundError(f"--teacher-cache {cfg.teacher_cache} is not a teacher cache: it has no "
                                    f"{CACHE_MANIFEST} (build one with 'fastkd cache build')")


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
    # An empty string is never meant: as a path it is the current folder (a run written there).
    for name, what in (("data", "a folder"), ("output", "a folder"), ("teacher_cache", "a folder"),
                       ("student", "a model name"), ("teacher", "a model name"),
                       ("teacher_checkpoint", "a file"), ("student_checkpoint", "a file")):
        v = getattr(cfg, name)
        need(v is None or v.strip() != "", f"{flag(name)} is empty: give {what}")
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
    from ..data.base import MAX_IMAGE_SIZE

    for name in ("image_size", "teacher_image_size"):
        v = getattr(cfg, name)
        need(v is None or v <= MAX_IMAGE_SIZE, f"{flag(name)} must be <= {MAX_IMAGE_SIZE} pixels, got {v}")
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
    need(0 <= cfg.seed < 2**63, f"--seed must be in [0, 2**63), got {cfg.seed}")
    need(cfg.momentum < 1, f"--momentum must be in [0, 1), got {cfg.momentum}")
    need(cfg.lr is None or cfg.min_lr <= cfg.lr, f"--min-lr ({cfg.min_lr:g}) must not exceed --lr ({cfg.lr or 0:g})")
    need(cfg.threads is None or cfg.threads >= 1, f"--threads must be >= 1, got {cfg.threads}")
    need(math.isfinite(cfg.dist_timeout) and cfg.dist_timeout > 0,
         f"--dist-timeout must be a finite number of seconds > 0, got {cfg.dist_timeout}")
    if cfg.sched == "multistep":
        m = cfg.decay_milestones
        need(bool(m), "--sched multistep needs --decay-milestones EPOCH [EPOCH ...]")
        need(all(a < b for a, b in zip([0.0] + m, m)) and m[-1] <= cfg.epochs,
             f"--decay-milestones must increase within (0, epochs={cfg.epochs}], got {m}")
    else:
        need(cfg.decay_milestones is None, f"--decay-milestones applies to --sched multistep, not {cfg.sched!r}")
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
        methods = field_methods(name)
        if methods and getattr(cfg, name) is not None and lm not in methods:
            raise ConfigError(f"{flag(name)} applies to --method {'/'.join(methods)}, not {lm!r}"
                              + (" (the logit term of dpk, --dpk-logit)" if cfg.method == "dpk" else ""))
    # The loss parameters' own checks, here, before anything is built, naming the flag.
    checked = {}
    for p in M.params_for(lm):
        value = getattr(cfg, p.field)
        try:
            checked[p.name] = LF.check_param(p.kind, p.name, p.default if value is None else value, checked)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{flag(p.field)}: {exc}") from None
    if cfg.tolerant_eta is not None:
        need(math.isfinite(cfg.tolerant_eta) and cfg.tolerant_eta >= 0,
             f"--tolerant-eta must be a finite number >= 0, got {cfg.tolerant_eta}")
    if cfg.tolerant_eta is not None or cfg.tolerant_k is not None:
        need(cfg.method == "ce", "--tolerant-eta/--tolerant-k train a teacher: they need --method ce")
        need(cfg.tolerant_eta is not None, "--tolerant-k needs --tolerant-eta")
        need(cfg.tolerant_k is None or cfg.tolerant_k >= 2, f"--tolerant-k must be >= 2, got {cfg.tolerant_k}")
    if cfg.method != "dpk":
        need(cfg.dpk_logit == "ce" and cfg.dpk_weight == 1.0 and cfg.dpk_stages is None
             and cfg.dpk_teacher_stages is None, "--dpk-* options need --method dpk")
    if lm == "ce" and cfg.method != "dpk":
        need(cfg.kd_weight in (None, 0.0), "--kd-weight needs a distillation method (--method ce has no KD term)")
    if lm == "ce" and cfg.method == "dpk":
        need(cfg.kd_weight in (None, 0.0), "--kd-weight weights a logit KD term, and --method dpk adds none with "
                                           "--dpk-logit ce: choose one (e.g. --dpk-logit kd), or weight the DPK "
                                           "feature term with --dpk-weight")
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
    if cfg.teacher_cache is not None:
        need(not cfg.teacher_cuda_graph, "--teacher-cuda-graph captures the teacher forward, which "
             "--teacher-cache replaces: drop one of them")
        need(not cfg.sequential, "--sequential orders the teacher forward before the student step, and "
             "--teacher-cache has no teacher forward: drop one of them")
    if cfg.teacher_checkpoint is not None:
        need(cfg.teacher is not None, "--teacher-checkpoint needs --teacher NAME (the architecture)")
    if cfg.random_teacher:
        need(cfg.teacher is not None and cfg.teacher_checkpoint is None,
             "--random-teacher means a teacher (--teacher NAME) without --teacher-checkpoint")
    _validate_pretrained(cfg, need)
    if cfg.eskd_stop_epoch is not None:
        need(needs_teacher(cfg), "--eskd-stop-epoch needs a distillation method with a teacher")
        need(1 <= cfg.eskd_stop_epoch < cfg.epochs,
             f"--eskd-stop-epoch must be in [1, epochs) = [1, {cfg.epochs}) to have an effect, "
             f"got {cfg.eskd_stop_epoch}")
    cfg.__dict__["_valid_values"] = dataclasses.astuple(cfg)  # for ensure_valid


def ensure_valid(cfg: TrainConfig) -> None:
    """:func:`validate` ``cfg`` unless it passed with exactly these values already (a config from
    :func:`make_config` or :func:`from_args`, unchanged since): every config is validated once."""
    if cfg.__dict__.get("_valid_values") != dataclasses.astuple(cfg):
        validate(cfg)


def _validate_pretrained(cfg: TrainConfig, need) -> None:
    """Hub weights, the teacher's preprocessing and class mapping: the combinations that make sense."""
    for who in ("teacher", "student"):
        name, pre, weights_ = getattr(cfg, who), getattr(cfg, f"{who}_pretrained"), getattr(cfg, f"{who}_weights")
        if pre:
            need(name is not None, f"--{who}-pretrained needs --{who} NAME")
            need(getattr(cfg, f"{who}_checkpoint") is None,
                 f"--{who}-pretrained and --{who}-checkpoint both give the {who}'s weights: choose one")
            need(not name.startswith("fastkd:"), f"--{who}-pretrained: {name} is one of fastkd's own models, which "
                 f"have no hub weights; give --{who}-checkpoint PATH")
        if weights_ is not None:
            need(pre and name is not None and name.startswith("torchvision:"),
                 f"--{who}-weights names a torchvision weights enum member: it needs --{who} torchvision:NAME and "
                 f"--{who}-pretrained (a timm model takes its weights from the tag in its name, timm:NAME.TAG)")
    if cfg.random_teacher:
        need(not cfg.teacher_pretrained, "--random-teacher and --teacher-pretrained contradict each other")
    for name in ("teacher_mean", "teacher_std"):
        v = getattr(cfg, name)
        if v is not None:
            need(cfg.teacher is not None or cfg.teacher_cache is not None, f"{flag(name)} given but no teacher")
            need(len(v) == 3 and all(math.isfinite(x) and 0 <= x <= 1 for x in v),
                 f"{flag(name)} takes 3 numbers in [0, 1] (pixel units: ImageNet's mean is 0.485 0.456 0.406), got {v}")
            need(name == "teacher_mean" or all(x > 0 for x in v), f"--teacher-std must be > 0, got {v}")
    if cfg.teacher_classes is not None:
        need(cfg.teacher is not None, "--teacher-classes maps a teacher's outputs: it needs --teacher NAME")
        need(cfg.teacher_classes.strip() != "", "--teacher-classes is empty: give 'imagenet' or a file")


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
