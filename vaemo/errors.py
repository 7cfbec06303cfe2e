"""User-facing errors: one clear line and exit status 2, never a traceback wall."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Callable, TypeVar

EXIT_USER_ERROR = 2

F = TypeVar("F", bound=Callable)


class UserError(Exception):
    """A problem with what the user gave us (argument, path, config value, data).

    The message names the offending thing, so it is shown alone, without a traceback.
    """


def read_user_text(path: str | Path, what: str, error: type[UserError] = UserError) -> str:
    """A text file the user gave, read as UTF-8 (a byte-order mark, as Windows tools write, is dropped);
    one line naming `what` and the path when it cannot be read or is in another encoding."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise error(f"{what} '{path}' is not UTF-8 text (byte {err.start} cannot be read)") from None
    except OSError as err:
        raise error(f"{what} '{path}' cannot be read: {err.strerror}") from None


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
