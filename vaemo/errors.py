"""User-facing errors: one clear line and exit status 2, never a traceback wall."""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

EXIT_USER_ERROR = 2

F = TypeVar("F", bound=Callable)


class UserError(Exception):
    """A problem with what the user gave us (argument, path, config value, data).

    The message names the offending thing, so it is shown alone, without a traceback.
    """


def exit_on_user_error(main: F) -> F:
    """Wrap an entry point so that a UserError prints one line and exits with status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)

    return wrapper  # type: ignore[return-value]
