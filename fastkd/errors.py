"""The errors every ``fastkd`` subcommand reports the same way: one line on stderr, exit code 2.

Library code raises :class:`UsageError` (or a ``ValueError`` / ``FileNotFoundError`` / other
``OSError`` naming the problem) for a mistake in how fastkd was called: a bad flag value, a missing
data folder or checkpoint, an impossible combination, a full disk. :func:`fastkd.cli.main` turns
any of :data:`USER_ERRORS` into ``fastkd COMMAND: error: MESSAGE`` and exit code 2; the traceback
is printed only with ``--debug``. Anything else is a bug and keeps its traceback (exit code 1).
"""
from __future__ import annotations


class UsageError(ValueError):
    """A mistake in the invocation or the configuration, explained in its message."""


class NonFiniteError(ValueError):
    """Training produced a non-finite loss or weights; the run stopped without saving them."""


# Exceptions that mean "the user has something to fix", not "fastkd has a bug".
USER_ERRORS = (UsageError, ValueError, OSError, ImportError)
