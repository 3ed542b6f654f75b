"""The `vidqa` console entry point. It imports nothing heavy itself, so Ctrl-C at any moment,
including the seconds spent importing torch and transformers, exits 130 without a traceback."""

from __future__ import annotations

import os
import signal
import sys

INTERRUPTED = 130  # 128 + SIGINT, as shells report it
IMPORT_MACHINERY = frozenset({"importlib._bootstrap", "importlib._bootstrap_external"})

sigint_seen = False  # set by `on_sigint`: main() then exits 130 however the command ended


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


def importing(frame) -> bool:
    """Whether `frame` runs inside an import (an importlib frame is on the stack)."""
    while frame is not None:
        if frame.f_globals.get("__name__") in IMPORT_MACHINERY:
            return True
        frame = frame.f_back
    return False


def on_sigint(signum, frame) -> None:
    """SIGINT while a command runs: KeyboardInterrupt, which the commands catch to finish cleanly
    (batch: the records written so far are complete; it says how to resume), except inside an
    import. A KeyboardInterrupt there leaves half-initialised modules in sys.modules (later:
    'cannot load module more than once', numpy without `subtract`), is turned into another error
    (RuntimeError from __set_name__, pybind11's abort) or is swallowed by C code that treats a
    failed import as optional (the answer then came out with exit 0). So there it exits 130 at
    once; records already written are safe (batch fsyncs each one)."""
    global sigint_seen
    sigint_seen = True
    if importing(frame):
        interrupted()
    raise KeyboardInterrupt


# From this import until main() is inside its try, Ctrl-C leaves at once (the console script
# calls main() a few bytecodes after importing this module).
if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, interrupted)


def main() -> None:
    try:
        if signal.getsignal(signal.SIGINT) is interrupted:  # not when started with SIGINT ignored (`nohup`, `&`)
            signal.signal(signal.SIGINT, on_sigint)
        from vidqa.cli.app import main as run

        run()
    except KeyboardInterrupt:
        interrupted()
    except SystemExit as leaving:
        # A Ctrl-C the command did not turn into its own exit 130 (a library swallowed the
        # KeyboardInterrupt, or turned it into an error the app reported) still ends in 130:
        # the signal is never lost, even if the answer was printed first.
        if sigint_seen and leaving.code != INTERRUPTED:
            interrupted()
        raise
    except BaseException:
        if sigint_seen:
            interrupted()
        raise
    else:
        if sigint_seen:
            interrupted()
    finally:
        # Leaving (the command's SystemExit or a return): a Ctrl-C while the interpreter still
        # runs Python code on its way out (atexit callbacks) exits 130 instead of printing a
        # KeyboardInterrupt traceback. In the last part of shutdown Python has restored SIGINT's
        # default action, so a Ctrl-C there kills the process by the signal (a shell shows 130).
        signal.signal(signal.SIGINT, interrupted)
