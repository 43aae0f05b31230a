"""Run ``fastkd`` and kill it at an exact point: ``python kill_run.py step:N|save:N|stop:N fastkd-args...``.

``step:N`` SIGKILLs the process right after optimizer step N (the global step); ``save:N`` inside
the N-th checkpoint write of this process, with only half of the temporary file on disk (a torn
write); ``stop:N`` SIGSTOPs it after step N (a hung DDP rank); ``node:N`` (run under ``torchrun``)
SIGKILLs the process group of its torchrun agent and then itself after step N (a node lost
mid-epoch); ``stopnode:N`` SIGSTOPs them instead (a frozen node). The faults are installed here by
wrapping functions the engine already calls (``Trainer._step``, the rename that publishes a
checkpoint); the library has no fault hooks and reads no test variable.
"""
import functools
import os
import signal
import sys

from fastkd import cli
from fastkd.engine import checkpoint as ckpt
from fastkd.engine.trainer import Trainer


def _after_step(n: int, sig: int, *, node: bool = False) -> None:
    step = Trainer._step

    @functools.wraps(step)
    def wrapped(self, *args, **kwargs):
        loss = step(self, *args, **kwargs)
        if self.global_step + 1 == n:  # the loop counts the step right after _step returns
            if node:  # torchrun starts each worker in a session of its own:
                os.killpg(os.getpgid(os.getppid()), sig)  # the agent's process group, then this process
            os.kill(os.getpid(), sig)
        return loss

    Trainer._step = wrapped


def _in_save(n: int) -> None:
    save_atomic, replace, saves = ckpt.save_atomic, os.replace, [0]

    def torn_replace(src, dst, *args, **kwargs):  # save_atomic's rename of its complete temp file
        with open(src, "r+b") as fh:
            fh.truncate(os.path.getsize(src) // 2)
        os.kill(os.getpid(), signal.SIGKILL)

    @functools.wraps(save_atomic)
    def counted_save(obj, path):
        saves[0] += 1
        if saves[0] != n:
            return save_atomic(obj, path)
        ckpt.os.replace = torn_replace  # this process only: it exists to be killed
        try:
            return save_atomic(obj, path)
        finally:
            ckpt.os.replace = replace

    ckpt.save_atomic = counted_save


def main() -> int:
    spec, argv = sys.argv[1], sys.argv[2:]
    kind, _, n = spec.partition(":")
    if kind not in ("step", "save", "stop", "node", "stopnode") or not n.isdigit():
        raise SystemExit(f"kill_run.py: expected step:N, save:N, stop:N, node:N or stopnode:N, got {spec!r}")
    n = int(n)
    if kind == "save":
        _in_save(n)
    else:
        _after_step(n, signal.SIGKILL if kind in ("step", "node") else signal.SIGSTOP,
                    node=kind in ("node", "stopnode"))
    return cli.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
