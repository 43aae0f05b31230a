"""The real backends (torch; DALI in CPU mode) on real JPEG files.

Every test runs once per backend (``backend`` fixture); the DALI runs skip where DALI is missing.
References are computed here, independently of the loader, with PIL.
"""
import json
import os
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastkd.data import CorruptImageError, IMAGENET_MEAN, IMAGENET_STD, build_index, create_loader

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
TEACHER_MEAN = (0.5, 0.5, 0.5)
TEACHER_STD = (0.25, 0.3, 0.35)


def make(root, backend, **kw):
    opts = dict(batch_size=4, image_size=16, backend=backend, device="cpu", num_threads=1 if backend == "dali" else 0)
    opts.update(kw)
    return create_loader(root, **opts)


def pixels(x, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Undo the normalisation: float64 NCHW tensor in 0..255 pixel units."""
    m = torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1) * 255
    s = torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1) * 255
    return x.double() * s + m


def run(loader):
    """All batches of one pass, as a list of dicts of CPU tensors."""
    out = []
    for b in loader:
        assert b.images.device == b.labels.device == loader.spec.device
        out.append({"images": b.images.cpu(), "labels": b.labels.cpu(), "indices": b.indices.clone(),
                    "valid": None if b.valid is None else b.valid.cpu(),
                    "teacher": None if b.teacher_images is None else b.teacher_images.cpu()})
    return out


def tag_of(path):
    """The B-channel tag a test image was written with (from its file name), or None."""
    m = re.search(r"_t(\d{3})\.", Path(path).name)
    return int(m.group(1)) if m else None


def reference_val_view(path, size):
    """Validation preprocessing written out with PIL: orient, shorter side to floor(size/0.875)
    (longer side rounded half up), centre crop (offset rounded half up); uint8 HWC."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        img = ImageOps.exif_transpose(im).convert("RGB")
    w, h = img.size
    short = int(size / 0.875)
    nw, nh = (short, int(h * short / w + 0.5)) if w <= h else (int(w * short / h + 0.5), short)
    img = img.resize((nw, nh), Image.BILINEAR)
    left, top = int((nw - size) / 2 + 0.5), int((nh - size) / 2 + 0.5)
    return np.asarray(img.crop((left, top, left + size, top + size)))


# ---------------------------------------------------------------------------------------------
def test_validation_over_two_shards_covers_every_image_once(image_folder, backend):
    index = build_index(image_folder, train=False)
    seen, padding = [], 0
    for shard in range(2):
        loader = make(image_folder, backend, train=False, shard_id=shard, num_shards=2)
        assert loader.classes == ["cat", "dog", "eel"]
        assert len(loader) == 3  # ceil(ceil(21 / 2) / 4)
        assert loader.num_samples == (11 if shard == 0 else 10)
        for b in run(loader):
            valid = torch.ones(len(b["labels"]), dtype=torch.bool) if b["valid"] is None else b["valid"]
            assert b["valid"] is None or not b["valid"].all()  # .valid only where there is padding
            padding += int((~valid).sum())
            for i, label, ok, img in zip(b["indices"].tolist(), b["labels"].tolist(), valid.tolist(), b["images"]):
                # labels follow the folders, and the pixels are those of that file (B channel = tag)
                assert index.classes[label] == Path(index.paths[i]).parent.name
                tag = tag_of(index.paths[i])
                if tag is not None and "cmyk" not in index.paths[i]:
                    assert abs(pixels(img[None])[0, 2].mean().item() - tag) < 4
                if ok:
                    seen.append(i)
    assert sorted(seen) == list(range(21)) and padding == 1


def test_order_fixed_by_seed_and_epoch(image_folder, backend):
    loader = make(image_folder, backend, train=True, seed=5)
    first = run(loader)
    assert loader.epoch == 1  # a completed pass moves on to the next epoch
    loader.set_epoch(0)
    again = run(loader)
    second = run(loader)  # epoch 1
    other_seed = run(make(image_folder, backend, train=True, seed=6))
    order = lambda bs: torch.cat([b["indices"] for b in bs]).tolist()  # noqa: E731
    assert order(first) == order(again)
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(first, again))  # same crops too
    assert order(second) != order(first) and sorted(order(second)) == sorted(order(first)) == list(range(21))
    assert order(other_seed) != order(first)
    # both backends read the same order (it comes from the shared shard plan)
    assert order(first) == order(run(make(image_folder, "torch", train=True, seed=5)))


@pytest.mark.parametrize("device", DEVICES)
def test_teacher_view_is_cut_from_the_same_window_and_flip(image_folder, backend, device):
    loader = make(image_folder, backend, train=True, batch_size=7, image_size=16, teacher_image_size=40,
                  teacher_mean=TEACHER_MEAN, teacher_std=TEACHER_STD, seed=1, device=device,
                  gpu_decode=device == "cuda")  # on CUDA: nvJPEG and the crops cut on the GPU
    student, teacher, indices = [], [], []
    for epoch in range(3):
        loader.set_epoch(epoch)
        for b in run(loader):
            assert b["images"].shape[1:] == (3, 16, 16) and b["teacher"].shape[1:] == (3, 40, 40)
            student.append(pixels(b["images"]))
            # bring the teacher view to the student's size with the same kind of filter
            teacher.append(F.interpolate(pixels(b["teacher"], TEACHER_MEAN, TEACHER_STD), size=(16, 16),
                                         mode="bilinear", antialias=True, align_corners=False))
            indices += b["indices"].tolist()
    student, teacher = torch.cat(student), torch.cat(teacher)
    index = build_index(image_folder, train=True)
    pos = torch.tensor([tag_of(index.paths[i]) is not None and "cmyk" not in index.paths[i]
                        and "rotated" not in index.paths[i] for i in indices])
    s, t = student[pos, :2], teacher[pos, :2]  # R encodes x, G encodes y
    same = (s - t).abs().mean(dim=(1, 2, 3))
    # the crops really vary: left edge (R of the first column) and flips differ between samples
    left_edge = s[:, 0, :, 0].mean(dim=1)
    right_edge = s[:, 0, :, -1].mean(dim=1)
    assert left_edge.std() > 20 and (right_edge < left_edge).any() and (right_edge > left_edge).any()
    # same window and flip: equal up to resampling; another sample's window is far off
    mismatched = (s - t.roll(1, dims=0)).abs().mean(dim=(1, 2, 3))
    assert same.max() < 2.0, same.max()
    assert mismatched.median() > 5 * same.max()


@pytest.mark.parametrize("device", DEVICES)
def test_normalisation_dtype_and_layout(image_folder, backend, device):
    index = build_index(image_folder, train=False)
    ref = np.stack([reference_val_view(p, 16) for p in index.paths])  # (N, 16, 16, 3) uint8
    ref = torch.from_numpy(ref).permute(0, 3, 1, 2).double()
    # CPU decoding on either device: this test is about the arithmetic after the decoder
    opts = dict(train=False, batch_size=21, device=device, gpu_decode=False)
    out = run(make(image_folder, backend, **opts))[0]
    assert out["images"].dtype == torch.float32 and out["images"].is_contiguous()
    assert out["labels"].dtype == torch.int64 and out["labels"].tolist() == index.labels.tolist()
    diff = (pixels(out["images"]) - ref).abs()
    if backend == "torch":  # the same PIL operations: equal up to fp32 rounding
        assert diff.max() < 1e-3
    else:  # the same libjpeg-turbo decode; DALI's resampling differs from PIL's by at most a level
        assert diff.max() <= 2.0 and diff.mean() < 0.25, (diff.max(), diff.mean())
    x32 = out["images"]
    # Half precision: the fp32 result rounded, give or take DALI's own fp16 arithmetic on the GPU;
    # the tolerance is one unit of the dtype at magnitude 1, far below one pixel level (~0.017).
    for dtype, eps in ((torch.float16, 2.0**-10), (torch.bfloat16, 2.0**-7)):
        for channels_last in (False, True):
            x = run(make(image_folder, backend, **opts, dtype=dtype, channels_last=channels_last))[0]["images"]
            assert x.dtype == dtype and x.shape == x32.shape
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            assert x.is_contiguous(memory_format=fmt)
            torch.testing.assert_close(x.float(), x32, rtol=eps, atol=eps)


@pytest.mark.parametrize("channels_last", [False, True])
def test_teacher_view_with_only_another_normalisation(image_folder, backend, channels_last):
    """Same size, other mean / std: the same pixels, normalised twice (never one on top of the other)."""
    for train in (True, False):
        b = run(make(image_folder, backend, train=train, batch_size=21, teacher_mean=TEACHER_MEAN,
                     teacher_std=TEACHER_STD, channels_last=channels_last))[0]
        assert b["teacher"].shape == b["images"].shape
        torch.testing.assert_close(pixels(b["teacher"], TEACHER_MEAN, TEACHER_STD), pixels(b["images"]),
                                   rtol=0, atol=1e-3)
        assert not torch.allclose(b["teacher"], b["images"])


def _valid_rows(b):
    return torch.ones(len(b["labels"]), dtype=torch.bool) if b["valid"] is None else b["valid"]


def _placeholder_pixels(x):
    """True where a row is the uniform grey placeholder (every pixel 128, within fp32 rounding)."""
    return (pixels(x) - 128.0).abs().amax(dim=(1, 2, 3)) < 1e-3


def test_corrupt_file_is_named_or_skipped_and_counted(corrupt_folder, backend, caplog):
    with pytest.raises(CorruptImageError, match=r"garbage\.jpg"):
        run(make(corrupt_folder, backend, train=False))
    loader = make(corrupt_folder, backend, train=True, skip_corrupt=True, batch_size=3)
    with caplog.at_level(logging.WARNING, logger="fastkd"):
        batches = run(loader)
    index = build_index(corrupt_folder, train=True)
    bad = {i for i, p in enumerate(index.paths) if Path(p).name in ("garbage.jpg", "truncated.jpg")}
    # the corrupt files keep their rows, flagged invalid and grey: every batch is full, and the
    # pass yields len(loader) batches (DDP ranks stay in step)
    assert len(batches) == len(loader) == 4 and [len(b["labels"]) for b in batches] == [3, 3, 3, 1]
    for b in batches:
        is_bad = torch.tensor([i in bad for i in b["indices"].tolist()])
        assert torch.equal(_valid_rows(b), ~is_bad)
        assert torch.equal(_placeholder_pixels(b["images"]), is_bad)
    got = torch.cat([b["indices"][_valid_rows(b)] for b in batches]).tolist()
    assert sorted(got) == sorted(set(range(len(index))) - bad)  # every good image exactly once
    assert loader.skipped == 2 and loader.skipped_in_epoch == 2
    assert sorted(Path(p).name for p in loader.skipped_files) == ["garbage.jpg", "truncated.jpg"]
    assert sorted(Path(p).name for p in loader.skipped_files_in_epoch) == ["garbage.jpg", "truncated.jpg"]
    assert "garbage.jpg" in caplog.text and "truncated.jpg" in caplog.text and "2 file(s) skipped" in caplog.text
    # later epochs skip the known-bad files again (not read, still counted per epoch), same shape
    again = run(loader)
    assert len(again) == 4 and loader.skipped == 2 and loader.skipped_in_epoch == 2
    assert sorted(torch.cat([b["indices"][_valid_rows(b)] for b in again]).tolist()) == sorted(got)


def test_skipped_files_keep_shards_equal_and_resume_counts(corrupt_folder, backend):
    """Two shards with corrupt files: both yield len(loader) batches; a resumed pass still counts
    the files skipped before the interruption."""
    lengths = []
    for shard in range(2):
        loader = make(corrupt_folder, backend, train=True, skip_corrupt=True, batch_size=2, seed=3,
                      shard_id=shard, num_shards=2)
        batches = run(loader)
        lengths.append((len(loader), len(batches)))
    assert lengths[0] == lengths[1] == (3, 3)  # 10 files -> 5 per shard -> 3 batches each
    # seed 0: one corrupt file is read before the interruption (after 3 batches), one after it
    opts = dict(train=True, skip_corrupt=True, batch_size=2, seed=0)
    full = make(corrupt_folder, backend, **opts)
    it = iter(full)
    for _ in range(3):
        next(it)
    assert full.skipped_in_epoch == 1
    state = json.loads(json.dumps(full.state_dict()))
    del it, full
    resumed = make(corrupt_folder, backend, **opts)
    resumed.load_state_dict(state)
    rest = run(resumed)
    assert len(rest) == len(resumed) - 3 == 2
    assert resumed.skipped_in_epoch == 2  # the one before the resume and the one after


def test_all_corrupt_batch_is_a_batch_of_placeholders(tmp_path, backend):
    """skip_corrupt and a batch whose every file is corrupt: no error (the normaliser used to get
    an empty batch), a full batch of invalid placeholder rows."""
    from PIL import Image

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    for j in range(2):
        (tmp_path / "a" / f"bad{j}.jpg").write_bytes(b"not a JPEG at all\n" * 10)
        Image.fromarray(np.full((20, 24, 3), 40 * j + 5, np.uint8)).save(tmp_path / "b" / f"{j}.jpg", quality=90)
    loader = make(tmp_path, backend, train=False, skip_corrupt=True, batch_size=2, teacher_image_size=20)
    batches = run(loader)
    assert len(batches) == len(loader) == 2
    first, second = batches
    assert first["valid"].tolist() == [False, False] and second["valid"] is None
    assert _placeholder_pixels(first["images"]).all() and _placeholder_pixels(first["teacher"]).all()
    assert first["images"].shape == (2, 3, 16, 16) and first["teacher"].shape == (2, 3, 20, 20)
    assert loader.skipped_in_epoch == 2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_checkpoint", [True, False])
def test_resume_mid_epoch(image_folder, backend, with_checkpoint, device):
    opts = dict(train=True, batch_size=4, teacher_image_size=24, seed=2, device=device, gpu_decode=device == "cuda")
    full_loader = make(image_folder, backend, **opts)
    full_loader.set_epoch(3)
    full = run(full_loader)

    loader = make(image_folder, backend, **opts)
    loader.set_epoch(3)
    it = iter(loader)
    for _ in range(2):
        next(it)
    state = json.loads(json.dumps(loader.state_dict()))  # it must survive a JSON / torch.save round trip
    assert (state["epoch"], state["batch"], state["position"]) == (3, 2, 8)
    if not with_checkpoint:
        state = {"epoch": state["epoch"], "batch": state["batch"]}
    del it, loader

    resumed = make(image_folder, backend, **opts)
    resumed.load_state_dict(state)
    resumed.set_epoch(3)  # the engine's usual call keeps a resume point of the same epoch
    rest = run(resumed)
    assert [b["indices"].tolist() for b in rest] == [b["indices"].tolist() for b in full[2:]]
    if with_checkpoint or backend == "torch":  # torch draws crops per sample; DALI restores its RNG state
        for a, b in zip(rest, full[2:]):
            assert torch.equal(a["images"], b["images"]) and torch.equal(a["teacher"], b["teacher"])
    assert resumed.epoch == 4


def test_resume_state_of_another_run_is_refused(image_folder, backend):
    state = make(image_folder, backend, train=True, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed=1"):
        make(image_folder, backend, train=True, seed=2).load_state_dict(state)


@pytest.mark.dali
def test_dali_and_torch_agree_on_validation_batches(photo_folder, image_folder):
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
    for root, size in ((photo_folder, 64), (image_folder, 24)):
        kw = dict(train=False, batch_size=8, image_size=size, teacher_image_size=size + 8)
        for a, b in zip(run(make(root, "dali", **kw)), run(make(root, "torch", **kw))):
            assert torch.equal(a["indices"], b["indices"]) and torch.equal(a["labels"], b["labels"])
            for key in ("images", "teacher"):
                diff = (pixels(a[key]) - pixels(b[key])).abs()
                # same libjpeg-turbo decode; the two resamplers differ by at most a level or two
                assert diff.max() <= 2.0 and diff.mean() < 0.25, (root.name, key, diff.max(), diff.mean())


def test_torch_workers_give_the_same_batches(image_folder):
    kw = dict(train=True, batch_size=5, teacher_image_size=20, seed=4)
    in_process = run(make(image_folder, "torch", num_threads=0, **kw))
    workers = run(make(image_folder, "torch", num_threads=2, **kw))
    assert len(in_process) == len(workers) == 5
    for a, b in zip(in_process, workers):
        assert torch.equal(a["indices"], b["indices"]) and torch.equal(a["images"], b["images"])
        assert torch.equal(a["teacher"], b["teacher"])


def test_close_stops_the_workers_and_the_loader_reads_on(image_folder):
    """A run ends by closing its loaders: their persistent worker processes stop then, not when the
    garbage collector gets to them (inside a later run, where each waited out a 5-second join)."""
    import multiprocessing

    before = set(multiprocessing.active_children())
    kw = dict(train=True, batch_size=5, teacher_image_size=20, seed=4)
    loader = make(image_folder, "torch", num_threads=2, **kw)
    first = run(loader)
    assert len(set(multiprocessing.active_children()) - before) == 2  # persistent: alive between passes
    loader.close()
    assert set(multiprocessing.active_children()) - before == set()
    loader.set_epoch(0)
    again = run(loader)  # new workers, the same batches
    assert len(again) == len(first) == 5
    for a, b in zip(first, again):
        assert torch.equal(a["indices"], b["indices"]) and torch.equal(a["images"], b["images"])
    with loader:
        pass
    assert set(multiprocessing.active_children()) - before == set()


@pytest.mark.parametrize("num_threads", [0, 2])
def test_iterating_leaves_the_global_torch_rng_alone(image_folder, num_threads):
    # The engine's checkpoints save torch's global generator (dropout, DPK masks): a loader pass
    # started at a resume point must not draw from it, or the resumed run diverges.
    loader = make(image_folder, "torch", train=True, batch_size=5, seed=4, num_threads=num_threads)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    for epoch in range(2):
        loader.set_epoch(epoch)
        next(iter(loader))
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_gpu_decode_orientation_matches_pil(orientation):
    from PIL import Image, ImageOps

    from fastkd.data.decode import orient

    img = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    pil = Image.fromarray(img)
    pil.info["exif"] = exif.tobytes()
    expected = np.asarray(ImageOps.exif_transpose(pil))
    got = orient(torch.from_numpy(img).permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(got, expected)


@pytest.mark.gpu
def test_gpu_decoding_agrees_with_cpu_decoding(image_folder, photo_folder, backend):
    """nvJPEG (torch: torchvision.io.decode_jpeg; DALI: "mixed") against the CPU path.

    The two JPEG decoders differ in IDCT rounding and chroma upsampling, so pixels may differ by
    a few levels on sharp colour edges (measured on an H100: mean <= 0.51, 99th percentile <= 3.4
    levels for torchvision's nvJPEG path; DALI's is within a level of its CPU decoder).
    """
    for root, size in ((photo_folder, 64), (image_folder, 24)):
        kw = dict(train=False, batch_size=8, image_size=size, teacher_image_size=size + 8)
        cpu = run(make(root, backend, device="cpu", **kw))
        gpu = run(make(root, backend, device="cuda", gpu_decode=True, **kw))
        for a, b in zip(cpu, gpu):
            assert torch.equal(a["indices"], b["indices"]) and torch.equal(a["labels"], b["labels"])
            for key in ("images", "teacher"):
                diff = (pixels(a[key]) - pixels(b[key])).abs()
                print(root.name, key, f"max {diff.max():.2f} p99 {diff.quantile(0.99):.2f} mean {diff.mean():.3f}")
                assert diff.mean() < 0.75 and diff.quantile(0.99) < 6.0, (root.name, key)


@pytest.mark.dali
def test_dali_next_epoch_pipeline_built_ahead_gives_the_same_batches(image_folder):
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
    kw = dict(train=True, batch_size=6, teacher_image_size=20, seed=7)
    loader = make(image_folder, "dali", **kw)
    run(loader)  # epoch 0; its end starts building epoch 1's pipeline in the background
    assert loader._ahead is not None and loader._ahead[0] == 1
    ahead = run(loader)
    fresh_loader = make(image_folder, "dali", **kw)
    fresh_loader.set_epoch(1)
    fresh = run(fresh_loader)
    assert len(ahead) == len(fresh) == 4
    for a, b in zip(ahead, fresh):
        assert torch.equal(a["indices"], b["indices"])
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["teacher"], b["teacher"])
    loader.set_epoch(5)  # not the epoch built ahead: it is dropped, epoch 5 is built as usual
    assert sorted(torch.cat([b["indices"] for b in run(loader)]).tolist()) == list(range(21))


def test_closing_a_dali_loader_drops_its_pipelines_and_it_reads_on(image_folder):
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
    kw = dict(train=True, batch_size=6, teacher_image_size=20, seed=7)
    loader = make(image_folder, "dali", **kw)
    first = run(loader)  # its end builds epoch 1's pipeline ahead, in a builder thread
    assert loader._ahead is not None and loader._builder is not None
    loader.close()
    assert loader._ahead is None and loader._builder is None and loader._active is None
    loader.set_epoch(0)
    again = run(loader)
    assert len(again) == len(first) == 4
    for a, b in zip(first, again):
        assert torch.equal(a["indices"], b["indices"]) and torch.equal(a["images"], b["images"])


def test_every_pil_mode_decodes_as_dali_does(modes_folder, backend):
    """16-bit grey PNG / TIFF, float TIFF, grey + alpha, palette with transparency, bilevel, RGBA and
    16-bit RGB: the same 8-bit RGB pixels from both backends (PIL's own convert("RGB") turned the
    16-bit and float images white or black)."""
    root, expected = modes_folder
    # 16 x 16 files at image_size 14: the validation resize (to 16) is the identity, then a centre crop
    out = run(make(root, backend, train=False, batch_size=len(expected), image_size=14))[0]
    got = pixels(out["images"]).permute(0, 2, 3, 1).numpy()
    index = build_index(root, train=False)
    for k, i in enumerate(out["indices"].tolist()):
        path = index.paths[i]
        want = expected[Path(path).name][1:15, 1:15].astype(np.float64)
        # exact up to fp32 normalisation, but PIL reads a 16-bit RGB PNG by its high byte (one level)
        tol = 1.01 if "rgb16" in path else 1e-3
        assert np.abs(got[k] - want).max() <= tol, (Path(path).name, np.abs(got[k] - want).max())


def _children(pid):
    """Pids of the live (not zombie) child processes of ``pid``, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_bytes().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] not in (b"Z", b"X"):
            found.append(int(entry.name))
    return found


def _alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in (b"Z", b"X")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
@pytest.mark.slow
def test_torch_workers_exit_when_the_training_process_is_killed(image_folder):
    """SIGKILL the process that iterates a loader with 2 workers: the workers are gone within
    about a second (PyTorch's own check waits 5 s, and only while a worker is idle)."""
    import signal
    import subprocess
    import sys
    import time

    script = (
        "import sys, time\n"
        "from fastkd.data import create_loader\n"
        f"loader = create_loader({str(image_folder)!r}, train=True, batch_size=2, image_size=16, backend='torch',\n"
        "                       device='cpu', num_threads=2)\n"
        "it = iter(loader); next(it)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"ready", proc.stderr.read().decode()[-2000:]
        workers = _children(proc.pid)
        assert len(workers) >= 2, workers
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 1.0
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.02)
    left = [w for w in workers if _alive(w)]
    for w in left:  # do not leave them behind if the test fails
        os.kill(w, signal.SIGKILL)
    assert not left, f"workers {left} outlived the killed training process by more than 1 s"


def _decoded(path):
    from fastkd.data.decode import open_rgb

    return np.asarray(open_rgb(path)).astype(np.float64)  # (H, W, 3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("train", [True, False])
def test_cifar_augmentation_pads_crops_and_flips(cifar_folder, backend, train, device):
    """augment="cifar": validation is the image itself (no resize); training is a 32 x 32 window
    of the image zero-padded by 4, flipped half the time, keyed on (seed, epoch, position)."""
    from fastkd.data.decode import CIFAR_PAD, cifar_crop

    index = build_index(cifar_folder, train=train)
    loader = make(cifar_folder, backend, train=train, batch_size=4, image_size=32, augment="cifar", seed=3,
                  teacher_image_size=48, device=device, gpu_decode=device == "cuda")
    loader.set_epoch(2)
    batches = run(loader)
    images = torch.cat([b["images"] for b in batches])
    teacher = torch.cat([b["teacher"] for b in batches])
    order = torch.cat([b["indices"] for b in batches]).tolist()
    flips, offsets = 0, set()
    for key, (i, x) in enumerate(zip(order, pixels(images).permute(0, 2, 3, 1).numpy())):
        want = _decoded(index.paths[i])
        if train:
            top, left, flip = cifar_crop(3, 2, key)  # one shard: the key is the position in the epoch
            padded = np.pad(want, ((CIFAR_PAD, CIFAR_PAD), (CIFAR_PAD, CIFAR_PAD), (0, 0)))
            want = padded[top:top + 32, left:left + 32]
            want = want[:, ::-1] if flip else want
            flips += flip
            offsets.add((top, left))
        # torch: the same PIL decode, exact up to fp32; DALI: libjpeg-turbo, within a level; nvJPEG
        # (CUDA) rounds differently, by a few levels, while a crop one pixel off is 8 levels off
        diff = np.abs(x - want)
        if device == "cuda":
            assert diff.mean() < 1.0 and np.quantile(diff, 0.99) < 6.0, (key, diff.mean())
        else:
            assert diff.max() <= (1e-3 if backend == "torch" else 1.01), (key, diff.max())
    if train:
        assert 0 < flips < len(order) and len(offsets) > 5  # the draws really vary
    # the teacher view is the student's crop, resized (bilinear; PIL / DALI round to 8 bits)
    big = F.interpolate(pixels(images), size=(48, 48), mode="bilinear", antialias=True, align_corners=False)
    diff = (big.cpu() - pixels(teacher).cpu()).abs()
    assert diff.max() <= 1.5 and diff.mean() < 0.5, (diff.max(), diff.mean())


def test_cifar_augmentation_resumes_exactly_and_rejects_unknown_names(cifar_folder, backend):
    opts = dict(train=True, batch_size=3, image_size=32, augment="cifar", seed=1)
    full = run(make(cifar_folder, backend, **opts))
    resumed = make(cifar_folder, backend, **opts)
    resumed.load_state_dict({"epoch": 0, "batch": 2})  # no backend state: the crops are keyed per sample
    rest = run(resumed)
    assert len(rest) == len(full) - 2
    for a, b in zip(rest, full[2:]):
        assert torch.equal(a["indices"], b["indices"]) and torch.equal(a["images"], b["images"])
    with pytest.raises(ValueError, match="augment must be one of"):
        make(cifar_folder, backend, train=True, augment="autoaugment")


@pytest.mark.dali
def test_cifar_training_crops_agree_between_backends(cifar_folder):
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
    opts = dict(train=True, batch_size=5, image_size=32, augment="cifar", seed=9)
    for a, b in zip(run(make(cifar_folder, "dali", **opts)), run(make(cifar_folder, "torch", **opts))):
        assert torch.equal(a["indices"], b["indices"])
        assert (pixels(a["images"]) - pixels(b["images"])).abs().max() <= 1.01


@pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")
@pytest.mark.parametrize("augment", ["imagenet", "cifar"])
def test_gpu_decode_path_runs_on_cpu_tensors(cifar_folder, corrupt_folder, augment):
    """The torch backend's GPU-decoding path (raw bytes -> decode_jpeg -> crops as tensor ops ->
    Normalizer on NCHW), run here with CPU tensors: it cuts the same crops as the PIL path, and an
    all-corrupt batch with skip_corrupt gives placeholders instead of an empty batch that the
    normaliser cannot take (issue 11, item 16)."""
    from fastkd.data.torch_loader import TorchLoader

    opts = dict(train=True, batch_size=4, image_size=32, augment=augment, seed=3, teacher_image_size=40)
    pil = make(cifar_folder, "torch", **opts)
    tensor_path = TorchLoader(pil.index, pil.spec, gpu_decode=True)  # create_loader wants CUDA for this
    for a, b in zip(run(pil), run(tensor_path)):
        assert torch.equal(a["indices"], b["indices"])
        for key in ("images", "teacher"):
            diff = (pixels(a[key]) - pixels(b[key])).abs()
            # cifar at its own size: pure pixel moves, exact; imagenet: PIL vs torch resampling
            assert diff.max() <= (1e-3 if augment == "cifar" and key == "images" else 4.0), (key, diff.max())
            assert diff.mean() < 0.75
    bad = make(corrupt_folder, "torch", train=False, batch_size=1, image_size=16, skip_corrupt=True)
    batches = run(TorchLoader(bad.index, bad.spec, gpu_decode=True))  # batch size 1: all-corrupt batches
    assert len(batches) == 10 and sum(int((~_valid_rows(b)).sum()) for b in batches) == 2
    for b in batches:
        assert torch.equal(_placeholder_pixels(b["images"]), ~_valid_rows(b))


@pytest.mark.dali
def test_dali_names_a_file_only_pil_decodes(tmp_path):
    """A format PIL reads but DALI refuses (a bilevel TIFF): a clear error naming the file and the
    way out, never a silent difference between the backends."""
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
    from PIL import Image

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.fromarray(np.full((12, 12, 3), 90, np.uint8)).save(tmp_path / name / "ok.jpg", quality=90)
    Image.fromarray(np.eye(12, dtype=np.uint8) * 255).convert("1").save(tmp_path / "a" / "bits.tif")
    with pytest.raises(RuntimeError, match="use backend='torch'") as err:
        run(make(tmp_path, "dali", train=False, batch_size=3, image_size=8))
    assert "bits.tif" in str(err.value)
    # the torch backend reads it
    assert len(run(make(tmp_path, "torch", train=False, batch_size=3, image_size=8))[0]["labels"]) == 3


def test_cifar_crop_draws_are_uniform_and_keyed():
    from fastkd.data.decode import cifar_crop, cifar_crops

    tops, lefts, flips = cifar_crops(0, 1, np.arange(18000))
    for draws in (tops, lefts):
        counts = np.bincount(draws, minlength=9)
        assert len(counts) == 9 and np.abs(counts / 2000 - 1).max() < 0.1  # offsets 0..8, uniform
    assert abs(flips.mean() - 0.5) < 0.02 and abs(np.corrcoef(tops, lefts)[0, 1]) < 0.05
    assert cifar_crop(0, 1, 17) == (tops[17], lefts[17], flips[17])  # one key = the vector's entry
    other_epoch, other_seed = cifar_crops(0, 2, np.arange(18000)), cifar_crops(1, 1, np.arange(18000))
    assert (other_epoch[0] != tops).mean() > 0.8 and (other_seed[1] != lefts).mean() > 0.8
