"""The ``fastkd`` command: a thin dispatcher.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``main(args) -> int``;
only the module of the subcommand being run is imported.

One error path for every subcommand (:mod:`fastkd.errors`): a user error (a bad flag or value, a
missing file, an impossible combination) prints ``fastkd COMMAND: error: MESSAGE`` on one line and
exits with code 2; ``--debug`` (anywhere on the line) shows the traceback instead. An unknown flag
gives one line with the closest known flag and a hint, not the whole usage.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import sys

from .errors import USER_ERRORS

# name -> (module, one-line help). ``bench`` and ``study`` take a second word.
COMMANDS = {
    "check-env": ("fastkd.envinfo", "print what this machine can use (GPU, Triton, DALI, apex, timm) and exit"),
    "train": ("fastkd.train_cli", "distil (or train) a student: timm-style flags or --config FILE.yaml"),
    "demo": ("fastkd.demo", "build a small real-image data set, train two teachers, distil students, print a table"),
    "analyze": ("fastkd.analysis.cli", "dark-knowledge metrics of one or more teachers (JSON, CSV, Markdown, plots)"),
    "bench": (None, "benchmarks on this machine: 'fastkd bench kernels', 'fastkd bench data' or 'fastkd bench linear'"),
    "study": (None, "reproducible studies: 'fastkd study capacity'"),
    "cache": (None, "teacher-output cache: 'fastkd cache build' (then fastkd train --teacher-cache DIR), 'fastkd cache verify'"),
}
SUBCOMMANDS = {
    ("bench", "kernels"): ("fastkd.bench.kernels", "fused KD kernels vs eager / torch.compile / Liger on your GPU"),
    ("bench", "data"): ("fastkd.bench.data", "images/s of each data backend on a JPEG folder"),
    ("bench", "linear"): ("fastkd.bench.linear", "peak memory and time of a distillation loss on an LM head: "
                          "fused linear vs full logits / torch.compile chunked / Liger"),
    ("study", "capacity"): ("fastkd.analysis.study", "capacity-mismatch study: CNN teachers on MNIST digit pairs, ATS chosen on validation, verdicts"),
    ("cache", "build"): ("fastkd.cache.cli", "store a teacher's logits for the exact views 'fastkd train' will draw"),
    ("cache", "verify"): ("fastkd.cache.verify", "re-hash a cache's epoch files (and with --data its images) against its build"),
}


class _Parser(argparse.ArgumentParser):
    """argparse with a short error: one line naming the problem (with a close flag when one exists)
    and a hint, instead of the whole usage (45 lines for ``fastkd train``)."""

    def error(self, message: str):
        if message.startswith("unrecognized arguments:"):
            known = [o for a in self._actions for o in a.option_strings]
            hints = []
            for arg in message.split(":", 1)[1].split():
                if arg.startswith("-"):
                    key = arg.split("=", 1)[0]
                    alias = getattr(self, "flag_aliases", {}).get(key)
                    close = [alias] if alias else difflib.get_close_matches(key, known, n=1)
                    if close:
                        hints.append(f"{key} -> {close[0]}?")
            if hints:
                message += f" (did you mean: {', '.join(hints)})"
        raise _ParseError(f"{self.prog}: error: {message}\nRun '{self.prog} --help' for the options.")


class _ParseError(Exception):
    pass


def _top_parser() -> argparse.ArgumentParser:
    lines = [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += [f"  {a} {b:<{9 - len(a)}} {help_}" for (a, b), (_, help_) in SUBCOMMANDS.items()]
    return _Parser(
        prog="fastkd",
        description="fastkd: fast knowledge distillation for PyTorch.",
        epilog="commands:\n" + "\n".join(lines) + "\n\nRun 'fastkd COMMAND --help' for a command's options."
               "\nAdd --debug to any command to see the traceback of an error.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _version() -> str:
    """The version without importing the package's torch-based modules (``fastkd --version`` is instant)."""
    from . import __version__

    return __version__


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split("\n")).strip()
    return text or type(exc).__name__


def main(argv=None) -> int:
    """Run ``fastkd ARGS``; returns the exit code: 0 done, 2 a user error (one line on stderr),
    1 an unexpected error (a bug: its traceback). ``--debug`` anywhere shows every traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    top = _top_parser()
    top.add_argument("--version", action="store_true", help="print the version and exit")
    top.add_argument("--debug", action="store_true", help="show the traceback of an error (any command)")
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0
    if argv[0] == "--version":
        print(f"fastkd {_version()}")
        return 0
    name, rest = argv[0], argv[1:]
    prog = f"fastkd {name}"
    try:
        if name not in COMMANDS:
            close = difflib.get_close_matches(name, COMMANDS, n=1)
            raise _ParseError(f"fastkd: error: unknown command {name!r}"
                              + (f" (did you mean {close[0]!r}?)" if close else "")
                              + f"; choose from {', '.join(COMMANDS)}")
        module, help_ = COMMANDS[name]
        if module is None:
            choices = [b for (a, b) in SUBCOMMANDS if a == name]
            if not rest:  # an ordinary mistake: one line on stderr, like every other
                raise _ParseError(f"fastkd {name}: error: give a target: {', '.join(choices)} "
                                  f"(e.g. 'fastkd {name} {choices[0]} --help')")
            if rest[0] in ("-h", "--help"):
                print(f"usage: fastkd {name} {{{','.join(choices)}}} [options]\n\n{help_}")
                return 0
            if (name, rest[0]) not in SUBCOMMANDS:
                raise _ParseError(f"fastkd {name}: error: unknown target {rest[0]!r}; choose from {', '.join(choices)}")
            module, help_ = SUBCOMMANDS[(name, rest[0])]
            prog, rest = f"fastkd {name} {rest[0]}", rest[1:]
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        mod = importlib.import_module(module)
        parser = _Parser(prog=prog, description=help_, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        mod.add_arguments(parser)
        args = parser.parse_args(rest)
        return int(mod.main(args) or 0)
    except _ParseError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except SystemExit as exc:
        # argparse's --help (code 0) or a subcommand's SystemExit("message"): the same one-line path.
        if exc.code is None or isinstance(exc.code, int):
            return int(exc.code or 0)
        if debug:
            raise
        _report(prog, str(exc.code))
        return 2
    except BrokenPipeError:
        # stdout closed early (``fastkd train --list-presets | head``): not an error; keep the
        # interpreter's final flush of stdout quiet.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        if debug:
            raise
        _report(prog, "interrupted")
        return 130
    except USER_ERRORS as exc:
        if debug:
            raise
        _report(prog, _one_line(exc))
        return 2


def _report(prog: str, message: str) -> None:
    prefix = f"{prog}: "
    message = message[len(prefix):] if message.startswith(prefix) else message
    log = logging.getLogger("fastkd")
    if log.hasHandlers():
        log.error("%s: error: %s", prog, message)
    else:  # logging not configured (an error before the subcommand started)
        print(f"{prog}: error: {message}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
