"""The `vidqa` console entry point. It imports nothing heavy itself, so Ctrl-C at any moment,
including the seconds spent importing torch and transformers, exits 130 without a traceback."""

from __future__ import annotations

import os
import signal
import sys

INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def main() -> None:
    try:
        from .cli import main as run

        run()
    except KeyboardInterrupt:
        interrupted()


def interrupted() -> None:
    """Exit 130 at once and quietly: no traceback, no 'Exception ignored' noise from threads or
    buffers at interpreter shutdown (a second Ctrl-C is ignored while leaving)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(INTERRUPTED)
