"""Config: dataclass -> YAML (unknown keys are errors) -> CLI flags override -> validation."""
import argparse
import logging

import pytest

from fastkd import cli
from fastkd.engine import config as C

BASE = dict(data="/some/imagenet", student="fastkd:resnet8")


def parse(argv):
    parser = argparse.ArgumentParser()
    C.add_arguments(parser)
    return C.from_args(parser.parse_args(argv))


def test_flags_override_the_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("student: fastkd:resnet8\nteacher: fastkd:resnet20\nmethod: ats\nepochs: 7\nlr: 0.2\n"
                 "tau-target: 5\nchannels_last: true\n")
    cfg = parse(["--config", str(f), "--data", "/d", "--epochs", "3", "--no-channels-last"])
    assert (cfg.epochs, cfg.lr, cfg.method, cfg.tau_target, cfg.channels_last) == (3, 0.2, "ats", 5.0, False)
    assert cfg.data == "/d" and cfg.teacher == "fastkd:resnet20"


def test_unknown_key_is_an_error_naming_it(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("student: fastkd:resnet8\nlearning_rate: 0.1\n")
    with pytest.raises(C.ConfigError, match="unknown key 'learning_rate'"):
        C.load_yaml(f)
    f.write_text("epochs: 3\nwarmup_epoch: 1\n")
    with pytest.raises(C.ConfigError, match="unknown key 'warmup_epoch'.*did you mean 'warmup_epochs'"):
        C.load_yaml(f)


@pytest.mark.parametrize("text, match", [
    ("epochs: ten\n", "key 'epochs' must be an integer"),
    ("epochs: 2.5\n", "key 'epochs' must be an integer"),
    ("lr: fast\n", "key 'lr' must be a number"),
    ("channels_last: 1\n", "key 'channels_last' must be true or false"),
    ("method: hinton\n", "key 'method' must be one of"),
    ("isats_candidates: 2\n", "key 'isats_candidates' must be a list"),
    ("method: null\n", "key 'method' cannot be empty"),
    ("- a\n- b\n", "expected a mapping"),
    ("a: [\n", "not valid YAML"),
])
def test_bad_values_name_the_key(tmp_path, text, match):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(C.ConfigError, match=match):
        C.load_yaml(f)


def test_missing_config_file_lists_presets():
    with pytest.raises(C.ConfigError, match="does not exist.*imagenet-r50-r18-kd"):
        C.find_config("no-such-config.yaml")


@pytest.mark.parametrize("overrides, match", [
    (dict(method="kd"), "needs a teacher"),
    (dict(method="kd", teacher="fastkd:resnet20", tau_target=4.0), "--tau-target applies to --method ats/isats, not 'kd'"),
    (dict(method="ats", teacher="fastkd:resnet20", temperature=2.0), "--temperature applies to --method kd/dkd/dist"),
    (dict(method="ce", teacher="fastkd:resnet20"), "uses no teacher"),
    (dict(method="ce", kd_weight=0.5), "--kd-weight needs a distillation method"),
    (dict(method="kd", teacher="fastkd:resnet20", tolerant_eta=0.5), "need --method ce"),
    (dict(method="ce", tolerant_k=3), "--tolerant-k needs --tolerant-eta"),
    (dict(method="kd", teacher="fastkd:resnet20", dpk_weight=2.0), "--dpk-\\* options need --method dpk"),
    (dict(method="dpk", teacher="fastkd:resnet20", tau_target=3.0), "not 'ce' \\(the logit term of dpk"),
    (dict(method="kd", teacher="fastkd:resnet20", eskd_stop_epoch=5, epochs=5), "--eskd-stop-epoch must be in"),
    (dict(method="ce", eskd_stop_epoch=1), "--eskd-stop-epoch needs a distillation method"),
    (dict(method="kd", teacher="fastkd:resnet20", ce_weight=0.0, kd_weight=0.0), "nothing to train"),
    (dict(method="ce", teacher_checkpoint="t.pt"), "uses no teacher"),
    (dict(batch_size=0), "--batch-size must be >= 1"),
    (dict(lr=-1.0), "--lr must be a finite number > 0"),
    (dict(device="gpu"), "--device must be auto, cpu, cuda or cuda:N"),
    (dict(warmup_epochs=100.0, epochs=10), "--warmup-epochs .* must be shorter"),
    (dict(synthetic_samples=10), "need --data-backend synthetic"),
])
def test_bad_combinations_are_clear_errors(overrides, match):
    values = {**BASE, "method": "ce", **overrides}
    with pytest.raises(C.ConfigError, match=match):
        C.make_config(**values)


def test_required_fields():
    with pytest.raises(C.ConfigError, match="no data set"):
        C.make_config(student="fastkd:resnet8", method="ce")
    with pytest.raises(C.ConfigError, match="no student model"):
        C.make_config(data="/d", method="ce")
    # a synthetic data set needs no folder
    C.make_config(student="fastkd:resnet8", method="ce", data_backend="synthetic", synthetic_samples=64)


@pytest.mark.parametrize("preset", C.presets())
def test_every_shipped_preset_loads_and_validates(preset):
    values = C.load_yaml(preset)
    cfg = C.make_config(**{**values, "data": "/imagenet"})
    assert cfg.student and cfg.epochs >= 1
    # the preset is found by name and by path alike
    assert C.load_yaml(C.PRESET_DIR / f"{preset}.yaml") == values


def test_presets_exist():
    assert len(C.presets()) >= 5


def test_resolved_config_round_trips(tmp_path):
    cfg = C.make_config(**BASE, method="dkd", teacher="fastkd:resnet20", dkd_beta=2.0, isats_candidates=None)
    path = tmp_path / "config.yaml"
    C.save_yaml(cfg, path, extra={"world_size": 1})
    again = C.make_config(**C.load_yaml(path))
    assert again == cfg


def test_lr_scaling_rule():
    cfg = C.make_config(**BASE, method="ce", batch_size=64)
    assert C.resolve_lr(cfg, world_size=8) == pytest.approx(0.1 * 64 * 8 / 256)
    cfg = C.make_config(**BASE, method="ce", batch_size=64, opt="adamw", lr_base=2e-3)
    assert C.resolve_lr(cfg, world_size=2) == pytest.approx(2e-3 * 128 / 256)
    cfg = C.make_config(**BASE, method="ce", lr=0.3)
    assert C.resolve_lr(cfg, world_size=4) == 0.3  # an explicit --lr is never rescaled


def test_cli_reports_config_errors_with_exit_code_2(tmp_path, caplog):
    with caplog.at_level(logging.ERROR, logger="fastkd"):
        rc = cli.main(["train", "--data", str(tmp_path), "--student", "fastkd:resnet8", "--method", "kd"])
    assert rc == 2
    assert "needs a teacher" in caplog.text
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--data", str(tmp_path), "--student", "fastkd:resnet8", "--bogus-flag"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        cli.main(["train", "--opt", "adam"])  # not a choice


def test_cli_reports_a_missing_data_folder(tmp_path, caplog):
    with caplog.at_level(logging.ERROR, logger="fastkd"):
        rc = cli.main(["train", "--data", str(tmp_path / "nowhere"), "--student", "fastkd:resnet8", "--method", "ce",
                       "--device", "cpu", "--output", str(tmp_path / "out")])
    assert rc == 2
    assert "nowhere" in caplog.text and "does not exist" in caplog.text
