"""User-facing errors: bad input that a script reports as one line and exit code 2."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any


class UserError(Exception):
    """Bad input (a flag, a file, a checkpoint). The message names the problem and the fix."""


def cli_main(main: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a script's main(): a UserError becomes `error: <message>` on stderr and exit 2."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper
