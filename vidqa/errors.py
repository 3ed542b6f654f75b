"""Errors the CLI turns into one line on stderr and an exit code.

Anything that is the user's fault (a bad path, a bad option value, a file that is not a video)
raises `BadInput` (exit 2). Failures while running (out of memory, a model that cannot load for
reasons other than its path) raise `RuntimeFailure` (exit 1). Any other exception is a bug.
"""

from __future__ import annotations


class VidqaError(Exception):
    """Base class: `str(error)` is the one line shown to the user."""

    exit_code = 1


class BadInput(VidqaError):
    """The user asked for something that cannot be done as asked (exit 2)."""

    exit_code = 2


class RuntimeFailure(VidqaError):
    """Valid input, but running it failed (exit 1)."""

    exit_code = 1
