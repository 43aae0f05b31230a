"""fastkd train --teacher-cache: bit-identical to the online teacher with a full fp32 cache; the
loss from bf16/fp16/top-k caches stays within a bound of the dense one; a cache that does not
match the run is refused naming the field."""
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fastkd import cli
from fastkd.cache import CacheReader
from fastkd.engine.metrics import read_metrics

TRAIN = ["train", "--data-backend", "torch", "--student", "fastkd:resnet8", "--method", "kd", "--epochs", "2",
         "--batch-size", "8", "--image-size", "16", "--device", "cpu", "--workers", "0", "--seed", "3",
         "--log-interval", "3"]


def build(root, ckpt, out, *extra, epochs=2, seed=3, image_size=16):
    backend = "dali" if "dali" in extra else "torch"
    extra = [a for a in extra if a not in ("--data-backend", "dali")]
    args = ["cache", "build", "--data", root, "--data-backend", backend, "--teacher", "fastkd:resnet8",
            "--teacher-checkpoint", ckpt, "--image-size", image_size, "--batch-size", "8", "--workers", "0",
            "--device", "cpu", "--seed", seed, "--epochs", epochs, "--output", out, *extra]
    assert cli.main([str(a) for a in args]) == 0


@pytest.fixture(scope="module")
def full_cache(tiny_jpegs, teacher_ckpt, tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("c") / "full"
    build(tiny_jpegs, teacher_ckpt, out)
    return out


def weights(run: Path) -> dict:
    return torch.load(run / "last.pt", map_location="cpu", weights_only=True)["model"]


@pytest.mark.parametrize("method, augment", [("kd", "imagenet"), ("dist", "imagenet"), ("kd", "cifar")])
def test_full_fp32_cache_trains_bit_identical_weights(full_cache, tiny_jpegs, teacher_ckpt, tmp_path, method,
                                                      augment):
    base = [str(a) for a in [*TRAIN, "--data", tiny_jpegs]]
    base[base.index("kd")] = method
    if augment != "imagenet":  # pad-4 crops + flip: a cache of its own, refused by an imagenet run
        base += ["--augment", augment]
        full_cache = tmp_path / "cache"
        build(tiny_jpegs, teacher_ckpt, full_cache, "--augment", augment)
        assert json.loads((full_cache / "manifest.json").read_text())["augmentation"]["name"] == augment
    online, cached = tmp_path / "online", tmp_path / "cached"
    assert cli.main([*base, "--teacher", "fastkd:resnet8", "--teacher-checkpoint", str(teacher_ckpt),
                     "--output", str(online)]) == 0
    assert cli.main([*base, "--teacher-cache", str(full_cache), "--output", str(cached)]) == 0
    a, b = weights(online), weights(cached)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra, rb = read_metrics(online / "metrics.jsonl", "epoch"), read_metrics(cached / "metrics.jsonl", "epoch")
    assert [r["train_loss"] for r in ra] == [r["train_loss"] for r in rb]
    assert "teacher_top1" in ra[-1] and "teacher_top1" not in rb[-1]  # no teacher model, no teacher metrics


def loss_inputs(cache: Path, tiny_jpegs):
    """A batch's student logits, labels and the dense fp32 teacher rows of the full cache."""
    from fastkd.data import build_index

    idx = np.arange(0, 45, 3)
    labels = torch.from_numpy(build_index(tiny_jpegs, train=True).labels[idx])
    dense = CacheReader(cache).rows(1, idx)["logits"] * 3  # sharper rows: more top-k error to bound
    g = torch.Generator().manual_seed(0)
    z = torch.randn(len(idx), 4, generator=g, dtype=torch.float32) * 3
    return idx, z, labels, dense


# Every method with a teacher, from the table (a new one is covered without a list to update).
METHODS = {m: (dict(temperature=2.0) if m == "kd" else {}) for m in __import__("fastkd").losses.METHODS if m != "ce"}


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_cache_loss_within_the_rounding_bound(full_cache, tiny_jpegs, tmp_path, dtype):
    from fastkd.cache import store
    from fastkd.losses import DistillLoss

    idx, z, y, dense = loss_inputs(full_cache, tiny_jpegs)
    rounded = store.from_storage(store.to_storage(dense, dtype), dtype)  # what the cache stores
    delta = (rounded.float() - dense).abs()
    assert delta.max() > 0  # the rounding is real
    for method, params in METHODS.items():
        loss = DistillLoss(method, ce_weight=0.0, kd_weight=1.0, backend="torch", **params)
        ref, got = loss(z, dense, y), loss(z, rounded, y)
        grad = torch.zeros_like(dense)  # d loss / d teacher logits by central differences (the loss detaches v)
        for i in range(dense.shape[0]):
            for c in range(dense.shape[1]):
                e = torch.zeros_like(dense)
                e[i, c] = 1e-2
                grad[i, c] = (loss(z, dense + e, y) - loss(z, dense - e, y)) / 2e-2
        bound = 2 * float((grad.abs() * delta).sum()) + 1e-6  # first order, with a factor 2 of slack
        assert abs(float(got) - float(ref)) <= bound, (method, float(got), float(ref), bound)


def test_topk_cache_loss_within_the_compression_bound(full_cache, tiny_jpegs, teacher_ckpt, tmp_path):
    from fastkd.cache.source import CachedTeacher
    from fastkd.losses import DistillLoss
    from fastkd.losses.compressed import compress_topk, densify

    idx, z, y, dense = loss_inputs(full_cache, tiny_jpegs)
    t = compress_topk(dense, y, 1)
    for method, params in METHODS.items():
        loss = DistillLoss(method, ce_weight=0.0, kd_weight=1.0, backend="torch", **params)
        got, on_dense_row = loss(z, t, y), loss(z, densify(t, y), y)
        assert torch.isfinite(got) and abs(float(got) - float(on_dense_row)) < 1e-6, method
    # KD at T = 1 keeps the absent mass m; per row |dKL| <= m (log n + spread of log q over the n absent classes)
    kd = DistillLoss("kd", ce_weight=0.0, kd_weight=1.0, temperature=1.0, backend="torch")
    ref, got = float(kd(z, dense, y)), float(kd(z, t, y))
    p, logq = dense.double().softmax(1), z.double().log_softmax(1)
    absent = torch.ones_like(dense, dtype=torch.bool)
    absent.scatter_(1, t.indices, False)
    absent.scatter_(1, y[:, None], False)
    bounds = []
    for i in range(len(idx)):
        a = absent[i]
        m, n = float(p[i, a].sum()), int(a.sum())
        spread = float(logq[i, a].max() - logq[i, a].min()) if n else 0.0
        bounds.append(m * (math.log(n) + spread) if n else 0.0)
    assert abs(got - ref) <= sum(bounds) / len(bounds) + 1e-6
    assert abs(got - ref) > 0  # compression is lossy here: the bound is not vacuous
    # and the cache serves exactly these compressed rows
    out = tmp_path / "topk"
    build(tiny_jpegs, teacher_ckpt, out, "--format", "topk", "--top-k", "1")
    rows = CacheReader(out).rows(1, idx)
    plain = compress_topk(CacheReader(full_cache).rows(1, idx)["logits"], y, 1)
    assert torch.equal(rows["indices"], plain.indices) and torch.equal(rows["fill"], plain.fill.float())


def test_topk_cache_trains(tiny_jpegs, teacher_ckpt, tmp_path):
    cache = tmp_path / "topk"
    build(tiny_jpegs, teacher_ckpt, cache, "--format", "topk", "--top-k", "2", "--dtype", "fp16", epochs=1)
    run = tmp_path / "run"
    args = [str(a) for a in [*TRAIN, "--data", tiny_jpegs, "--teacher-cache", cache, "--output", run]]
    args[args.index("--epochs") + 1] = "1"
    assert cli.main(args) == 0
    rec = read_metrics(run / "metrics.jsonl", "epoch")[-1]
    assert math.isfinite(rec["train_loss"]) and rec["train_kd"] > 0


def _copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("change, message", [
    (["--seed", "4"], "seed: cache has 3, this run has 4"),
    (["--image-size", "12"], "image size (teacher view): cache has 16, this run has 12"),
    (["--teacher-image-size", "20"], "image size (teacher view): cache has 16, this run has 20"),
    (["--epochs", "3"], "epochs not covered: this run needs epoch(s) 2, the cache holds 0-1"),
    ("other-teacher", "teacher: cache has 'fastkd:resnet8', this run names 'fastkd:resnet20'"),
    ("other-checkpoint", "teacher checkpoint: "),
    ("renamed-file", "data index (paths and labels): the cache was built on another file list"),
    ("relabelled", "data index (paths and labels)"),
    ("fewer-classes", "classes: cache has 4, this run has 3"),
    ("augmentation", "augmentation: cache has {'scale': [0.35, 1.0]}, this run has {'scale': [0.08, 1.0]}"),
    (["--data-backend", "dali"], "augmentation: cache has {'backend': 'torch'"),
    (["--augment", "cifar"], "augmentation: cache has {'crop': 'random-resized', 'name': 'imagenet'"),
])
def test_a_cache_that_does_not_match_the_run_is_refused(full_cache, tiny_jpegs, teacher_ckpt, tmp_path, caplog,
                                                       change, message):
    if "dali" in change:
        pytest.importorskip("nvidia.dali")
    data, cache, extra = tiny_jpegs, full_cache, []
    if change == "other-checkpoint":
        from fastkd.models import create_model

        other = tmp_path / "other.pt"
        torch.save(create_model("fastkd:resnet8", 4).state_dict(), other)
        extra = ["--teacher", "fastkd:resnet8", "--teacher-checkpoint", str(other)]
    elif change == "other-teacher":
        extra = ["--teacher", "fastkd:resnet20", "--teacher-checkpoint", str(teacher_ckpt)]
    elif change == "renamed-file":
        data = _copy_tree(tiny_jpegs, tmp_path / "data")
        first = sorted((data / "train" / "class1").iterdir())[0]
        first.rename(first.with_name("renamed.jpg"))
    elif change == "relabelled":
        data = _copy_tree(tiny_jpegs, tmp_path / "data")
        first = sorted((data / "train" / "class1").iterdir())[0]
        first.rename(data / "train" / "class2" / first.name)
    elif change == "fewer-classes":
        data = _copy_tree(tiny_jpegs, tmp_path / "data")
        for split in ("train", "val"):
            shutil.rmtree(data / split / "class3")
    elif change == "augmentation":
        cache = _copy_tree(full_cache, tmp_path / "cache")
        m = json.loads((cache / "manifest.json").read_text())
        m["augmentation"]["scale"] = [0.35, 1.0]
        (cache / "manifest.json").write_text(json.dumps(m))
    else:
        extra = change
    args = [str(a) for a in [*TRAIN, "--data", data, "--teacher-cache", cache, "--output", tmp_path / "run"]]
    for flag, value in zip(extra[::2], extra[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    assert cli.main(args) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert "does not match this run: " + message in errors[0], errors[0]


def test_not_a_cache_and_dpk_are_refused(full_cache, tiny_jpegs, tmp_path, caplog):
    base = [str(a) for a in [*TRAIN, "--data", tiny_jpegs, "--output", tmp_path / "run"]]
    assert cli.main([*base, "--teacher-cache", str(tmp_path)]) == 2
    assert "is not a teacher cache: it has no manifest.json" in caplog.text
    args = [*base, "--teacher-cache", str(full_cache)]
    args[args.index("kd")] = "dpk"
    assert cli.main(args) == 2
    assert "--method dpk distils teacher features, which a --teacher-cache does not hold" in caplog.text


@pytest.mark.parametrize("damage, words", [
    ("truncate", "epoch_0001.npy: not a readable epoch file"),
    ("remove", "epoch_0001.npy: not a readable epoch file"),
    ("header", "epoch_0001.npy: not a readable epoch file"),
    ("manifest-key", "not a complete cache manifest (missing format)"),
    ("manifest-epochs-done", "malformed cache manifest (edited by hand?): bad epochs_done"),
    ("manifest-build", "malformed cache manifest (edited by hand?): bad build"),
])
def test_a_damaged_cache_is_refused_before_training(full_cache, tiny_jpegs, tmp_path, caplog, damage, words):
    """A later epoch's missing, truncated or garbled file (or a manifest missing a key) is refused
    with one line before the first step, not with a traceback or after an epoch of training."""
    cache = tmp_path / "cache"
    shutil.copytree(full_cache, cache)
    f = cache / "epoch_0001.npy"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:-100])
    elif damage == "remove":
        f.unlink()
    elif damage == "header":
        f.write_bytes(b"garbage!" + f.read_bytes()[8:])
    else:
        m = json.loads((cache / "manifest.json").read_text())
        if damage == "manifest-key":
            del m["format"]
        elif damage == "manifest-epochs-done":
            m["epochs_done"] = ["0", "1"]
        else:
            m["build"] = None
        (cache / "manifest.json").write_text(json.dumps(m))
    args = [str(a) for a in [*TRAIN, "--data", tiny_jpegs, "--output", tmp_path / "run", "--teacher-cache", cache]]
    assert cli.main(args) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0] and words in errors[0], errors
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not read_metrics(tmp_path / "run" / "metrics.jsonl",
                                                                                  "epoch")


@pytest.mark.parametrize("flag, words", [("--sequential", "--sequential orders the teacher forward"),
                                         ("--teacher-cuda-graph", "--teacher-cuda-graph captures the teacher")])
def test_teacher_forward_options_are_refused_with_a_cache(full_cache, tiny_jpegs, tmp_path, caplog, flag, words):
    args = [str(a) for a in [*TRAIN, "--data", tiny_jpegs, "--output", tmp_path / "run",
                             "--teacher-cache", full_cache, flag]]
    assert cli.main(args) == 2
    assert words in caplog.text
    assert not (tmp_path / "run").exists()


def test_cached_teacher_source_reads_rows_by_sample_index(full_cache, tmp_path):
    from types import SimpleNamespace

    from fastkd.cache.source import CachedTeacher

    reader = CacheReader(full_cache)
    src = CachedTeacher(full_cache, torch.device("cpu"), expect=reader.manifest, epochs=[0, 1])
    assert not src.has_model and not src.provides_features
    idx = torch.tensor([44, 0, 7, 7])
    with pytest.raises(RuntimeError, match="before set_epoch"):
        src.submit(SimpleNamespace(indices=idx))
    src.set_epoch(1)
    out = src.result(src.submit(SimpleNamespace(indices=idx)))
    assert out.features is None and torch.equal(out.logits, reader.rows(1, idx.numpy())["logits"])
    with pytest.raises(ValueError, match="needs batch.indices"):
        src.submit(SimpleNamespace(indices=None))


def test_eskd_needs_only_the_epochs_before_the_stop(full_cache, tiny_jpegs, tmp_path):
    args = [str(a) for a in [*TRAIN, "--data", tiny_jpegs, "--teacher-cache", full_cache, "--output", tmp_path / "r",
                             "--eskd-stop-epoch", "2"]]
    args[args.index("--epochs") + 1] = "3"  # epochs 0-1 from the cache, epoch 2 without a teacher
    assert cli.main(args) == 0
    records = read_metrics(tmp_path / "r" / "metrics.jsonl", "epoch")
    assert [r["teacher_forward"] for r in records] == [True, True, False]


def test_kill_during_cached_training_then_resume_gives_identical_weights(full_cache, tiny_jpegs, tmp_path, run_py):
    kill_run = Path(__file__).resolve().parents[1] / "engine" / "kill_run.py"
    args = [str(a) for a in [*TRAIN, "--data", tiny_jpegs, "--teacher-cache", full_cache, "--checkpoint-interval", 2]]
    ref, out = tmp_path / "ref", tmp_path / "run"
    assert cli.main([*args, "--output", str(ref)]) == 0
    proc = run_py([*args, "--output", out], module=(str(kill_run), "step:9"))  # 6 steps per epoch: inside epoch 1
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert cli.main([*args, "--output", str(out), "--resume", "auto"]) == 0
    a, b = weights(out), weights(ref)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_from_a_cache_rebuilt_with_other_outputs_is_warned_about(full_cache, tiny_jpegs, teacher_ckpt,
                                                                         tmp_path, caplog):
    """The checkpoint remembers what the cache held: the same path rebuilt (here fp16) is noticed."""
    cache = tmp_path / "cache"
    shutil.copytree(full_cache, cache)
    args = [str(a) for a in [*TRAIN, "--data", tiny_jpegs, "--teacher-cache", cache]]
    args[args.index("--epochs") + 1] = "1"
    assert cli.main([*args, "--output", str(tmp_path / "a")]) == 0
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    args[args.index("--epochs") + 1] = "2"
    caplog.set_level("INFO", logger="fastkd")
    assert cli.main([*args, "--output", str(tmp_path / "a"), "--resume", "auto"]) == 0
    assert "teacher cache that holds other outputs" not in caplog.text
    shutil.rmtree(cache)
    build(tiny_jpegs, teacher_ckpt, cache, "--dtype", "fp16")
    assert cli.main([*args, "--output", str(tmp_path / "b"), "--resume", "auto"]) == 0
    assert "resuming with a teacher cache that holds other outputs than the one the checkpoint's run read (cache)" \
        in caplog.text


def test_a_cache_builds_and_trains_with_skip_corrupt(tiny_jpegs, teacher_ckpt, tmp_path):
    """The loader's error on a corrupt file says '--skip-corrupt': the build takes it too, and the
    cached run then matches the online one (the placeholder image's teacher logits are cached)."""
    data = tmp_path / "data"
    shutil.copytree(tiny_jpegs, data)
    next(iter(sorted((data / "train").glob("*/*.jpg")))).write_bytes(b"not a jpeg")
    build(data, teacher_ckpt, tmp_path / "cache", "--skip-corrupt", epochs=1)
    base = [str(a) for a in [*TRAIN, "--data", data, "--skip-corrupt"]]
    base[base.index("--epochs") + 1] = "1"
    online, cached = tmp_path / "online", tmp_path / "cached"
    assert cli.main([*base, "--teacher", "fastkd:resnet8", "--teacher-checkpoint", str(teacher_ckpt),
                     "--output", str(online)]) == 0
    assert cli.main([*base, "--teacher-cache", str(tmp_path / "cache"), "--output", str(cached)]) == 0
    a, b = weights(online), weights(cached)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_dali_cpu_cache_trains_bit_identical_weights(tiny_jpegs, teacher_ckpt, tmp_path):
    """The DALI loader (CPU pipeline here): its crops are keyed by its own seeds, the same in the
    builder and in training, so a DALI-built cache matches a DALI training run bit for bit."""
    pytest.importorskip("nvidia.dali")
    cache = tmp_path / "cache"
    build(tiny_jpegs, teacher_ckpt, cache, "--data-backend", "dali", epochs=1)
    assert json.loads((cache / "manifest.json").read_text())["augmentation"]["backend"] == "dali"
    base = [str(a) for a in [*TRAIN, "--data", tiny_jpegs]]
    base[base.index("torch")] = "dali"
    base[base.index("--epochs") + 1] = "1"
    online, cached = tmp_path / "online", tmp_path / "cached"
    assert cli.main([*base, "--teacher", "fastkd:resnet8", "--teacher-checkpoint", str(teacher_ckpt),
                     "--output", str(online)]) == 0
    assert cli.main([*base, "--teacher-cache", str(cache), "--output", str(cached)]) == 0
    a, b = weights(online), weights(cached)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_other_build_numerics_are_warned_about(full_cache, tiny_jpegs, tmp_path, caplog):
    cache = _copy_tree(full_cache, tmp_path / "cache")
    m = json.loads((cache / "manifest.json").read_text())
    m["build"]["amp"] = "bf16"
    (cache / "manifest.json").write_text(json.dumps(m))
    args = [str(a) for a in [*TRAIN, "--data", tiny_jpegs, "--teacher-cache", cache, "--output", tmp_path / "r"]]
    args[args.index("--epochs") + 1] = "1"
    assert cli.main(args) == 0
    assert "other numerics than this run would use (amp 'bf16' (cache) vs 'none' (run))" in caplog.text


def test_a_preset_naming_the_teacher_trains_from_the_cache_without_its_checkpoint(full_cache, tiny_jpegs, tmp_path):
    """A preset names its teacher; with --teacher-cache the name is checked against the cache and
    no --teacher-checkpoint (or --random-teacher) is asked for."""
    args = [str(a) for a in [*TRAIN, "--data", tiny_jpegs, "--teacher", "fastkd:resnet8", "--teacher-cache",
                             full_cache, "--output", tmp_path / "r"]]
    args[args.index("--epochs") + 1] = "1"
    assert cli.main(args) == 0


def test_every_teacher_temperature_of_the_table_reaches_the_top_k_warning():
    """Each temperature parameter of each method that divides the teacher's logits is found by
    teacher_temperatures (a new method's parameter joins without a list to update); a student-only
    temperature is not."""
    from fastkd.cache.source import teacher_temperatures
    from fastkd.engine import config as C
    from fastkd.losses.methods import METHOD_TABLE

    for name, method in METHOD_TABLE.items():
        for i, p in enumerate(method.params):
            if p.kind != "temperature":
                continue
            value = 7.0 + i / 8  # distinct from every default
            temps = teacher_temperatures(C.TrainConfig(method=name, **{p.field: value}))
            assert (value in temps) == (p.scales != "student"), (name, p.name, temps)


def test_topk_cache_warns_at_a_teacher_temperature_other_than_1(tiny_jpegs, teacher_ckpt, tmp_path, caplog):
    from fastkd.cache.source import teacher_temperatures
    from fastkd.engine import config as C

    assert teacher_temperatures(C.TrainConfig(method="kd")) == [1.0]
    assert teacher_temperatures(C.TrainConfig(method="ats")) == [4.0, 2.0]
    assert teacher_temperatures(C.TrainConfig(method="dkd")) == [4.0]
    cache = tmp_path / "topk"
    build(tiny_jpegs, teacher_ckpt, cache, "--format", "topk", "--top-k", "2", epochs=1)
    args = [str(a) for a in [*TRAIN, "--data", tiny_jpegs, "--teacher-cache", cache]]
    args[args.index("--epochs") + 1] = "1"
    assert cli.main([*args, "--output", str(tmp_path / "t1")]) == 0
    assert "top-k teacher cache with teacher temperature" not in caplog.text  # KD at T = 1: exact mass
    assert cli.main([*args, "--temperature", "4", "--output", str(tmp_path / "t4")]) == 0
    assert "top-k teacher cache with teacher temperature(s) 4" in caplog.text


def test_two_gloo_processes_from_the_cache_match_the_online_teacher(full_cache, tiny_jpegs, teacher_ckpt, tmp_path,
                                                                   run_py):
    """DDP: each rank reads its shard's rows (45 samples: one padded row, ignored) -> the weights
    of the online 2-process run, bit for bit."""
    base = [str(a) for a in ["--standalone", "--nproc_per_node", "2", "-m", "fastkd", *TRAIN, "--data", tiny_jpegs]]
    base[base.index("--epochs") + 1] = "1"
    online, cached = tmp_path / "online", tmp_path / "cached"
    for extra, out in ((["--teacher", "fastkd:resnet8", "--teacher-checkpoint", str(teacher_ckpt)], online),
                       (["--teacher-cache", str(full_cache)], cached)):
        proc = run_py([*base, *extra, "--output", out], module=("-m", "torch.distributed.run"))
        assert proc.returncode == 0, proc.stderr[-4000:]
    assert "world_size: 2" in (cached / "config.yaml").read_text()
    a, b = weights(online), weights(cached)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert read_metrics(cached / "metrics.jsonl", "epoch")[-1]["train_samples"] == 45


@pytest.mark.slow
def test_python_api_runs_a_cache_config_through_the_recipe(full_cache, tiny_jpegs, tmp_path):
    """fastkd.recipes.train(cfg) is what 'fastkd train' runs (same weights); fastkd.engine.train, which
    never imports the cache, refuses a teacher_cache config naming it."""
    from fastkd import recipes
    from fastkd.engine import ConfigError, make_config, train

    args = [str(a) for a in [*TRAIN, "--data", tiny_jpegs, "--teacher-cache", full_cache, "--epochs", "1"]]
    assert cli.main([*args, "--output", str(tmp_path / "cli")]) == 0
    cfg = make_config(data=str(tiny_jpegs), data_backend="torch", student="fastkd:resnet8", method="kd", epochs=1,
                      batch_size=8, image_size=16, device="cpu", workers=0, seed=3, log_interval=3,
                      teacher_cache=str(full_cache), output=str(tmp_path / "api"))
    with pytest.raises(ConfigError, match=r"fastkd\.recipes\.train"):
        train(cfg)
    assert not (tmp_path / "api").exists()
    result = recipes.train(cfg)
    assert result["final"] is not None and "teacher_top1" not in result["final"]  # no teacher model
    a, b = weights(tmp_path / "cli"), weights(tmp_path / "api")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
