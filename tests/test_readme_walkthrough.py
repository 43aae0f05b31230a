"""The README's "ResNet-50 -> ResNet-18 on ImageNet with a timm teacher" commands, run at tiny size.

The commands are read from README.md (between the timm-walkthrough markers), so they cannot drift
from what is tested. Only the sizes change: the data folder, the models (timm's tiny
``test_resnet``; the teacher ``test_resnet.r160_in1k`` from a hub cache in a temporary HF_HOME),
epochs, batch size, warm-up and output; CPU flags are added. The torchrun commands run as a plain
``fastkd train`` (two-process runs are tested in tests/engine/test_ddp.py).

The teacher's weights are random, so the data is labelled by the teacher itself (each validation
image goes to the folder of the class the teacher predicts on its validation view): the teacher
check passes only if the teacher gets its own preprocessing and its logits are mapped to the right
class folders.
"""
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from fastkd import cli

README = Path(__file__).resolve().parent.parent / "README.md"
SIZE = 32
TINY = {"--student": "timm:test_resnet", "--teacher": "timm:test_resnet.r160_in1k", "--epochs": "1",
        "--batch-size": "64", "--warmup-epochs": "0"}
CPU = ["--image-size", str(SIZE), "--device", "cpu", "--workers", "0", "--data-backend", "torch"]


def walkthrough_commands() -> list[list[str]]:
    text = README.read_text()
    block = re.search(r"<!-- timm-walkthrough -->\n```bash\n(.*?)```\n<!-- /timm-walkthrough -->", text, re.S)
    assert block, "README.md has no timm-walkthrough block"
    joined = block.group(1).replace("\\\n", " ")
    return [shlex.split(line) for line in joined.splitlines() if line.strip() and not line.startswith("#")]


def fastkd_args(cmd: list[str]) -> list[str]:
    """``fastkd ARGS`` / ``torchrun ... -m fastkd ARGS`` -> ARGS."""
    if cmd[0] == "fastkd":
        return cmd[1:]
    assert cmd[0] == "torchrun"
    i = cmd.index("-m")
    assert cmd[i + 1] == "fastkd"
    return cmd[i + 2:]


def tiny(args: list[str], data: Path, out: Path) -> list[str]:
    out_args, i = [], 0
    while i < len(args):
        a = args[i]
        if a in TINY or a in ("--data", "--output"):
            value = {"--data": str(data), "--output": str(out)}.get(a, TINY.get(a))
            out_args += [a, value]
            i += 2
        else:
            out_args.append(a)
            i += 1
    return out_args + CPU


def _pool(root: Path, n: int, seed: int) -> list[Path]:
    """``n`` real JPEG files of varied content (noise, gradients and blocks of colour)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    paths = []
    for i in range(n):
        h, w = rng.integers(SIZE, 2 * SIZE, size=2)
        base = rng.integers(0, 256, size=(1, 1, 3))
        img = np.clip(base + rng.normal(0, rng.uniform(5, 90), size=(h, w, 3)), 0, 255).astype(np.uint8)
        p = root / f"img{i:05d}.jpg"
        Image.fromarray(img).save(p, quality=90)
        paths.append(p)
    return paths


def _teacher_predictions(folder: Path, paths: list[Path]) -> list[int]:
    """The ImageNet class the hub teacher predicts for each file, on fastkd's validation view with
    the teacher's own normalisation (its pretrained config: mean = std = 0.5)."""
    from fastkd.data import create_loader
    from fastkd.models.hub import load_pretrained

    teacher, info = load_pretrained(TINY["--teacher"])
    teacher.eval()
    loader = create_loader(folder, train=False, batch_size=64, image_size=SIZE, backend="torch", num_threads=0,
                           device="cpu", mean=info.mean, std=info.std)
    preds = {}
    with torch.inference_mode():
        for batch in loader:
            for idx, p in zip(batch.indices.tolist(), teacher(batch.images).argmax(1).tolist()):
                preds[idx] = p
    order = [Path(p).name for p in loader.index.paths]
    by_name = {order[i]: c for i, c in preds.items()}
    return [by_name[p.name] for p in paths]


def _write(split_dir: Path, wnid: str, src: Path, name: str) -> None:
    d = split_dir / wnid
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(src.read_bytes())


@pytest.fixture
def labelled(hub_home, tmp_path):
    """A pool of JPEGs, with the teacher's prediction for each."""
    from fastkd.models.classes import teacher_class_names

    pool = tmp_path / "pool"
    paths = _pool(pool / "x", 120, seed=0)
    preds = _teacher_predictions(pool, paths)
    return {"paths": paths, "wnids": [teacher_class_names("imagenet", 1000)[c] for c in preds]}


def test_the_walkthrough_commands_are_the_ones_tested():
    cmds = walkthrough_commands()
    assert [c[0] for c in cmds] == ["torchrun", "torchrun", "fastkd"]
    one_node, multi_node, subset = (fastkd_args(c) for c in cmds)
    assert one_node == multi_node  # the multi-node form runs the same job
    assert "--nnodes" in cmds[1] and "--rdzv-endpoint" in cmds[1]
    assert one_node[0] == subset[0] == "train"
    assert "--teacher-pretrained" in one_node and "--teacher-classes" in subset


@pytest.mark.slow
def test_subset_recipe_runs(labelled, tmp_path):
    """Imagenette-style WordNet-id folders from the 1000-class hub teacher (--teacher-classes imagenet)."""
    data = tmp_path / "subset"
    for p, wnid in zip(labelled["paths"], labelled["wnids"]):
        _write(data / "train", wnid, p, p.name)
        _write(data / "val", wnid, p, p.name)
    classes = sorted(set(labelled["wnids"]))
    assert len(classes) >= 3, classes  # a real subset, not one class
    subset = fastkd_args(walkthrough_commands()[2])
    assert cli.main(tiny(subset, data, tmp_path / "run")) == 0
    import json

    final = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    # The teacher labelled the validation images itself: mapped to the data's folders, it is right on every one.
    assert final["teacher_top1"] == 100.0


@pytest.mark.slow
def test_imagenet_command_runs(labelled, tmp_path, caplog):
    """The one-node ImageNet command on 1000 WordNet-id folders (its multi-node form is the same job)."""
    from fastkd.models.classes import teacher_class_names

    data = tmp_path / "imagenet"
    wnids = teacher_class_names("imagenet", 1000)
    filler = labelled["paths"][0]
    for k, wnid in enumerate(wnids):  # every class once in each split
        _write(data / "train", wnid, filler, f"f{k}.jpg")
        _write(data / "val", wnid, filler, f"f{k}.jpg")
    for p, wnid in zip(labelled["paths"], labelled["wnids"]):  # and validation images the teacher knows
        _write(data / "val", wnid, p, p.name)
    one_node = fastkd_args(walkthrough_commands()[0])
    import logging

    with caplog.at_level(logging.INFO, logger="fastkd"):
        assert cli.main(tiny(one_node, data, tmp_path / "run")) == 0
    n_val = 1000 + len(labelled["paths"])
    assert "teacher check: timm:test_resnet.r160_in1k scores" in caplog.text
    assert f"on {n_val} validation images (18 batch(es), torch loader" in caplog.text


@pytest.mark.slow
def test_subset_with_the_wrong_normalisation_is_caught(labelled, tmp_path, caplog):
    """The same subset with the student's (ImageNet) normalisation forced on the teacher: its
    predictions change (what the check is there to notice)."""
    data = tmp_path / "subset"
    for p, wnid in zip(labelled["paths"], labelled["wnids"]):
        _write(data / "train", wnid, p, p.name)
        _write(data / "val", wnid, p, p.name)
    subset = fastkd_args(walkthrough_commands()[2])
    args = tiny(subset, data, tmp_path / "run") + ["--teacher-mean", "0.485", "0.456", "0.406", "--teacher-std",
                                                   "0.229", "0.224", "0.225"]
    assert cli.main(args) == 0
    import json

    final = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["teacher_top1"] < 100.0
