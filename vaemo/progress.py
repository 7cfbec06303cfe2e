"""Progress on a terminal (rich live bars) or as plain periodic lines (logs, `ray job submit`)."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Iterator

from rich.console import Console
from rich.text import Text

# Off a terminal (logs, `ray job submit`): no wrapping, no source paths, lines as they are. No markup anywhere:
# messages and tables carry file names, keys and hints such as `va_scale: [low, high]`, which rich would read as
# markup tags and drop; styles are given as styles.
console = Console(
    highlight=False,
    markup=False,
    emoji=False,  # 'clip:fire:take2' is a file name, not an emoji code
    log_path=False,
    soft_wrap=not sys.stdout.isatty(),
    width=None if sys.stdout.isatty() else 160,
)


def is_terminal() -> bool:
    return sys.stdout.isatty()


def log(message: str, style: str = "") -> None:
    """One timestamped line, as written (brackets included), in `style` on a terminal. Off a terminal (Ray job
    logs) a plain, unwrapped line."""
    if is_terminal():
        console.log(Text(message, style=style))
    else:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@contextlib.contextmanager
def task(description: str, total: int, every_fraction: float = 0.1) -> Iterator[Callable[[int], None]]:
    """Yield `update(done)`. A live bar on a terminal; otherwise a line per `every_fraction` of the work."""
    start = time.time()
    if is_terminal():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        with Progress(
            TextColumn("{task.description}", style="bold", markup=False),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        ) as bar:
            handle = bar.add_task(description, total=total)
            yield lambda done: bar.update(handle, completed=done)
    else:
        next_mark = [every_fraction]

        def update(done: int) -> None:
            if total and done / total + 1e-9 >= next_mark[0]:
                log(f"{description}: {done}/{total} ({time.time() - start:.0f}s)")
                while next_mark[0] <= done / total + 1e-9:
                    next_mark[0] += every_fraction

        yield update
    log(f"{description}: done in {time.time() - start:.1f}s")
