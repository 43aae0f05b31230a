"""The one method table (fastkd.losses.methods): DistillLoss, the functional signatures and the
engine's config all agree with it."""
import inspect

import pytest

import fastkd
from fastkd.engine import config as C
from fastkd.losses import methods as M
from fastkd.losses.module import METHOD_PARAMS

FUNCTIONS = {"kd": fastkd.kd_loss, "ats": fastkd.ats_loss, "isats": fastkd.isats_loss,
             "dkd": fastkd.dkd_loss, "dist": fastkd.dist_loss, "jsd": fastkd.jsd_loss, "rkl": fastkd.rkl_loss}


def test_methods_and_distill_loss_params_come_from_the_table():
    assert fastkd.losses.METHODS == tuple(M.METHOD_TABLE) == ("ce", "kd", "ats", "isats", "dkd", "dist",
                                                                         "jsd", "rkl")
    for name, method in M.METHOD_TABLE.items():
        assert METHOD_PARAMS[name] == {p.name: p.default for p in method.params}
        assert method.description and all(p.help and p.field for p in method.params)


@pytest.mark.parametrize("method", sorted(FUNCTIONS))
def test_functional_defaults_match_the_table(method):
    sig = inspect.signature(FUNCTIONS[method]).parameters
    for p in M.params_for(method):
        if p.name == "warmup_epochs":  # applied by DistillLoss only
            continue
        assert sig[p.name].default == p.default, (method, p.name)


def test_ats_defaults_follow_the_released_setting():
    assert M.defaults("ats") == {"tau_target": 4.0, "tau_other": 2.0, "student_temperature": 1.0, "standardize": False}
    assert M.defaults("isats")["student_temperature"] == 1.0
    assert M.METHOD_TABLE["ats"].weights == (0.5, 0.5)


def test_loss_kwargs_maps_config_fields_to_loss_keywords():
    cfg = C.TrainConfig(method="dkd", dkd_beta=2.0, dkd_warmup_epochs=1.0, temperature=1.0)
    assert M.loss_kwargs("dkd", cfg) == {"beta": 2.0, "temperature": 1.0, "warmup_epochs": 1.0}
    assert M.loss_kwargs("dist", {"dist_beta": 3.0, "dkd_beta": 9.0}) == {"beta": 3.0}
    assert M.loss_kwargs("isats", {"isats_candidates": [1.0, 2.0]}) == {"candidates": [1.0, 2.0]}
    assert M.loss_kwargs("ce", cfg) == {}
    crit = fastkd.DistillLoss("dkd", **M.loss_kwargs("dkd", cfg))
    assert M.config_values("dkd", crit.params) == {"dkd_alpha": 1.0, "dkd_beta": 2.0, "temperature": 1.0,
                                                   "dkd_warmup_epochs": 1.0, "logit_standardize": False}
    with pytest.raises(ValueError, match="unknown method 'fitnet'"):
        M.params_for("fitnet")
    with pytest.raises(ValueError, match="no parameter 'gamma'"):
        M.config_values("dkd", {"gamma": 1.0})


def test_config_fields_and_their_methods_match_the_engine_config():
    fields = M.config_fields()
    assert fields["temperature"].methods == ("kd", "dkd", "dist", "jsd", "rkl")
    assert fields["jsd_beta"].methods == ("jsd",)
    assert fields["dkd_beta"].methods == ("dkd",) and fields["dist_beta"].methods == ("dist",)
    for name, f in fields.items():
        assert name in C.FIELDS, name  # every table field is a config field / CLI flag
        engine_methods = (C.field_methods(name) if hasattr(C, "field_methods")
                          else tuple(C.FIELDS[name].metadata["methods"]))
        assert engine_methods == f.methods, name
    assert M.methods_using("tau_other") == ("ats",) and M.methods_using("lr") == ()
    for method, m in M.METHOD_TABLE.items():
        assert C.DEFAULT_WEIGHTS[method] == m.weights


def test_every_row_local_method_has_a_reference_row_term_taking_the_table_keywords():
    import torch

    from fastkd.losses import reference as ref

    g = torch.Generator().manual_seed(0)
    z, v, y = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g), torch.tensor([0, -100, 5, 2])
    for name, m in M.METHOD_TABLE.items():
        if not m.row_local or name == "ce":
            continue
        params = {k: val for k, val in M.defaults(name).items() if k != "warmup_epochs"}
        rows = ref.kd_term_rows(name, z, v, y, **params)
        assert rows.shape == (4,) and rows[1] == 0 and (rows[[0, 2, 3]] > 0).all(), name
    with pytest.raises(ValueError, match="no per-row KD term for method 'dist'"):
        ref.kd_term_rows("dist", z, v, y)


def test_every_temperature_says_which_logits_it_divides():
    for method in M.METHOD_TABLE.values():
        for p in method.params:
            assert p.scales in ("both", "teacher", "student"), (method.name, p)
            if p.kind != "temperature":
                assert p.scales in ("both", "teacher"), (method.name, p)


def test_the_config_fields_help_comes_from_the_table():
    for name, f in M.config_fields().items():
        assert C.FIELDS[name].metadata["help"].startswith(f.help), name
