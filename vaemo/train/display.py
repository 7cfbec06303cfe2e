"""Training progress on the driver: metrics records arrive from rank 0 through a Ray queue.

On a terminal: a live panel (bar, losses, throughput, data wait, skips). Otherwise, as under
`ray job submit`: one compact log line per record.
"""

from __future__ import annotations

import threading
import time

from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from vaemo import progress
from vaemo.train.reporting import format_line


class TrainingDisplay:
    def __init__(self, queue, stage: int, max_steps: int):
        self.queue, self.stage, self.max_steps = queue, stage, max_steps
        self.last: dict | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._terminal = progress.is_terminal()
        self._bar = Progress(
            TextColumn(f"stage {stage}", style="bold", markup=False),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=progress.console,
        )
        self._task = self._bar.add_task("train", total=max_steps)
        self._live: Live | None = None

    def __enter__(self) -> "TrainingDisplay":
        if self._terminal:
            self._live = Live(self._render(), console=progress.console, refresh_per_second=4)
            self._live.__enter__()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._drain()
        if self._live is not None:
            self._live.__exit__(*exc)

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._drain():
                time.sleep(0.25)

    def _drain(self) -> bool:
        got = False
        while True:
            try:
                record = self.queue.get_nowait()
            except Exception:  # Empty, or the queue actor already gone
                return got
            got = True
            self._show(record)

    def _show(self, record: dict) -> None:
        self.last = record
        if self._live is not None:
            self._bar.update(self._task, completed=record["step"])
            self._live.update(self._render())
        else:
            progress.log(format_line(record, self.max_steps, self.stage))

    def _render(self) -> Table:
        grid = Table.grid(padding=(0, 1))
        grid.add_row(self._bar)
        if self.last:
            grid.add_row(format_line(self.last, self.max_steps, self.stage))
        return grid
