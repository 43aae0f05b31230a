"""Test helper: ``python kill_build.py N fastkd-args...`` runs the fastkd CLI and SIGKILLs itself
as the N-th batch of teacher rows is encoded (fault injected here, not in the library)."""
import os
import signal
import sys

import fastkd.cache.build as B

n_kill = int(sys.argv[1])
calls = [0]
original = B._encode


def encode(*args, **kwargs):
    calls[0] += 1
    if calls[0] == n_kill:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)


B._encode = encode

from fastkd.cli import main  # noqa: E402

sys.exit(main(sys.argv[2:]))
