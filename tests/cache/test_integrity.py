"""Cache integrity: epoch checksums verified before a checkpoint, data files changed after the build
refused, damaged top-K indices refused when an epoch opens, 'fastkd cache verify', a full disk
and a signal during the build end in one line without temporary files, one build per folder."""
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fastkd import cli
from fastkd.engine.runlock import FolderLock
from fastkd.cache import CacheReader, store
from fastkd.engine import checkpoint as ckpt
from fastkd.engine.metrics import read_metrics

TRAIN = ["train", "--data-backend", "torch", "--student", "fastkd:resnet8", "--method", "kd", "--epochs", "2",
         "--batch-size", "8", "--image-size", "16", "--device", "cpu", "--workers", "0", "--seed", "3",
         "--log-interval", "3"]


def build_args(root, ckpt_path, out, *extra, epochs=2, workers=0):
    return [str(a) for a in ["cache", "build", "--data", root, "--data-backend", "torch", "--teacher",
                             "fastkd:resnet8", "--teacher-checkpoint", ckpt_path, "--image-size", "16", "--batch-size",
                             "8", "--workers", workers, "--device", "cpu", "--seed", "3", "--epochs", epochs,
                             "--output", out, *extra]]


def train_args(data, cache, out, *extra):
    return [str(a) for a in [*TRAIN, "--data", data, "--teacher-cache", cache, "--output", out, *extra]]


def errors(caplog):
    return [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


@pytest.fixture
def data(tiny_jpegs, tmp_path):
    """A private copy of the tiny data set (these tests change its files)."""
    return Path(shutil.copytree(tiny_jpegs, tmp_path / "data"))


@pytest.fixture
def cache(data, teacher_ckpt, tmp_path):
    out = tmp_path / "cache"
    assert cli.main(build_args(data, teacher_ckpt, out)) == 0
    return out


def first_image(data) -> Path:
    return sorted((data / "train").rglob("*.jpg"))[0]


def test_the_build_records_epoch_and_data_checksums_and_verify_passes(cache, data, caplog):
    m = json.loads((cache / "manifest.json").read_text())
    assert sorted(m["epoch_sha256"]) == ["0", "1"]
    for e in (0, 1):
        path = cache / store.epoch_name(e)
        assert m["epoch_sha256"][str(e)] == hashlib.sha256(path.read_bytes()).hexdigest()
    records = np.load(cache / store.DATA_FILES)
    assert m["data_files_sha256"] == hashlib.sha256((cache / store.DATA_FILES).read_bytes()).hexdigest()
    from fastkd.data import build_index

    paths = build_index(data, train=True).paths
    assert len(records) == len(paths) == 45
    for rec, p in zip(records, paths):
        assert rec["size"] == os.path.getsize(p) and rec["mtime_ns"] == os.stat(p).st_mtime_ns
        assert bytes(rec["sha256"]) == hashlib.sha256(Path(p).read_bytes()).digest()
    caplog.set_level("INFO", logger="fastkd")
    assert cli.main(["cache", "verify", str(cache), "--data", str(data)]) == 0
    assert "2 epoch file(s) and 45 data file(s) match their checksums" in caplog.text
    assert not list(cache.glob(".*tmp*")) and not (cache / ".fastkd.lock").exists()


def test_an_image_overwritten_after_the_build_is_refused_and_named(cache, data, tmp_path, caplog):
    victim, other = first_image(data), sorted((data / "train").rglob("*.jpg"))[-1]
    victim.write_bytes(other.read_bytes())  # another real image under this one's name and label
    assert cli.main(train_args(data, cache, tmp_path / "run")) == 2
    errs = errors(caplog)
    assert len(errs) == 1 and "\n" not in errs[0], errs
    assert f"the data file {victim} changed after the cache was built" in errs[0] and "stale" in errs[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    caplog.clear()
    assert cli.main(["cache", "verify", str(cache), "--data", str(data)]) == 2
    assert f"the data file {victim} changed after the build" in errors(caplog)[0]


def test_continuing_a_build_after_an_image_changed_is_refused(data, teacher_ckpt, tmp_path, caplog):
    out = tmp_path / "c"
    assert cli.main(build_args(data, teacher_ckpt, out, epochs=1)) == 0
    victim = first_image(data)
    victim.write_bytes(victim.read_bytes() + b"\0")
    assert cli.main(build_args(data, teacher_ckpt, out, epochs=2)) == 2
    assert f"computed from data that changed since: {victim}" in errors(caplog)[0]


def test_a_new_file_time_is_refused_until_verify_finds_the_same_contents(cache, data, tmp_path, caplog):
    victim = first_image(data)
    st = victim.stat()
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # e.g. a copy that did not keep times
    assert cli.main(train_args(data, cache, tmp_path / "a", "--epochs", "1")) == 2
    assert f"the data file {victim} changed after the cache was built" in errors(caplog)[0]
    caplog.set_level("INFO", logger="fastkd")
    assert cli.main(["cache", "verify", str(cache), "--data", str(data)]) == 0
    assert "1 data file(s) have new modification times but the same contents" in caplog.text
    assert cli.main(train_args(data, cache, tmp_path / "b", "--epochs", "1")) == 0


def _flip_byte(path: Path, offset_from_end: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[-offset_from_end] ^= 0x01  # the lowest mantissa bit of an fp32 logit: still finite
    path.write_bytes(bytes(raw))


def test_a_flipped_bit_in_an_epoch_fails_the_run_before_that_epoch_is_checkpointed(cache, data, tmp_path, caplog):
    _flip_byte(cache / "epoch_0001.npy", 40)
    assert np.isfinite(np.load(cache / "epoch_0001.npy")).all()
    run = tmp_path / "run"
    assert cli.main(train_args(data, cache, run, "--checkpoint-interval", "2")) == 2
    errs = errors(caplog)
    assert len(errs) == 1 and "epoch_0001.npy fails its checksum" in errs[0], errs
    state = ckpt.load(run / "last.pt")
    assert (state["epoch"], state["step_in_epoch"]) == (1, 0)  # epoch 0's end: nothing of epoch 1 was saved
    assert [r["epoch"] for r in read_metrics(run / "metrics.jsonl", "epoch")] == [0]
    caplog.clear()
    assert cli.main(["cache", "verify", str(cache)]) == 2
    assert "epoch_0001.npy fails its checksum" in errors(caplog)[0]


def test_a_nan_row_in_a_cache_without_checksums_fails_the_run(cache, data, tmp_path, caplog):
    m = json.loads((cache / "manifest.json").read_text())
    del m["epoch_sha256"]  # a cache built before checksums
    (cache / "manifest.json").write_text(json.dumps(m))
    arr = np.load(cache / "epoch_0000.npy", mmap_mode="r+")
    arr[5, 2] = np.nan
    arr.flush()
    del arr
    assert cli.main(train_args(data, cache, tmp_path / "run", "--epochs", "1")) == 2
    assert "epoch_0000.npy row 5 is not finite" in errors(caplog)[0]
    assert not (tmp_path / "run" / "last.pt").exists()


def test_a_damaged_topk_index_is_refused_when_the_epoch_opens(data, teacher_ckpt, tmp_path, caplog):
    out = tmp_path / "topk"
    assert cli.main(build_args(data, teacher_ckpt, out, "--format", "topk", "--top-k", "2", epochs=1)) == 0
    arr = np.load(out / "epoch_0000.npy", mmap_mode="r+")
    arr["indices"][3, 0] = 77
    arr.flush()
    del arr
    assert cli.main(train_args(data, out, tmp_path / "run", "--epochs", "1")) == 2
    errs = errors(caplog)
    assert len(errs) == 1 and "epoch_0000.npy: row 3 holds class index 77, outside [0, 4)" in errs[0], errs
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not read_metrics(tmp_path / "run" / "metrics.jsonl")


def test_non_finite_teacher_logits_are_refused_by_the_build(data, teacher_ckpt, tmp_path, caplog):
    sd = torch.load(teacher_ckpt, map_location="cpu", weights_only=True)
    sd["fc.bias"][1] = float("nan")
    bad = tmp_path / "nan.pt"
    torch.save(sd, bad)
    out = tmp_path / "c"
    assert cli.main(build_args(data, bad, out, epochs=1)) == 2
    assert "epoch 0: the teacher's logits for sample" in errors(caplog)[0] and "not finite" in errors(caplog)[0]
    assert not list(out.glob(".epoch_*")) and not (out / "epoch_0000.npy").exists()


def test_a_full_disk_is_one_line_and_leaves_no_temporary_file(data, teacher_ckpt, tmp_path, caplog, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    out = tmp_path / "c"
    assert cli.main(build_args(data, teacher_ckpt, out, epochs=1)) == 2
    errs = errors(caplog)
    assert len(errs) == 1 and "\n" not in errs[0], errs
    assert f"no space left on device for {out / 'epoch_0000.npy'}: the epoch needs 720 B" in errs[0]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


@pytest.mark.slow
def test_a_full_tmpfs_is_one_line_not_sigbus(digit_jpegs, teacher_ckpt, tmp_path, run_py):
    """A real full filesystem (a small tmpfs; needs root): epoch files of three pages with two
    free. Before the space was reserved, the memory map's write into the file's hole (creating
    the file allocates its first and last page only) ended the build with SIGBUS."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        data = digit_jpegs(tmp_path / "d", {"train": (170, 170, 170, 170), "val": (1, 1, 1, 1)})
        out = mnt / "c"
        first = run_py(build_args(data, teacher_ckpt, out, epochs=1))  # 680 rows x 16 B: 3 pages per epoch
        assert first.returncode == 0, first.stderr[-2000:]
        pages = []
        try:
            while True:  # fill the filesystem page by page, then free exactly two
                pages.append(mnt / f"fill{len(pages)}")
                pages[-1].write_bytes(b"\1" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        pages.pop().unlink(missing_ok=True)
        pages.pop().unlink()
        pages.pop().unlink()
        proc = run_py(build_args(data, teacher_ckpt, out, epochs=2))
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"fastkd cache build: error: no space left on device for {out / 'epoch_0001.npy'}" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert not [p.name for p in out.iterdir() if ".tmp" in p.name], list(out.iterdir())
        assert json.loads((out / "manifest.json").read_text())["epochs_done"] == [0]
    finally:
        subprocess.run(["umount", str(mnt)])


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_ends_the_build_in_one_line_and_discards_the_partial_epoch(tiny_jpegs, teacher_ckpt, tmp_path, sig):
    out = tmp_path / "c"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fastkd", *build_args(tiny_jpegs, teacher_ckpt, out, epochs=500,
                                                                         workers=2)],
                            env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    lines = []
    deadline = time.monotonic() + 120
    for line in proc.stderr:  # wait until an epoch is done, then signal the whole group (as Ctrl-C does)
        lines.append(line)
        if "epoch 1:" in line or time.monotonic() > deadline:
            break
    os.killpg(proc.pid, sig)
    rest = proc.stderr.read()
    proc.wait(60)
    text = "".join(lines) + rest
    assert proc.returncode == 128 + int(sig), text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    last = text.strip().splitlines()[-1]
    assert last == (f"fastkd cache build: error: interrupted by {sig.name}: the epoch being built is discarded, the "
                    "finished ones are kept; run the same command to continue"), text[-3000:]
    assert not list(out.glob(".epoch_*")) and not (out / ".fastkd.lock").exists()
    done = json.loads((out / "manifest.json").read_text())["epochs_done"]
    assert done[:2] == [0, 1] and all((out / store.epoch_name(e)).exists() for e in done)


def test_one_epoch_is_said_so_and_a_run_from_the_cache_names_and_measures_its_teacher(data, teacher_ckpt, tmp_path,
                                                                                       caplog):
    caplog.set_level("INFO", logger="fastkd")
    out = tmp_path / "c"
    assert cli.main(build_args(data, teacher_ckpt, out, epochs=1)) == 0
    assert "1 epoch (epoch 0), full fp32" in caplog.text and f"{out} holds 1 epoch (epoch 0)" in caplog.text
    assert "epochs 0," not in caplog.text
    caplog.clear()
    run = tmp_path / "run"
    assert cli.main(train_args(data, out, run, "--epochs", "1")) == 0
    assert f"fastkd train: fastkd:resnet8 (cached in {out}) -> fastkd:resnet8" in caplog.text
    assert "(no teacher)" not in caplog.text
    rec = read_metrics(run / "metrics.jsonl", "epoch")[0]
    from fastkd.data import build_index

    labels = torch.from_numpy(build_index(data, train=True).labels).long()
    rows = CacheReader(out).rows(0, np.arange(45))["logits"]
    assert rec["teacher_train_top1"] == 100.0 * int((rows.argmax(1) == labels).sum()) / 45
    assert "teacher (train views, cached)" in caplog.text
    # a run folder is no cache's --output, and a locked cache folder refuses a second build
    caplog.clear()
    assert cli.main(build_args(data, teacher_ckpt, run, epochs=1)) == 2
    assert f"--output {run} is a training run's folder" in errors(caplog)[0]
    caplog.clear()
    with FolderLock(out, "cache folder"):
        assert cli.main(build_args(data, teacher_ckpt, out, epochs=2)) == 2
    assert f"the cache folder {out} is in use by another fastkd process (PID {os.getpid()})" in errors(caplog)[0]
    assert json.loads((out / "manifest.json").read_text())["epochs_done"] == [0]
