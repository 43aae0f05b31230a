"""The one table of fastkd's loss methods: parameters, defaults, config keys, descriptions.

Everything that maps a method to its parameters derives from :data:`METHOD_TABLE`:
:class:`~fastkd.losses.DistillLoss` (which keywords it takes, their defaults and checks), the
engine's config (which ``TrainConfig`` field / CLI flag feeds which loss keyword, which fields
apply to which method, the default loss weights) and the resolved YAML written next to a run.

A :class:`Param` names the loss keyword (``beta``), the config field it comes from
(``dkd_beta``; the CLI flag is the same name with dashes, ``--dkd-beta``), its default, its
kind (how it is validated) and a one-line help text. Two methods may share a config field
(``temperature`` feeds KD, DKD and DIST) or a loss keyword (``beta`` is DKD's NCKD weight and
DIST's inter-class weight, fed by ``dkd_beta`` and ``dist_beta``).

Helpers::

    params_for("dkd")                   # -> (Param(name="alpha", ...), ...)
    defaults("dkd")                     # -> {"alpha": 1.0, "beta": 8.0, "temperature": 4.0, ...}
    loss_kwargs("dkd", cfg)             # -> {"beta": 2.0} for cfg.dkd_beta == 2 (None fields omitted)
    config_values("dkd", loss.params)   # -> {"dkd_alpha": 1.0, "dkd_beta": 8.0, ...} (the resolved YAML)
    config_fields()                     # -> {"dkd_beta": ConfigField(methods=("dkd",), ...), ...}
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional

__all__ = [
    "Param",
    "Method",
    "ConfigField",
    "METHOD_TABLE",
    "METHODS",
    "params_for",
    "defaults",
    "loss_kwargs",
    "config_values",
    "config_fields",
    "methods_using",
]


class Param(NamedTuple):
    """One parameter of a loss method."""

    name: str       # the DistillLoss / functional keyword
    default: Any    # the default (None only for ISATS' candidates: the grid derived from tau_target)
    field: str      # the TrainConfig field / YAML key; the CLI flag is --field-with-dashes
    kind: str       # "temperature" (a number in [1e-3, 100], see functional.py), "weight" (finite >= 0),
                    # "epochs" (finite >= 0), "candidates" (a sequence of temperatures, or None),
                    # "fraction" (finite, in [0, 1]), "flag" (a bool)
    help: str
    scales: str = "both"  # for temperatures: the logits it divides, "both", "teacher" or "student" (the
                          # teacher cache warns about top-K rows at teacher temperatures other than 1)


class Method(NamedTuple):
    """One loss method: its parameters and the engine's default loss weights for it."""

    name: str
    description: str
    params: tuple           # tuple[Param, ...]
    weights: tuple          # (ce_weight, kd_weight) the engine uses when none are given
    needs_labels: bool      # the KD term reads the hard label (ATS, ISATS, DKD)
    row_local: bool         # the KD term is a sum of per-row terms (all but DIST)


_T = "temperature"
# Logit standardisation (Sun et al. 2024, docs/methods.md §11): an option of the logit methods.
_STD = Param("standardize", False, "logit_standardize", "flag",
             "z-score each row of student and teacher logits before the temperature (logit standardisation)")
METHOD_TABLE: dict[str, Method] = {
    m.name: m
    for m in (
        Method("ce", "hard-label cross-entropy only (no teacher)", (), (1.0, 0.0), False, True),
        Method("kd", "Hinton KD: T^2 KL(sm(v/T) || sm(z/T))",
               (Param("temperature", 1.0, "temperature", _T, "KD temperature T"), _STD),
               (0.5, 0.5), False, True),
        Method("ats", "asymmetric temperature scaling (Li et al. 2022): teacher label logit / tau_target, "
                      "others / tau_other",
               (Param("tau_target", 4.0, "tau_target", _T, "teacher temperature on the label class", "teacher"),
                Param("tau_other", 2.0, "tau_other", _T, "teacher temperature on the other classes", "teacher"),
                Param("student_temperature", 1.0, "student_temperature", _T,
                      "student temperature s (released setting 1)", "student"), _STD),
               (0.5, 0.5), True, True),
        Method("isats", "instance-specific ATS: tau_other chosen per row from a candidate grid",
               (Param("tau_target", 4.0, "tau_target", _T, "teacher temperature on the label class", "teacher"),
                Param("candidates", None, "isats_candidates", "candidates",
                      "candidate tau_other values (default: 16 values in [0.5, tau_target])", "teacher"),
                Param("student_temperature", 1.0, "student_temperature", _T,
                      "student temperature s (released setting 1)", "student")),
               (0.5, 0.5), True, True),
        Method("dkd", "decoupled KD (Zhao et al. 2022): T^2 (alpha TCKD + beta NCKD), warm-up weight",
               (Param("alpha", 1.0, "dkd_alpha", "weight", "DKD weight of TCKD"),
                Param("beta", 8.0, "dkd_beta", "weight", "DKD weight of NCKD"),
                Param("temperature", 4.0, "temperature", _T, "DKD temperature T"),
                Param("warmup_epochs", 0.0, "dkd_warmup_epochs", "epochs", "DKD warm-up epochs of the KD weight"),
                _STD),
               (1.0, 1.0), True, True),
        Method("dist", "DIST (Huang et al. 2022): tau^2 (beta inter + gamma intra) Pearson terms over the batch",
               (Param("beta", 1.0, "dist_beta", "weight", "DIST inter-class weight"),
                Param("gamma", 1.0, "dist_gamma", "weight", "DIST intra-class weight"),
                Param("temperature", 1.0, "temperature", _T, "DIST temperature tau")),
               (1.0, 2.0), False, False),
        Method("jsd", "generalised Jensen-Shannon divergence (Liger's beta): T^2 (beta KL(P||M) + (1-beta) KL(Q||M)), "
                      "M = beta P + (1-beta) Q, P teacher, Q student; beta 0: KL(P||Q), beta 1: KL(Q||P)",
               (Param("beta", 0.5, "jsd_beta", "fraction",
                      "JSD beta in [0, 1] (0: forward KL(teacher||student), 1: reverse KL(student||teacher))"),
                Param("temperature", 1.0, "temperature", _T, "JSD temperature T")),
               (0.5, 0.5), False, True),
        Method("rkl", "reverse KL: T^2 KL(sm(z/T) || sm(v/T)) (student first, mode seeking)",
               (Param("temperature", 1.0, "temperature", _T, "reverse-KL temperature T"),),
               (0.5, 0.5), False, True),
    )
}

METHODS = tuple(METHOD_TABLE)


def _method(method: str) -> Method:
    try:
        return METHOD_TABLE[method]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}") from None


def params_for(method: str) -> tuple:
    """The :class:`Param` entries of ``method`` (a tuple, in signature order)."""
    return _method(method).params


def defaults(method: str) -> dict:
    """``{loss keyword: default}`` of ``method``."""
    return {p.name: p.default for p in params_for(method)}


def _get(cfg_like, key: str):
    if isinstance(cfg_like, Mapping):
        return cfg_like.get(key)
    return getattr(cfg_like, key, None)


def loss_kwargs(method: str, cfg_like) -> dict:
    """The loss keywords for ``method`` read from a config (an object with the config fields as
    attributes, e.g. ``TrainConfig``, or a mapping). Fields that are absent or ``None`` are left
    out, so the loss's own defaults apply."""
    out = {}
    for p in params_for(method):
        value = _get(cfg_like, p.field)
        if value is not None:
            out[p.name] = value
    return out


def config_values(method: str, params: Mapping) -> dict:
    """``{config field: value}`` for loss keywords ``params`` of ``method`` (tuples become lists),
    e.g. to write a run's resolved config from ``DistillLoss.params``."""
    fields = {p.name: p.field for p in params_for(method)}
    out = {}
    for name, value in params.items():
        if name not in fields:
            raise ValueError(f"method {method!r} has no parameter {name!r}; it takes {', '.join(fields) or 'none'}")
        out[fields[name]] = list(value) if isinstance(value, tuple) else value
    return out


class ConfigField(NamedTuple):
    """A config field that feeds loss parameters: the methods it applies to and its help."""

    methods: tuple      # tuple[str, ...] in table order
    kind: str           # the Param kind (see :class:`Param`)
    help: str


def config_fields() -> dict:
    """``{config field: ConfigField}`` for every field the table maps, in first-use order; a field
    several methods share joins their differing helps (``"KD temperature T; DKD temperature T; ..."``)."""
    out: dict[str, list] = {}
    for m in METHOD_TABLE.values():
        for p in m.params:
            entry = out.setdefault(p.field, [[], p.kind, []])
            entry[0].append(m.name)
            if p.help not in entry[2]:
                entry[2].append(p.help)
    return {k: ConfigField(tuple(ms), kind, "; ".join(helps)) for k, (ms, kind, helps) in out.items()}


def methods_using(field: str) -> tuple:
    """The methods a config field applies to (empty for a field the table does not map)."""
    f: Optional[ConfigField] = config_fields().get(field)
    return f.methods if f is not None else ()
