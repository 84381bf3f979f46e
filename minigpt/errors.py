"""User-facing errors: bad input or a fault of the machine, reported by a script as one line and exit 2."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import signal
import sys
from collections.abc import Callable
from typing import Any


class UserError(Exception):
    """Bad input (a flag, a file, a checkpoint). The message names the problem and the fix."""


class Interrupted(Exception):
    """A run stopped by a signal after saving what it could; the script exits with 128 + `signum`."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


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
    exit 2; Ctrl-C exits 130 (SIGTERM, via Interrupted, 143) so `train && next-step` stops."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except UserError as e:
            fail(str(e))
        except Interrupted as e:
            print(str(e), file=sys.stderr)
            sys.exit(128 + e.signum)
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)
            sys.exit(128 + signal.SIGINT)
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
