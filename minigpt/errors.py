"""User-facing errors: bad input or a fault of the machine, reported by a script as one line and exit 2."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any


class UserError(Exception):
    """Bad input (a flag, a file, a checkpoint). The message names the problem and the fix."""


class Interrupted(Exception):
    """A run stopped by a signal after saving what it could; the script exits with 128 + `signum`."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class SignalInterrupt(KeyboardInterrupt):
    """SIGTERM (what schedulers and containers send) raised like Ctrl-C's KeyboardInterrupt, so `with` and
    `finally` blocks clean up (temporary files are removed) before the command exits 128 + `signum`."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def signal_of(e: KeyboardInterrupt) -> int:
    """The signal behind an interrupt: SIGINT for Ctrl-C's KeyboardInterrupt."""
    return getattr(e, "signum", signal.SIGINT)


def raise_signal_interrupt(signum: int, frame: Any) -> None:
    """The SIGTERM handler while a command runs (see `cli_main`); the training loop takes over from it."""
    raise SignalInterrupt(signum)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """While active, SIGTERM raises SignalInterrupt: in the main thread, and only over its default action."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, raise_signal_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


# What to do about the usual faults of a file system, by errno.
_OS_ERROR_FIXES = {
    errno.ENOSPC: "free some space or pass another --out-dir",
    errno.EDQUOT: "free some space (disk quota) or pass another --out-dir",
    errno.EROFS: "the file system is read-only; pass a writable --out-dir",
    errno.EACCES: "check the permissions or pass another path",
    errno.EPERM: "check the permissions or pass another path",
    errno.ENOTDIR: "a part of the path is a file, not a directory; fix the path",
    errno.EISDIR: "it is a directory; pass a file",
    errno.ELOOP: "the path has a symlink loop; fix the link or pass another path",
    errno.ENOENT: "check the path",
    errno.ENAMETOOLONG: "use a shorter path",
}


def os_error_message(e: OSError) -> str:
    """One line for a file-system error: what failed, on which path, and what to do."""
    where = f" {e.filename}" if e.filename is not None else ""
    if e.filename2 is not None:
        where += f" -> {e.filename2}"
    what = e.strerror or os.strerror(e.errno) if e.errno else str(e).splitlines()[0] if str(e) else type(e).__name__
    fix = _OS_ERROR_FIXES.get(e.errno, "check the path and the disk")
    return f"cannot use{where}: {what}; {fix}"


def cli_main(main: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a script's main(): bad input and machine faults become `error: <one line>` on stderr and
    exit 2; Ctrl-C exits 130 and SIGTERM 143 (after cleaning up, see `sigterm_raises`), so
    `train && next-step` stops."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with sigterm_raises():
                return main(*args, **kwargs)
        except UserError as e:
            fail(str(e))
        except Interrupted as e:
            print(str(e), file=sys.stderr)
            sys.exit(128 + e.signum)
        except KeyboardInterrupt as e:
            signum = signal_of(e)
            print("\ninterrupted" if signum == signal.SIGINT else f"interrupted by {e}", file=sys.stderr)
            sys.exit(128 + signum)
        except BrokenPipeError:  # `... | head`: the reader has gone, which is not an error
            with contextlib.suppress(OSError):
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - so the exit's flush stays quiet
            sys.exit(0)
        except MemoryError:
            fail("out of memory; use a smaller model, batch or block size")
        except OSError as e:
            fail(os_error_message(e))

    return wrapper


def fail(message: str) -> None:
    """`error: <message>` on stderr (always one line) and exit 2."""
    print("error: " + " ".join(message.split()), file=sys.stderr)
    sys.exit(2)
