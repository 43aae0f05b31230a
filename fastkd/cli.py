"""The ``fastkd`` command: a thin dispatcher.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``main(args) -> int``;
only the module of the subcommand being run is imported.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> (module, one-line help). ``bench`` and ``study`` take a second word.
COMMANDS = {
    "check-env": ("fastkd.envinfo", "print what this machine can use (GPU, Triton, DALI, apex, timm) and exit"),
    "train": ("fastkd.engine.cli", "distil (or train) a student: timm-style flags or --config FILE.yaml"),
    "demo": ("fastkd.engine.demo", "build a small real-image data set, train two teachers, distil students, print a table"),
    "analyze": ("fastkd.analysis.cli", "dark-knowledge metrics of one or more teachers (JSON, CSV, Markdown, plots)"),
    "bench": (None, "benchmarks on this machine: 'fastkd bench kernels' or 'fastkd bench data'"),
    "study": (None, "reproducible studies: 'fastkd study capacity'"),
    "cache": (None, "teacher-output cache: 'fastkd cache build' (then fastkd train --teacher-cache DIR)"),
}
SUBCOMMANDS = {
    ("bench", "kernels"): ("fastkd.bench.kernels", "fused KD kernels vs eager / torch.compile / Liger on your GPU"),
    ("bench", "data"): ("fastkd.bench.data", "images/s of each data backend on a JPEG folder"),
    ("study", "capacity"): ("fastkd.analysis.study", "capacity-mismatch mini-study on a synthetic hierarchical data set"),
    ("cache", "build"): ("fastkd.cache.cli", "store a teacher's logits for the exact views 'fastkd train' will draw"),
}


def _top_parser() -> argparse.ArgumentParser:
    lines = [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += [f"  {a} {b:<{9 - len(a)}} {help_}" for (a, b), (_, help_) in SUBCOMMANDS.items()]
    return argparse.ArgumentParser(
        prog="fastkd",
        description="fastkd: fast knowledge distillation for PyTorch.",
        epilog="commands:\n" + "\n".join(lines) + "\n\nRun 'fastkd COMMAND --help' for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    top.add_argument("--version", action="store_true", help="print the version and exit")
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0
    if argv[0] == "--version":
        from . import __version__

        print(f"fastkd {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        top.error(f"unknown command {name!r}; choose from {', '.join(COMMANDS)}")
    module, help_ = COMMANDS[name]
    prog = f"fastkd {name}"
    if module is None:
        choices = [b for (a, b) in SUBCOMMANDS if a == name]
        if not rest or rest[0] in ("-h", "--help"):
            print(f"usage: fastkd {name} {{{','.join(choices)}}} [options]\n\n{help_}")
            return 0 if rest else 2
        if (name, rest[0]) not in SUBCOMMANDS:
            top.error(f"unknown '{name}' target {rest[0]!r}; choose from {', '.join(choices)}")
        module, help_ = SUBCOMMANDS[(name, rest[0])]
        prog, rest = f"fastkd {name} {rest[0]}", rest[1:]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    mod = importlib.import_module(module)
    parser = argparse.ArgumentParser(prog=prog, description=help_,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    mod.add_arguments(parser)
    args = parser.parse_args(rest)
    return int(mod.main(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
