"""Config: dataclass -> YAML (unknown keys are errors) -> CLI flags override -> validation."""
import argparse
import dataclasses
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
    cfg = parse(["--config", str(f), "--data", "/d", "--epochs", "3", "--no-channels-last", "--random-teacher"])
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


# What each preset claims (its comment and name) that its values must hold.
PRESET_CLAIMS = {
    "cifar-r32x4-r8x4-kd": dict(teacher="fastkd:resnet32x4", student="fastkd:resnet8x4", method="kd", temperature=4.0,
                                ce_weight=0.1, kd_weight=0.9, image_size=32, augment="cifar", epochs=240,
                                batch_size=64, opt="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4, sched="multistep",
                                decay_milestones=[150.0, 180.0, 210.0], decay_rate=0.1),
    "imagenet-r50-r18-kd": dict(teacher="timm:resnet50", student="timm:resnet18", method="kd", temperature=1.0,
                                ce_weight=0.5, kd_weight=0.5, augment="imagenet", image_size=224),
    "imagenet-r34-r18-dkd": dict(teacher="torchvision:resnet34", student="torchvision:resnet18", method="dkd"),
    "imagenet-r50-mbv2-dist": dict(teacher="timm:resnet50", student="timm:mobilenetv2_100", method="dist"),
    "imagenet-r50-r18-ats": dict(teacher="timm:resnet50", student="timm:resnet18", method="ats"),
    "teacher-tolerant": dict(method="ce", teacher=None),
}


def test_presets_hold_what_they_claim():
    # issue 13 item 7 / issue 12 item 9: more than existence. Every preset is claimed here, loads,
    # resolves (validation + the CLI's teacher-weights rule with a checkpoint given) and its values
    # match its claims; its --list-presets line names its setting.
    from fastkd.train_cli import preset_line

    assert sorted(PRESET_CLAIMS) == C.presets()
    for name, claims in PRESET_CLAIMS.items():
        values = C.load_yaml(name)
        extra = {"teacher_checkpoint": "t.pt"} if values.get("teacher") else {}
        cfg = C.make_config(**{**values, "data": "/data", **extra})
        C.check_teacher_weights(cfg)
        for key, want in claims.items():
            assert getattr(cfg, key) == want, (name, key)
        line = preset_line(name)
        assert line.startswith(name) and f"--method {cfg.method}" in line or "teacher training" in line
    # the CIFAR schedule: lr 0.05 until epoch 150, then x0.1 at 150, 180 and 210 (CRD / mdistiller)
    from fastkd.engine.optim import LRSchedule

    cfg = C.make_config(**{**C.load_yaml("cifar-r32x4-r8x4-kd"), "data": "/data"})
    sched = LRSchedule(cfg.sched, 10, cfg.epochs, decay_rate=cfg.decay_rate, milestones=cfg.decay_milestones)
    factors = {e: sched(e * 10) for e in (0, 149, 150, 179, 180, 209, 210, 239)}
    assert factors == pytest.approx({0: 1, 149: 1, 150: 0.1, 179: 0.1, 180: 0.01, 209: 0.01, 210: 1e-3, 239: 1e-3})


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
    assert cli.main(["train", "--data", str(tmp_path), "--student", "fastkd:resnet8", "--bogus-flag"]) == 2
    assert cli.main(["train", "--opt", "adam"]) == 2  # not a choice


def test_cli_reports_a_missing_data_folder(tmp_path, caplog):
    with caplog.at_level(logging.ERROR, logger="fastkd"):
        rc = cli.main(["train", "--data", str(tmp_path / "nowhere"), "--student", "fastkd:resnet8", "--method", "ce",
                       "--device", "cpu", "--output", str(tmp_path / "out")])
    assert rc == 2
    assert "nowhere" in caplog.text and "does not exist" in caplog.text


# ---- issue 11 item 17, issue 12 items 5, 6, 10: refusals and hints ------------------------------
@pytest.mark.parametrize("overrides, match", [
    (dict(seed=-1), r"--seed must be in \[0, 2\*\*63\), got -1"),
    (dict(momentum=5.0), r"--momentum must be in \[0, 1\), got 5.0"),
    (dict(lr=0.1, min_lr=0.5), r"--min-lr \(0.5\) must not exceed --lr \(0.1\)"),
    (dict(threads=0), "--threads must be >= 1"),
    (dict(dist_timeout=0.0), "--dist-timeout must be a finite number of seconds > 0"),
    (dict(sched="multistep"), "--sched multistep needs --decay-milestones"),
    (dict(sched="multistep", epochs=10, decay_milestones=[5.0, 3.0]), "--decay-milestones must increase"),
    (dict(decay_milestones=[5.0]), "--decay-milestones applies to --sched multistep"),
    # issue 11 item 7: --kd-weight was recorded for DPK and the loss got 0
    (dict(method="dpk", teacher="fastkd:resnet20", kd_weight=0.5), "--kd-weight weights a logit KD term.*--dpk-logit"),
    (dict(random_teacher=True), "--random-teacher means a teacher"),
])
def test_more_bad_values_are_refused_early(overrides, match):
    with pytest.raises(C.ConfigError, match=match):
        C.make_config(**{**BASE, "method": "ce", **overrides})


def test_min_lr_above_the_derived_lr_is_refused_at_run_time(tmp_path):
    from fastkd.engine.trainer import train

    cfg = C.make_config(data_backend="synthetic", synthetic_samples=32, synthetic_classes=4, image_size=8,
                        batch_size=32, student="fastkd:resnet8", method="ce", epochs=1, min_lr=0.5,
                        device="cpu", output=str(tmp_path / "run"))
    with pytest.raises(C.ConfigError, match=r"--min-lr \(0.5\) exceeds the learning rate of this run \(0.0125"):
        train(cfg)
    assert not (tmp_path / "run").exists()  # the failed run leaves no empty output folder


def test_dpk_kd_weight_with_a_kd_logit_term_reaches_the_loss():
    cfg = C.make_config(**BASE, method="dpk", teacher="fastkd:resnet20", dpk_logit="kd", kd_weight=0.7)
    assert C.weights(cfg) == (0.5, 0.7)


def test_duplicate_yaml_key_is_an_error(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("student: fastkd:resnet8\nlr: 0.1\nepochs: 3\nlr: 0.2\n")
    with pytest.raises(C.ConfigError, match=r"key 'lr' appears twice \(lines 2 and 4\)"):
        C.load_yaml(f)


@pytest.mark.parametrize("key, want", [("learning_rate", "lr"), ("bs", "batch_size"), ("wd", "weight_decay"),
                                       ("num_epochs", "epochs"), ("optimizer", "opt"), ("milestones",
                                                                                         "decay_milestones")])
def test_unknown_keys_suggest_common_aliases(tmp_path, key, want):
    f = tmp_path / "c.yaml"
    f.write_text(f"{key}: 1\n")
    with pytest.raises(C.ConfigError, match=f"unknown key '{key}' \\(did you mean '{want}'\\?\\)"):
        C.load_yaml(f)


def test_a_resolved_config_never_chooses_the_output_folder(tmp_path):
    cfg = C.make_config(**BASE, method="ce", output=str(tmp_path / "a"))
    C.save_yaml(cfg, tmp_path / "a.yaml")
    assert C.is_resolved_config(tmp_path / "a.yaml")
    assert "output" not in C.load_yaml(tmp_path / "a.yaml")
    with pytest.raises(C.ConfigError, match="resolved config of another run.*give --output DIR"):
        parse(["--config", str(tmp_path / "a.yaml")])
    assert parse(["--config", str(tmp_path / "a.yaml"), "--output", str(tmp_path / "b")]).output == str(tmp_path / "b")
    # a hand-written config may name its output
    (tmp_path / "mine.yaml").write_text(f"student: fastkd:resnet8\nmethod: ce\noutput: {tmp_path / 'c'}\n")
    assert parse(["--config", str(tmp_path / "mine.yaml"), "--data", "/d"]).output == str(tmp_path / "c")


def test_a_teacher_without_weights_needs_random_teacher_on_the_command_line():
    argv = ["--data", "/d", "--student", "fastkd:resnet8", "--teacher", "fastkd:resnet8", "--method", "kd"]
    with pytest.raises(C.ConfigError, match="no --teacher-checkpoint PATH.*--random-teacher"):
        parse(argv)
    assert parse([*argv, "--random-teacher"]).random_teacher
    assert parse([*argv, "--teacher-checkpoint", "t.pt"]).teacher_checkpoint == "t.pt"


def test_method_parameter_fields_come_from_the_method_table():
    from fastkd.losses import methods as M

    for field, info in M.config_fields().items():
        assert field in C.FIELDS, field
        assert C.field_methods(field) == info.methods
    assert C.DEFAULT_WEIGHTS == {name: tuple(m.weights) for name, m in M.METHOD_TABLE.items()}


def test_dist_timeout_flag_documents_its_default():
    parser = argparse.ArgumentParser()
    C.add_arguments(parser)
    help_ = parser.format_help()
    assert "--dist-timeout" in help_ and "(default: 600.0)" in help_ and "30 minutes" in help_


def test_threads_apply_during_the_run_and_are_restored(tmp_path, monkeypatch):
    # issue 12 item 7: --threads (torch.set_num_threads) for the run only; the caller keeps its setting
    import torch

    from fastkd.engine import trainer as T

    seen = []
    original = T.Trainer._train_epoch

    def spy(self, epoch):
        seen.append(torch.get_num_threads())
        return original(self, epoch)

    monkeypatch.setattr(T.Trainer, "_train_epoch", spy)
    before = torch.get_num_threads()
    cfg = C.make_config(data_backend="synthetic", synthetic_samples=32, synthetic_classes=4, image_size=8,
                        batch_size=32, student="fastkd:resnet8", method="ce", epochs=1, device="cpu",
                        threads=before + 1, output=str(tmp_path / "run"))
    T.train(cfg)
    assert seen == [before + 1] and torch.get_num_threads() == before
    # default on CPU without OMP_NUM_THREADS: half the cores, at most 8
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    trainer = T.Trainer(dataclasses.replace(cfg, threads=None))
    assert 1 <= trainer._threads() <= 8
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert trainer._threads() is None  # the user's OMP_NUM_THREADS wins


def test_yaml_reads_exponent_floats_and_refuses_dash_underscore_twins(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 1e-3\nweight_decay: 5e-4\nmin_lr: 0.0\nwarmup_epochs: 2\n")
    assert C.load_yaml(f) == {"lr": 1e-3, "weight_decay": 5e-4, "min_lr": 0.0, "warmup_epochs": 2.0}
    f.write_text("warmup-epochs: 1\nwarmup_epochs: 2\n")
    with pytest.raises(C.ConfigError, match="'warmup_epochs' is given twice"):
        C.load_yaml(f)


@pytest.mark.parametrize("overrides, match", [
    (dict(method="kd", temperature=0.0), r"^--temperature: temperature must be"),
    (dict(method="kd", temperature=float("nan")), r"^--temperature: "),
    (dict(method="dist", dist_beta=-1.0), r"^--dist-beta: beta must be"),
    (dict(method="dkd", dkd_warmup_epochs=-1.0), r"^--dkd-warmup-epochs: "),
    (dict(method="isats", isats_candidates=[-1.0, 2.0]), r"^--isats-candidates: "),
    (dict(method="ats", tau_other=1e30), r"^--tau-other: "),
    (dict(method="ce", tolerant_eta=-1.0), r"^--tolerant-eta must be a finite number >= 0"),
    (dict(method="ce", tolerant_eta=float("nan")), r"^--tolerant-eta must be a finite number >= 0"),
])
def test_loss_parameters_are_checked_at_config_time_naming_the_flag(overrides, match):
    # Before: accepted here, then refused only once the loss was built (after the data and the
    # models), naming the library's keyword (``beta``) rather than the flag (``--dist-beta``).
    teacher = {} if overrides["method"] == "ce" else {"teacher": "fastkd:resnet20"}
    with pytest.raises(C.ConfigError, match=match):
        C.make_config(**BASE, **teacher, **overrides)


@pytest.mark.parametrize("text, match", [
    ("Lr: 0.1\n", r"unknown key 'Lr' \(did you mean 'lr'\?\)"),
    ("EPOCHS: 3\n", r"unknown key 'EPOCHS' \(did you mean 'epochs'\?\)"),
    ("amp: no\n", r"key 'amp' must be one of auto, bf16, fp16, none, got False \(YAML reads"),
    ("augment: off\n", r"key 'augment' must be one of .* \(YAML reads"),
])
def test_case_and_yaml_boolean_mistakes_get_a_hint(tmp_path, text, match):
    # Before: 'Lr' got no suggestion, and `amp: no` said only "must be a string, got False".
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(C.ConfigError, match=match):
        C.load_yaml(f)


@pytest.mark.parametrize("name", ["output", "data", "student", "teacher_checkpoint", "teacher_cache"])
def test_empty_paths_and_names_are_refused(name):
    # Before: --output "" trained and wrote config.yaml and the checkpoints into the current folder.
    values = dict(BASE, method="kd", teacher="fastkd:resnet20", teacher_checkpoint="t.pt")
    values[name] = " " if name != "output" else ""
    with pytest.raises(C.ConfigError, match=f"--{name.replace('_', '-')} is empty"):
        C.make_config(**values)


def test_yaml_merge_keys_work(tmp_path):
    # Before: "not valid YAML: could not determine a constructor for the tag ...merge" (the
    # duplicate-key check constructed the '<<' key itself).
    f = tmp_path / "c.yaml"
    f.write_text("<<: {lr: 0.1, epochs: 7}\nepochs: 3\n")
    assert C.load_yaml(f) == {"lr": 0.1, "epochs": 3}
    f.write_text("epochs: 3\nepochs: 4\n<<: {lr: 0.1}\n")
    with pytest.raises(C.ConfigError, match="appears twice"):
        C.load_yaml(f)


def test_a_config_is_validated_once(monkeypatch):
    """make_config / from_args validate; the Trainer validates again only a config that changed since
    (or was built without them), so a config is checked once and a changed one is never trusted."""
    from fastkd.engine.trainer import Trainer

    cfg = C.make_config(**BASE, method="ce")
    calls = []
    validate = C.validate
    monkeypatch.setattr(C, "validate", lambda c: calls.append(c) or validate(c))
    C.ensure_valid(cfg)
    assert calls == []
    cfg.epochs = 0  # changed after make_config: validated again, and refused
    with pytest.raises(C.ConfigError, match="--epochs must be >= 1, got 0"):
        C.ensure_valid(cfg)
    assert len(calls) == 1
    built = dataclasses.replace(cfg, epochs=2, data=None)  # a copy is not marked: the Trainer validates it
    with pytest.raises(C.ConfigError, match="no data set"):
        Trainer(built)
    assert len(calls) == 2
