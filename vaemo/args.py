"""Command-line parsing shared by every entry point (`vaemo ...` and jobs/*.py): bad arguments are one line."""

from __future__ import annotations

import argparse
import sys

from vaemo.errors import EXIT_USER_ERROR


class ArgParser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one line (and exit status 2), without the usage dump."""

    def error(self, message: str):  # type: ignore[override]
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value
