"""The `vidqa` console entry point. It imports nothing heavy itself, so Ctrl-C at any moment,
including the seconds spent importing torch and transformers, exits 130 without a traceback."""

from __future__ import annotations

import os
import signal
import sys

INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def interrupted(*_signal_args) -> None:
    """Exit 130 at once and quietly: no traceback, no 'Exception ignored' noise from threads or
    buffers at interpreter shutdown (a second Ctrl-C is ignored while leaving)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(INTERRUPTED)


# From this import until main() is inside its try, Ctrl-C leaves at once (the console script
# calls main() a few bytecodes after importing this module).
if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, interrupted)


def main() -> None:
    try:
        if signal.getsignal(signal.SIGINT) is interrupted:
            # back to KeyboardInterrupt, which the commands catch to finish cleanly (batch: the
            # records written so far are complete; it says how to resume)
            signal.signal(signal.SIGINT, signal.default_int_handler)
        from vidqa.cli.app import main as run

        run()
    except KeyboardInterrupt:
        interrupted()
    finally:
        # Leaving (the command's SystemExit or a return): a Ctrl-C while the interpreter still
        # runs Python code on its way out (atexit callbacks) exits 130 instead of printing a
        # KeyboardInterrupt traceback. In the last part of shutdown Python has restored SIGINT's
        # default action, so a Ctrl-C there kills the process by the signal (a shell shows 130).
        signal.signal(signal.SIGINT, interrupted)
