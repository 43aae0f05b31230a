"""Run ``fastkd`` with a fault-injection hook: ``python kill_run.py step:N|save:N|stop:N fastkd-args...``.

``step:N`` SIGKILLs the process right after optimizer step N; ``save:N`` inside the N-th
checkpoint write, with only half of the temporary file on disk (a torn write); ``stop:N``
SIGSTOPs it after step N (a hung DDP rank); ``node:N`` (run under ``torchrun``) SIGKILLs the
process group of its torchrun agent and then itself after step N (a node lost mid-epoch);
``stopnode:N`` SIGSTOPs them instead (a frozen node). The hooks go
through :func:`fastkd.engine.checkpoint.add_fault_hook`; the library reads no test variable.
"""
import os
import signal
import sys

from fastkd import cli
from fastkd.engine import checkpoint as ckpt


def main() -> int:
    spec, argv = sys.argv[1], sys.argv[2:]
    kind, _, n = spec.partition(":")
    if kind not in ("step", "save", "stop", "node", "stopnode") or not n.isdigit():
        raise SystemExit(f"kill_run.py: expected step:N, save:N, stop:N, node:N or stopnode:N, got {spec!r}")
    n = int(n)
    if kind in ("step", "stop", "node", "stopnode"):
        sig = signal.SIGKILL if kind in ("step", "node") else signal.SIGSTOP

        def after_step(step):
            if step == n:
                if kind in ("node", "stopnode"):  # torchrun starts each worker in a session of its own:
                    os.killpg(os.getpgid(os.getppid()), sig)  # the agent's process group, then this process
                os.kill(os.getpid(), sig)

        ckpt.add_fault_hook("after_step", after_step)
    else:
        def before_rename(tmp, path, count):
            if count == n:
                with open(tmp, "r+b") as fh:
                    fh.truncate(os.path.getsize(tmp) // 2)
                os.kill(os.getpid(), signal.SIGKILL)

        ckpt.add_fault_hook("before_rename", before_rename)
    return cli.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
