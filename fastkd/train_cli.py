"""``fastkd train``: flags (generated from :class:`fastkd.engine.config.TrainConfig`) -> config ->
:func:`fastkd.recipes.train` (the engine, with the teacher-output cache when ``--teacher-cache`` is given).

Single process::

    fastkd train --data /imagenet --teacher timm:resnet50 --teacher-checkpoint r50.pth \\
        --student timm:resnet18 --method kd --amp bf16 --channels-last --output runs/r50-r18

DDP (one process per GPU, also multi-node)::

    torchrun --nproc_per_node 8 -m fastkd train --config my.yaml
"""
from __future__ import annotations

import argparse
import logging

from .engine import config as C

logger = logging.getLogger("fastkd")


def preset_line(name: str) -> str:
    """One line per preset, from its values: ``NAME  teacher -> student, method, schedule ...; device: ...``
    (what the preset needs: a CUDA GPU for its teacher CUDA graph, else a CPU will do)."""
    v = {**{k: f.default for k, f in C.FIELDS.items() if not callable(f.default)}, **C.load_yaml(name)}
    what = f"{v.get('teacher') or '(no teacher)'} -> {v.get('student')}, --method {v['method']}"
    if v.get("tolerant_eta") is not None:
        what = f"{v.get('student')}: teacher training, tolerant eta {v['tolerant_eta']:g}"
    lr = f"lr {v['lr']:g}" if v.get("lr") is not None else f"lr_base {v.get('lr_base') or 0.1:g}"
    sched = v["sched"] + (f" at {'/'.join(f'{m:g}' for m in v['decay_milestones'])}" if v.get("decay_milestones")
                          else "")
    device = ("device: CUDA GPU (teacher_cuda_graph; --no-teacher-cuda-graph on a CPU)" if v.get("teacher_cuda_graph")
              else "device: CPU or CUDA GPU")
    return (f"{name:<24} {what}; {v['epochs']} epochs, {v['image_size']} px {v['augment']} augmentation, "
            f"batch {v['batch_size']}, {v['opt']} {lr} {sched}, wd {v['weight_decay']:g}; {device}")


class _ListPresets(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="list the shipped presets (--config NAME), one line each, and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        for name in C.presets():
            print(preset_line(name))
        parser.exit(0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--list-presets", action=_ListPresets)
    C.add_arguments(parser)
    # fastkd.cli's unknown-flag hint: --learning-rate -> --lr, --bs -> --batch-size, ...
    parser.flag_aliases = {C.flag(k): C.flag(v) for k, v in C.ALIASES.items()}


def main(args: argparse.Namespace) -> int:
    """Errors (a bad config, path, data set, model name or checkpoint) propagate to
    :func:`fastkd.cli.main`, which reports them on one line with exit code 2."""
    cfg = C.from_args(args)
    from .recipes import train

    result = train(cfg)
    final = result.get("final")
    if final is not None:
        loader = f" ({final['loader']} loader, {final['decoder']})" if "loader" in final else ""
        logger.info("fastkd train: done; best top-1 %.2f%%%s, outputs in %s", result["best_top1"], loader,
                    result["output"])
    return 0
