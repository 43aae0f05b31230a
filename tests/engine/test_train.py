"""``fastkd train`` end to end on CPU: real tiny runs, methods, ESKD, teacher training, DPK."""
import math

import pytest
import torch

from fastkd import cli
from fastkd.engine import checkpoint as ckpt
from fastkd.engine import config as C
from fastkd.engine.metrics import read_metrics
from fastkd.engine.trainer import train
from fastkd.models import create_model, load_weights

SYNTH = dict(data_backend="synthetic", synthetic_samples=96, synthetic_classes=10, image_size=12, batch_size=32,
             device="cpu", lr=0.05, log_interval=1)


def _count_files(folder):
    return sum(1 for p in folder.rglob("*.jpg"))


@pytest.fixture(scope="module")
def teacher_run(digits_root, tmp_path_factory):
    """A 2-epoch CE run of resnet8 on the digits JPEGs (also the teacher of the KD test)."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as in every engine test (module fixtures run before one_thread)
    try:
        rc = cli.main(["train", "--data", str(digits_root), "--student", "fastkd:resnet8", "--method", "ce",
                       "--epochs", "2", "--batch-size", "64", "--image-size", "16", "--lr", "0.1", "--workers", "0",
                       "--device", "cpu", "--output", str(out)])
    finally:
        torch.set_num_threads(before)
    assert rc == 0
    return out


def test_two_epoch_run_learns_and_writes_its_outputs(teacher_run, digits_root):
    epochs = read_metrics(teacher_run / "metrics.jsonl", "epoch")
    assert [r["epoch"] for r in epochs] == [0, 1]
    n_train, n_val = _count_files(digits_root / "train"), _count_files(digits_root / "val")
    for r in epochs:
        assert r["train_samples"] == n_train and r["val_samples"] == n_val
        assert r["val_top1"] == pytest.approx(100 * r["val_correct_top1"] / n_val)
        assert 0 <= r["val_top1"] <= r["val_top5"] <= 100
        assert {"data", "forward", "loss", "backward", "optimizer"} <= set(r["step_time_ms"])
        assert r["images_per_s"] > 0 and "teacher_top1" not in r
    assert epochs[1]["train_loss"] < epochs[0]["train_loss"]
    assert epochs[1]["val_top1"] > 30.0  # 10 classes: chance is 10%
    assert epochs[1]["best_top1"] == max(r["val_top1"] for r in epochs)
    steps = read_metrics(teacher_run / "metrics.jsonl", "step")
    assert steps and all(math.isfinite(s["loss"]) for s in steps)

    # the resolved config: every default explicit, loadable, the run's actual values
    resolved = C.load_yaml(teacher_run / "config.yaml")
    assert resolved["lr"] == 0.1 and resolved["amp"] == "none" and resolved["ce_weight"] == 1.0
    C.make_config(**resolved)
    assert "# world_size: 1" in (teacher_run / "config.yaml").read_text()

    # last.pt is the final state, best.pt the best epoch; both load as weights
    last = ckpt.load(teacher_run / "last.pt")
    assert (last["epoch"], last["step_in_epoch"], last["global_step"]) == (2, 0, 2 * math.ceil(n_train / 64))
    best = ckpt.load(teacher_run / "best.pt")
    assert best["best_top1"] == epochs[1]["best_top1"]
    model = load_weights(create_model("fastkd:resnet8", 10), teacher_run / "best.pt")
    assert isinstance(model, torch.nn.Module)


def test_kd_run_reports_the_teachers_metrics(teacher_run, digits_root, tmp_path):
    teacher_best = ckpt.load(teacher_run / "best.pt")["best_top1"]
    result = train(C.make_config(data=str(digits_root), student="fastkd:resnet8", teacher="fastkd:resnet8",
                                 teacher_checkpoint=str(teacher_run / "best.pt"), method="kd", temperature=4.0,
                                 ce_weight=0.1, kd_weight=0.9, epochs=1, batch_size=64, image_size=16, lr=0.1,
                                 workers=0, device="cpu", output=str(tmp_path / "kd")))
    r = result["final"]
    # The teacher is evaluated on the same validation files with the same weights.
    assert r["teacher_top1"] == pytest.approx(teacher_best, abs=1e-9)
    assert 0 < r["agreement"] <= 100 and r["kl"] > 0
    assert r["teacher_forward"] and "teacher" in r["step_time_ms"] and r["train_kd"] > 0


@pytest.mark.parametrize("method, params", [
    ("kd", {"temperature": 2.0}),
    ("ats", {"tau_target": 4.0, "tau_other": 2.0}),
    ("isats", {"tau_target": 3.0}),
    ("dkd", {"dkd_beta": 2.0, "dkd_warmup_epochs": 1.0}),
    ("dist", {}),
    ("jsd", {"jsd_beta": 0.3, "temperature": 2.0}),
    ("rkl", {"temperature": 2.0}),
])
def test_every_method_trains(method, params, tmp_path):
    """With the CE weight at 0, the method's own distillation term is the only force on the
    student: over 3 epochs on fresh random images it must fall well below its first-epoch mean
    (the student learns the teacher's function under that method's loss)."""
    result = train(C.make_config(**SYNTH, student="fastkd:resnet8", teacher="fastkd:resnet8", method=method,
                                 ce_weight=0.0, kd_weight=1.0, epochs=3, output=str(tmp_path / method), **params))
    kd = [r["train_kd"] for r in result["epochs"]]
    assert all(math.isfinite(r["train_loss"]) and r["teacher_forward"] for r in result["epochs"])
    assert kd[0] > 0 and min(kd[1:]) < 0.8 * kd[0], kd  # measured: last/first 0.2-0.7 per method
    resolved = C.load_yaml(tmp_path / method / "config.yaml")
    for key, value in params.items():
        assert resolved[key] == value


def test_eskd_drops_the_kd_term_and_skips_the_teacher(tmp_path):
    result = train(C.make_config(**SYNTH, student="fastkd:resnet8", teacher="fastkd:resnet8", method="kd",
                                 epochs=2, eskd_stop_epoch=1, output=str(tmp_path / "eskd")))
    first, second = result["epochs"]
    assert first["teacher_forward"] and first["train_kd"] > 0 and "teacher" in first["step_time_ms"]
    assert not second["teacher_forward"] and second["train_kd"] == 0 and "teacher" not in second["step_time_ms"]
    assert "teacher_top1" in second  # validation still reports the teacher


def test_tolerant_teacher_training_keeps_every_epoch(tmp_path):
    out = tmp_path / "tolerant"
    result = train(C.make_config(**SYNTH, student="fastkd:resnet8", method="ce", tolerant_eta=0.5, tolerant_k=3,
                                 epochs=2, save_every=1, output=str(out)))
    for r in result["epochs"]:
        assert r["train_kd"] > 0  # eta * gap, the tolerance term
        assert r["train_loss"] == pytest.approx(r["train_ce"] + r["train_kd"], rel=1e-9)
    e1, e2 = ckpt.load(out / "epoch_1.pt"), ckpt.load(out / "epoch_2.pt")
    assert (e1["epoch"], e2["epoch"]) == (1, 2)
    assert any(not torch.equal(e1["model"][k], e2["model"][k]) for k in e1["model"])
    early = load_weights(create_model("fastkd:resnet8", 10), out / "epoch_1.pt")  # ESKD remedy (b)
    assert torch.equal(early.state_dict()["fc.weight"], e1["model"]["fc.weight"])


def test_dpk_trains_its_modules_with_the_student(tmp_path):
    pytest.importorskip("fastkd.losses.dpk")
    out = tmp_path / "dpk"
    result = train(C.make_config(**SYNTH, student="fastkd:resnet8", teacher="fastkd:resnet20", method="dpk",
                                 dpk_logit="kd", dpk_weight=0.5, epochs=1, output=str(out)))
    r = result["final"]
    assert math.isfinite(r["train_loss"]) and r["train_kd"] > 0
    assert len(r["dpk_ratios"]) == 3 and all(x != 0.5 for x in r["dpk_ratios"])
    state = ckpt.load(out / "last.pt")
    n_student = len(list(create_model("fastkd:resnet8", 10).parameters()))
    assert len(state["optimizer"]["param_groups"][0]["params"]) > n_student  # DPK's modules are trained
    assert state["dpk"] is not None
    resolved = C.load_yaml(out / "config.yaml")
    assert resolved["dpk_stages"] == ["layer1", "layer2", "layer3"]


def test_a_fresh_run_refuses_to_overwrite_a_previous_one(tmp_path):
    cfg = C.make_config(**SYNTH, student="fastkd:resnet8", method="ce", epochs=1, output=str(tmp_path / "r"))
    train(cfg)
    with pytest.raises(ValueError, match="already holds a run.*--resume auto"):
        train(cfg)
    # resuming a finished run is a no-op that says so
    import dataclasses

    result = train(dataclasses.replace(cfg, resume="auto"))
    assert result["epochs"] == [] and result["global_step"] == 3


def test_the_teacher_gets_its_own_view(tmp_path, monkeypatch):
    from fastkd.engine.runner import TeacherRunner

    seen = []
    original = TeacherRunner._forward

    def spy(self, images):
        seen.append(tuple(images.shape[-2:]))
        return original(self, images)

    monkeypatch.setattr(TeacherRunner, "_forward", spy)
    result = train(C.make_config(**SYNTH, student="fastkd:resnet8", teacher="fastkd:resnet8", method="kd",
                                 teacher_image_size=20, epochs=1, output=str(tmp_path / "views")))
    assert seen and set(seen) == {(20, 20)}  # training and validation batches alike
    assert result["final"]["teacher_forward"]


def test_a_padded_batch_trains_dpk_with_dist_and_padding_counts_for_nothing(tmp_path):
    """Shard padding is a row mask for every method: DIST no longer drops rows, so DPK's teacher
    and student features keep one batch size (this crashed before), and the loss sees ``valid``."""
    from fastkd.data.loader import Batch
    from fastkd.engine.trainer import Trainer

    cfg = C.make_config(**SYNTH, student="fastkd:resnet8", teacher="fastkd:resnet20", method="dpk", dpk_logit="dist",
                        epochs=1, output=str(tmp_path / "pad"))
    trainer = Trainer(cfg)
    trainer.setup()
    try:
        trainer.train_loader.set_epoch(0)
        b = next(iter(trainer.train_loader))
        pad = Batch(images=torch.cat([b.images, b.images[:5]]), labels=torch.cat([b.labels, b.labels[:5]]),
                    valid=torch.cat([torch.ones(len(b), dtype=torch.bool), torch.zeros(5, dtype=torch.bool)]))
        seen = []
        original = trainer.loss_fn.forward
        trainer.loss_fn.forward = lambda *a, **kw: seen.append(kw.get("valid")) or original(*a, **kw)
        tout = trainer.teacher_source.result(trainer.teacher_source.submit(pad))
        loss = trainer._step(pad, tout, trainer.loss_fn, 0.0)
        assert math.isfinite(float(loss))
        assert torch.equal(seen[0], pad.valid)
    finally:
        trainer.teacher_source.close()
        trainer.student_hooks.remove()


def test_dpk_reconstruction_error_leaves_padding_rows_out():
    from fastkd.losses.dpk import DPKLoss

    torch.manual_seed(0)
    f_s, f_t = [torch.randn(6, 4, 3, 3)], [torch.randn(6, 8, 3, 3)]
    junk_s, junk_t = [torch.cat([f_s[0], 50 * torch.randn(2, 4, 3, 3)])], [torch.cat([f_t[0], torch.randn(2, 8, 3, 3)])]
    valid = torch.tensor([True] * 6 + [False] * 2)
    loss = DPKLoss([4], [8], seed=1).eval()  # eval: r fixed; same seed: the first rows draw the same masks
    plain = loss(f_s, f_t)
    padded = DPKLoss([4], [8], seed=1).eval()
    padded.load_state_dict(loss.state_dict())
    torch.testing.assert_close(padded(junk_s, junk_t, valid=valid), plain, rtol=1e-6, atol=0)


def test_dpk_ratio_leaves_padding_rows_out():
    from fastkd.losses.dpk import DPKLoss

    torch.manual_seed(0)
    f_s, f_t = [torch.randn(6, 4, 3, 3)], [torch.randn(6, 8, 3, 3)]
    junk_s, junk_t = [torch.cat([f_s[0], 9 * torch.randn(2, 4, 3, 3)])], [torch.cat([f_t[0], torch.randn(2, 8, 3, 3)])]
    valid = torch.tensor([True] * 6 + [False] * 2)
    plain, padded = DPKLoss([4], [8], seed=1), DPKLoss([4], [8], seed=1)  # training mode: r moves with the CKA
    padded.load_state_dict(plain.state_dict())
    a, b = plain(f_s, f_t), padded(junk_s, junk_t, valid=valid)
    torch.testing.assert_close(padded.r, plain.r, rtol=1e-6, atol=0)
    assert padded.ratios != [0.5]
    torch.testing.assert_close(b, a, rtol=1e-6, atol=0)


def test_a_finished_run_leaves_no_loader_workers(digits_root, tmp_path):
    """Its loaders' worker processes stop when run() returns, while the trainer still exists (the
    demo and the study run many trainings in one process: left to the garbage collector, they
    stopped inside later runs, where each waited out a 5-second join timeout)."""
    import multiprocessing

    from fastkd.engine.trainer import Trainer

    before = set(multiprocessing.active_children())
    trainer = Trainer(C.make_config(data=str(digits_root), student="fastkd:resnet8", method="ce", epochs=1,
                                    data_backend="torch", batch_size=256, image_size=8, workers=1, device="cpu",
                                    output=str(tmp_path / "run")))
    result = trainer.run()
    assert result["final"]["val_samples"] > 0
    assert set(multiprocessing.active_children()) - before == set()
    assert trainer.val_loader is not None  # the loaders remain usable objects; only their workers stopped
