"""Command-line parsing shared by every entry point (`vaemo ...` and jobs/*.py): bad arguments are one line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from vaemo.errors import EXIT_USER_ERROR, UserError


class ArgParser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one line (and exit status 2), without the usage dump."""

    def error(self, message: str):  # type: ignore[override]
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def integer_at_least(minimum: int, wanted: str) -> Callable[[str], int]:
    """An argparse `type`: an integer >= minimum, else one line saying what was wanted."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value

    return parse


positive_int = integer_at_least(1, "a positive integer")
non_negative_int = integer_at_least(0, "an integer >= 0")


def output_folder(path: str | Path, flag: str = "--out") -> Path:
    """PATH, created if need be and checked writable before any work starts: a run that scores or trains
    for an hour must not fail at its end on a folder it cannot write. Raises one line naming the flag."""
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} '{path}' is a file; give a folder")
    unpacked = job_working_copy()
    if unpacked is not None and folder.resolve().is_relative_to(unpacked):
        raise UserError(
            f"{flag} '{path}' lies in the copy of the project that `ray job submit --working-dir` unpacked for "
            f"this job ({unpacked}): Ray deletes that copy, and other nodes have their own; give a path on "
            "storage every node mounts (e.g. /shared/runs/...)"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".vaemo-write-probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UserError(f"{flag} '{path}' is not writable: {err.strerror}") from None
    return folder


def output_file(path: str | Path, flag: str = "--out") -> Path:
    """PATH as a file to write at the end of a run, checked before the run: not a folder, and its folder
    writable."""
    file = Path(path).expanduser()
    if file.is_dir():
        raise UserError(f"{flag} '{path}' is a folder; give a file name")
    output_folder(file.parent, f"the folder of {flag} '{path}'")
    return file


def job_working_copy() -> Path | None:
    """The folder `ray job submit --working-dir` unpacked for the job this process is the driver of (its
    working directory lies there), or None. It is Ray's temporary copy on this node (each node unpacks its
    own), deleted when Ray no longer needs it."""
    parts = Path.cwd().parts
    if "working_dir_files" in parts[:-1]:
        return Path(*parts[: parts.index("working_dir_files") + 2])
    return None
