"""Loader workers stuck on one clip: found from the consumer's side, and stopped.

A file that sends FFmpeg into an endless loop blocks a loader worker inside C code, where nothing in that
worker can interrupt it; with one rank nothing else would ever stop the run. So each worker notes in shared
memory (made before the workers fork) which sample it is decoding and since when (`DecodeWatch`), and a
thread in the consumer stops (SIGKILL) a worker that has spent longer than a limit on one sample
(`DecodeWatchdog`). What the consumer then does, start the loader again without that sample, is
`TrainBatches` in vaemo/data/stream.py. What is watched is a clip's decoding (with the reading of its bytes
when they are read lazily, after a resume), not the reading of a shard: storage that stops answering leaves
a process in a state that no signal ends.

Processes that decode clips themselves for a while and then end (evaluation and teacher-cache actors, a
rank's validation) wait for each clip in a thread instead (`decode_within`): past the limit the clip is
skipped, and the thread, which nothing can stop, is left to end with the process. That wait can end because
the decoding releases the GIL while it runs in FFmpeg (torch operators do; a thread decoding a 20 s clip
left the waiting thread running every 10 ms).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch.utils.data import get_worker_info

from vaemo.data.decode import SkipSample

T = TypeVar("T")


# The key of a StuckSample whose name was too long to keep whole (streams pass over it by position alone)
UNNAMED = "?"


@dataclass(frozen=True)
class StuckSample:
    """A sample a loader worker spent `seconds` on: the `position`-th raw sample of logical stream `stream`
    (the same sample on every replay of the stream, see TrainStream)."""

    stream: int
    position: int
    key: str
    url: str
    seconds: float


class DecodeWatch:
    """Per loader worker: the sample it is decoding and since when (time.monotonic, which every process of
    one machine shares), or 0.0 while it decodes nothing."""

    MAX_WORKERS = 64  # loader workers per consumer that are watched (more are not)
    NAME_BYTES = 4096  # the sample's key and shard as JSON (one cut short is UNNAMED)

    def __init__(self):
        self.since = torch.zeros(self.MAX_WORKERS, dtype=torch.float64).share_memory_()
        self.ids = torch.zeros((self.MAX_WORKERS, 3), dtype=torch.int64).share_memory_()  # pid, stream, position
        self.names = torch.zeros((self.MAX_WORKERS, self.NAME_BYTES), dtype=torch.uint8).share_memory_()

    @contextmanager
    def decoding(self, stream: int, position: int, sample: dict) -> Iterator[None]:
        """Around one sample's decoding, in a loader worker (elsewhere nothing is noted: nothing could stop it)."""
        info = get_worker_info()
        if info is None or info.id >= self.MAX_WORKERS:
            yield
            return
        slot = info.id
        name = json.dumps([sample.get("__key__", ""), sample.get("__url__", "")]).encode()[: self.NAME_BYTES]
        names = self.names[slot].numpy()
        names[: len(name)] = np.frombuffer(name, dtype=np.uint8)
        names[len(name) :] = 0
        self.ids[slot] = torch.tensor([os.getpid(), stream, position])
        self.since[slot] = time.monotonic()  # written last: the watchdog reads the rest only when this is set
        try:
            yield
        finally:
            self.since[slot] = 0.0

    def stuck(self, limit_s: float) -> list[tuple[int, float]]:
        """(slot, since) of the workers that have decoded one sample for longer than `limit_s`."""
        now = time.monotonic()
        return [(slot, since) for slot, since in enumerate(self.since.tolist()) if since and now - since > limit_s]

    def sample_in(self, slot: int, since: float) -> tuple[int, StuckSample] | None:
        """(pid, sample) of the worker in `slot`, if it still decodes the sample it began at `since`."""
        pid, stream, position = self.ids[slot].tolist()
        raw = bytes(self.names[slot].numpy()).rstrip(b"\0")
        if float(self.since[slot]) != since:  # it finished that sample while we read
            return None
        try:
            key, url = json.loads(raw.decode())
        except ValueError:  # cut at NAME_BYTES
            key, url = UNNAMED, raw.decode(errors="replace")
        return pid, StuckSample(stream, position, key, url, time.monotonic() - since)


class DecodeWatchdog:
    """A daemon thread in the consumer that stops (SIGKILL) every loader worker stuck on one sample for longer
    than `limit_s`, and keeps what each was stuck on (`stopped`). The consumer's wait for that worker's batch
    then fails with DataLoader's "worker exited unexpectedly".

    The loader's workers share one pipe to the consumer, and a worker killed halfway through writing a batch
    into it (its queue's feeder thread) would leave the consumer waiting forever for the rest. So a worker
    is stopped only once the consumer has waited for a batch for `quiet_s` (`consumer_waited()` seconds): a
    waiting consumer reads every batch that arrives, so by then every batch put before has been written
    whole. And it is first paused (SIGSTOP): only if it is then still on the same sample, which it began
    before it put its last batch, is it killed; else it goes on (SIGCONT).
    """

    def __init__(self, watch: DecodeWatch, limit_s: float, consumer_waited: Callable[[], float]):
        self.watch, self.limit_s, self.consumer_waited = watch, limit_s, consumer_waited
        self.quiet_s = min(30.0, limit_s / 2)
        self.stopped: list[StuckSample] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vaemo decode watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        every = min(5.0, self.limit_s / 4)
        while not self._done.wait(every):
            if self.consumer_waited() < self.quiet_s:
                continue
            for slot, since in self.watch.stuck(self.limit_s):
                found = self.watch.sample_in(slot, since)
                if found is None:
                    continue
                pid, sample = found
                with contextlib.suppress(ProcessLookupError):  # it ended on its own meanwhile
                    self._stop(pid, slot, since, sample)

    def _stop(self, pid: int, slot: int, since: float, sample: StuckSample) -> None:
        killed = False
        os.kill(pid, signal.SIGSTOP)
        try:
            # A process waiting in the kernel (a lazy read from storage) pauses only once it returns; a kill
            # still ends a wait the kernel lets signals end.
            deadline = time.monotonic() + 10.0
            while not paused(pid) and time.monotonic() < deadline:
                time.sleep(0.01)
            if float(self.watch.since[slot]) != since:  # it finished the sample just now: let it go on
                return
            self.stopped.append(sample)  # before the kill: the consumer looks here when it finds the worker gone
            self.watch.since[slot] = 0.0
            os.kill(pid, signal.SIGKILL)
            killed = True
        finally:
            if not killed:  # a worker left paused would hold its memory for good: its loader cannot end it
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)

    def close(self) -> None:
        self._done.set()
        self._thread.join()


def paused(pid: int) -> bool:
    """Whether the process has stopped on a signal (or is gone: ProcessLookupError)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        raise ProcessLookupError(pid) from None
    return stat.rsplit(")", 1)[1].split()[0] in ("T", "t", "Z", "X")


# (shard or file, key) of the clips this process gave up on in decode_within: each left a thread behind, and
# another try would leave another
GAVE_UP: set[tuple[str, str]] = set()


def decode_within(limit_s: float, decode: Callable[[], T], source: str, key: str = "") -> T:
    """decode() on this thread's decoding thread, waited for at most `limit_s` seconds (0: as long as it
    takes). Past the limit, or for a clip given up on before, SkipSample("decoder_hang"), with one line
    naming the clip; the decoding thread stuck on it is left behind and the next clip gets a new one."""
    if not limit_s:
        return decode()
    if (source, key) in GAVE_UP:
        raise SkipSample("decoder_hang", "it hung the decoder before")
    outcome: list = []
    finished = threading.Event()
    _decoding_thread().put((decode, outcome, finished))
    if not finished.wait(limit_s):
        _runner.jobs = None
        GAVE_UP.add((source, key))
        clip = f"the clip {key} of {source}" if key else f"the clip {source}"
        print(
            f"vaemo: {clip} was still being decoded after {limit_s:g} s (data.decode_timeout_s): skipped as decoder_hang",
            file=sys.stderr,
            flush=True,
        )
        raise SkipSample("decoder_hang", f"still decoding after {limit_s:g} s")
    succeeded, value = outcome[0]
    if not succeeded:
        raise value
    return value


# Per calling thread: the queue of its decoding thread, and the process that made it (a forked child has none
# of its parent's threads). One long-lived thread rather than one per clip: a new thread calling into torch
# starts its own OpenMP team.
_runner = threading.local()


def _decoding_thread() -> queue.Queue:
    if getattr(_runner, "jobs", None) is None or _runner.pid != os.getpid():
        _runner.jobs, _runner.pid = queue.Queue(), os.getpid()
        threading.Thread(target=_decode_jobs, args=(_runner.jobs,), name="vaemo decode", daemon=True).start()
    return _runner.jobs


def _decode_jobs(jobs: queue.Queue) -> None:
    while True:
        decode, outcome, finished = jobs.get()
        try:
            outcome.append((True, decode()))
        except BaseException as err:  # re-raised in the caller's thread
            outcome.append((False, err))
        finished.set()
