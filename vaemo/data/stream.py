"""Webdataset streams of decoded clips, the ones training and evaluation use.

- Training streams are resampled and infinite: each loader worker draws shards at random from its own
  disjoint subset (disjoint across ranks, hence across nodes) through a shuffle buffer, with a
  generator seeded by (seed, rank, worker). The data order is a pure function of those and of how many
  samples each shard holds, so a run resumes exactly: from the samples each shard draw gave (recorded as the
  stream goes), it works out which samples the shuffle buffer held and reads only those shards again
  (`replay_draws`); a checkpoint without that record fast-forwards past the raw samples instead (no decoding).
- Evaluation streams visit each sample exactly once across all ranks and loader workers.
- Bad samples are skipped and counted by reason; batches carry their worker's counts.
"""

from __future__ import annotations

import glob
import itertools
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vaemo.config import local_path
from vaemo.data.decode import Clip, DecodeSpec, SkipSample, decode_sample
from vaemo.data.tars import ShardError, read_shard
from vaemo.data.teacher_records import cache_shard_for, with_cache
from vaemo.data.watchdog import UNNAMED, DecodeWatch, DecodeWatchdog, StuckSample, decode_within
from vaemo.errors import UserError

# ----------------------------------------------------------------------------------------------
# Shards
# ----------------------------------------------------------------------------------------------


def expand_shards(spec: str | list[str]) -> list[str]:
    """Brace notation and globs to a sorted list of shard URLs; local paths must exist and come back
    absolute (Ray workers and actors read them from other working directories). A training run expands
    them once, on the driver, and its workers read that list: a shard lost mid-run stays in it (reading it
    counts `unreadable_shard`) and does not stop the run."""
    from braceexpand import braceexpand

    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    missing: list[str] = []  # named (not globbed) local shards that are not there: a range one too long, a typo
    for item in specs:
        for url in map(local_path, braceexpand(item)):
            if "://" in url or url.startswith("pipe:"):
                urls.append(url)
            elif any(ch in url for ch in "*?["):
                urls.extend(sorted(os.path.abspath(u) for u in glob.glob(os.path.expanduser(url))))
            elif os.path.exists(os.path.expanduser(url)):
                urls.append(os.path.abspath(os.path.expanduser(url)))
            else:
                missing.append(url)
    if not urls:
        raise UserError(f"shards '{', '.join(specs)}' match no file")
    if missing:
        raise UserError(f"shards '{', '.join(specs)}': {len(missing)} of the shards named do not exist, e.g. '{missing[0]}'")
    return urls


# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """Collated clips. `video`/`audio` are None when the consumer did not ask for that modality."""

    keys: list[str]
    video: torch.Tensor | None  # (B, F, 3, H, W) uint8
    audio: torch.Tensor | None  # (B, S) float32 at 16 kHz (zeros for clips without a soundtrack)
    audio_len: list[int]  # valid samples per clip (plain lists: small values need no shared memory)
    duration: list[float]  # seconds per clip
    meta: list[dict]
    has_audio: list[bool] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # the shard of each clip
    teacher: list = field(default_factory=list)  # cached TeacherRecords, when the stream reads a teacher cache
    worker: int = 0
    position: int = 0  # raw samples this worker had drawn when the batch was complete
    # (draw, samples) of each shard draw this worker finished since its previous batch (StreamState.draw_counts)
    ended_draws: list[tuple[int, int]] = field(default_factory=list)
    draws_of: str = ""  # what those draws depend on besides the shards' contents (TrainStream.draws_digest)
    skips: dict[str, int] = field(default_factory=dict)  # this worker's skip counts so far
    data_wait: float = 0.0  # filled by the consumer: seconds spent waiting for this batch
    slot: tuple[int, int] | None = None  # (loader worker, buffer) of recycled shared memory; see BatchBuffers

    def __len__(self) -> int:
        return len(self.keys)


def _stack(tensors: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """torch.stack; inside a loader worker, straight into shared memory (saves a copy on the way out): into
    `out` when given (a recycled buffer of the right shape), else into a fresh segment."""
    if get_worker_info() is None:
        return torch.stack(tensors)
    first = tensors[0]
    shape = (len(tensors), *first.shape)
    if out is None or out.shape != shape or out.dtype != first.dtype:
        out = torch.empty(shape, dtype=first.dtype).share_memory_()
    return torch.stack(tensors, out=out)


class BatchBuffers:
    """Shared-memory batch buffers that loader workers reuse once the consumer has released them.

    A fresh shared-memory segment costs its pages' first-touch faults (about 1,000 per batch of 8 small
    clips, 3-4 us each: 5% of the pipeline's CPU, `bench/data_throughput.py`). Each worker keeps `slots`
    pairs of (video, audio) buffers; a flag per buffer, in shared memory made before the workers fork, says
    whether the consumer is done with it. A worker writes only into a buffer whose flag says so, else into
    a fresh segment as before, so a consumer that never releases (evaluation, `list(loader)`) gets exactly
    what it got without recycling. The consumer releases a batch (`release`) only once nothing reads its
    tensors any more: the trainer after its optimizer step.
    """

    MAX_WORKERS = 64  # loader workers per consumer that can recycle (more simply allocate fresh)

    def __init__(self, slots: int):
        if slots < 1:
            raise ValueError(f"BatchBuffers needs at least one slot per worker, got {slots}")
        self.slots = slots
        self.free = torch.ones((self.MAX_WORKERS, slots), dtype=torch.uint8).share_memory_()
        self.buffers: dict[int, tuple[torch.Tensor | None, torch.Tensor | None]] = {}  # per worker process
        self.next_slot = 0

    def take(self, loader_worker: int) -> tuple[int, tuple[torch.Tensor | None, torch.Tensor | None]] | None:
        """A buffer the consumer has released (or never used), marked taken; None when none is."""
        if loader_worker >= self.MAX_WORKERS:
            return None
        for offset in range(self.slots):
            slot = (self.next_slot + offset) % self.slots
            if self.free[loader_worker, slot]:
                self.free[loader_worker, slot] = 0
                self.next_slot = slot + 1
                return slot, self.buffers.get(slot, (None, None))
        return None

    def keep(self, slot: int, video: torch.Tensor | None, audio: torch.Tensor | None) -> None:
        self.buffers[slot] = (video, audio)

    def release(self, batch: Batch) -> None:
        """The consumer is done with `batch`'s tensors: its worker may overwrite them."""
        if batch.slot is not None:
            worker, slot = batch.slot
            self.free[worker, slot] = 1


def collate(clips: list[Clip], worker: int, position: int, skips: Counter, buffers: BatchBuffers | None = None) -> Batch:
    has_video = bool(clips) and clips[0].video is not None
    with_audio = [c.audio for c in clips if c.audio is not None]
    silence = torch.zeros_like(with_audio[0]) if with_audio else None
    info = get_worker_info()
    taken = buffers.take(info.id) if buffers is not None and info is not None and clips else None
    video_out, audio_out = taken[1] if taken else (None, None)
    video = _stack([c.video for c in clips], video_out) if has_video else None
    audio = _stack([c.audio if c.audio is not None else silence for c in clips], audio_out) if with_audio else None
    if taken:
        buffers.keep(taken[0], video, audio)
    return Batch(
        keys=[c.key for c in clips],
        video=video,
        audio=audio,
        slot=(info.id, taken[0]) if taken else None,
        has_audio=[c.audio is not None for c in clips],
        sources=[c.source for c in clips],
        teacher=[c.teacher for c in clips] if any(c.teacher is not None for c in clips) else [],
        audio_len=[c.audio_len for c in clips],
        duration=[c.duration for c in clips],
        meta=[c.meta for c in clips],
        worker=worker,
        position=position,
        skips=dict(skips),
    )


def _worker_slot() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class NoUsableData(UserError):
    """A stream read `give_up_after` samples in a row and could use none of them (exit 2, one line)."""

    MARKER = "no usable sample: "

    @classmethod
    def after(cls, reasons: Counter) -> NoUsableData:
        read = sum(n for r, n in reasons.items() if r != "unreadable_shard")
        counts = ", ".join(f"{reason} {n}" for reason, n in reasons.most_common())
        return cls(f"{cls.MARKER}0 usable of {read} samples read: {counts or 'the shards hold no sample'}")

    @classmethod
    def line_in(cls, text: str) -> str | None:
        """The one-line reason inside an error re-raised across processes (DataLoader workers, Ray)."""
        match = re.search(re.escape(cls.MARKER) + r"([^\n]*)", text)
        return match.group(1).strip().rstrip("'\")") if match else None


class ShardsUnreadableError(RuntimeError):
    """A training stream's shards stopped being readable after it had read from them: the storage, which Ray's
    restart of the workers (from the newest checkpoint) may find back."""


# Seconds between tries of a shard that failed with an I/O error (training and validation streams; the
# preflight, evaluation and the teacher cache report an unreadable shard at once).
SHARD_RETRY_DELAYS = (1.0, 4.0, 16.0)
# How long a stream that had read its shards goes on drawing unreadable ones before it stops for Ray's restart:
# well inside the 30 minutes the other ranks wait in a collective before theirs times out.
STORAGE_WAIT_S = 600.0


class DecodedClips:
    """Decoded clips kept in memory, up to a byte budget, and handed out again when the stream draws the same
    sample (shard and key) again: a dataset read for many epochs decodes each clip once. Clips are kept in
    the order they are first decoded until the budget is full, and never evicted: a training stream cycles
    over the same clips, so evicting would only trade one clip for another. Decoding is deterministic
    (frames by time, windows and audio phases by key), so a kept clip equals a fresh decode."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes, self.used_bytes, self.hits = budget_bytes, 0, 0
        self.clips: dict[tuple[str, str], Clip] = {}

    def decode(self, sample: dict, spec: DecodeSpec) -> Clip:
        key = (sample.get("__url__", ""), sample.get("__key__", ""))
        clip = self.clips.get(key)
        if clip is not None:
            self.hits += 1
            return clip
        clip = decode_sample(sample, spec)
        size = sum(t.numel() * t.element_size() for t in (clip.video, clip.audio) if t is not None)
        if self.used_bytes + size <= self.budget_bytes:
            self.clips[key] = clip
            self.used_bytes += size
        return clip


def _decode_into_batches(
    raw: Iterable[dict | ShardError],
    spec: DecodeSpec,
    batch_size: int,
    worker: int,
    skips: Counter,
    start_position: int = 0,
    final_partial: bool = False,
    keep: Callable[[int], bool] | None = None,
    give_up_after: int = 0,
    buffers: BatchBuffers | None = None,
    decoded: DecodedClips | None = None,
    watch: DecodeWatch | None = None,
    pass_over: Callable[[int, dict], bool] | None = None,
    limit_s: float = 0.0,
) -> Iterator[Batch]:
    """Decode samples into batches, counting skips; with `give_up_after`, that many unusable samples in a
    row raise NoUsableData (a stream that can never fill a batch must not loop forever); with `decoded`,
    clips decoded before come from memory; with `watch`, each decoding is noted there (a loader worker);
    without, each clip is waited for at most `limit_s` (decode_within; 0: as long as it takes); samples for
    which `pass_over(position, sample)` holds (a loader worker was stopped on them) are skipped as
    `decoder_hang`."""
    position = start_position
    clips: list[Clip] = []
    unusable_run: Counter = Counter()
    decode = (lambda item: decoded.decode(item, spec)) if decoded is not None else (lambda item: decode_sample(item, spec))
    for item in raw:
        if isinstance(item, ShardError):
            skips["unreadable_shard"] += 1
            continue
        position += 1
        if keep is not None and not keep(position - 1):
            continue
        try:
            if pass_over is not None and pass_over(position, item):
                raise SkipSample("decoder_hang", "a loader worker was stopped on it before")
            if watch is not None:
                with watch.decoding(worker, position, item):
                    clip = decode(item)
            else:
                clip = decode_within(limit_s, partial(decode, item), item.get("__url__", ""), item.get("__key__", ""))
            clips.append(clip)
            unusable_run.clear()
        except SkipSample as skip:
            skips[skip.reason] += 1
            unusable_run[skip.reason] += 1
            if give_up_after and sum(unusable_run.values()) >= give_up_after:
                raise NoUsableData.after(unusable_run) from None
            continue
        if len(clips) == batch_size:
            yield collate(clips, worker, position, skips, buffers)
            clips = []
    if final_partial:
        # The last batch may be short or empty; it always comes, so its skip counts arrive too.
        yield collate(clips, worker, position, skips)


# ----------------------------------------------------------------------------------------------
# Training: resampled, deterministic, resumable
# ----------------------------------------------------------------------------------------------


def train_shard_subset(urls: list[str], rank: int, world_size: int, worker: int, workers: int) -> list[str]:
    """The shards a training loader worker draws from: disjoint across ranks (and workers when enough)."""
    if len(urls) >= world_size * workers:
        return urls[rank * workers + worker :: world_size * workers]
    if len(urls) >= world_size:
        return urls[rank::world_size]
    raise UserError(
        f"{len(urls)} training shard(s) cannot be split over {world_size} workers: write at "
        f"least {world_size} shards (e.g. smaller `--shard-size` / clips_per_shard)"
    )


class TrainStream(IterableDataset):
    """Infinite batches for one rank; see the module docstring for the ordering and resume contract."""

    def __init__(
        self,
        urls: list[str],
        spec: DecodeSpec,
        batch_size: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 64,
        resume: StreamState | None = None,
        teacher_cache: str = "",
        give_up_after: int = 0,
        recycle_buffers: int = 0,
        decoded_cache_bytes: int = 0,
        in_order: bool = False,
        decode_limit_s: float = 0.0,
    ):
        self.urls, self.spec, self.batch_size = urls, spec, batch_size
        # Seconds to wait for one clip where no DecodeWatch is set (decode_within: a stream read in the consumer's
        # own process, as validation is); 0: as long as it takes.
        self.decode_limit_s = decode_limit_s
        # Where each loader worker notes the sample it decodes, for a DecodeWatchdog in the consumer; set by
        # TrainBatches before the workers fork.
        self.watch: DecodeWatch | None = None
        # The shards one after the other, round and round, instead of drawn at random (validation: every clip
        # once before any comes again; drawn shards could repeat one shard and leave out another).
        self.in_order = in_order
        self.decoded_cache_bytes = decoded_cache_bytes  # per loader worker (DecodedClips); 0: decode every draw
        # Shared-memory buffers per loader worker that are reused once the consumer calls `release(batch)`
        # (at least prefetch_batches + 2 to recycle in the steady state); 0: a fresh segment per batch.
        self.buffers = BatchBuffers(recycle_buffers) if recycle_buffers > 0 else None
        self.give_up_after = give_up_after  # unusable samples in a row before NoUsableData (0: never)
        self.teacher_cache = teacher_cache  # a teacher-cache folder whose shards are merged into the samples
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle_buffer = shuffle_buffer
        self.start_positions = dict(resume.positions) if resume else {}
        self.start_draws = {w: list(counts) for w, counts in resume.draw_counts.items()} if resume else {}
        self.start_draws_of = dict(resume.draws_of) if resume else {}
        self.passed_over = list(resume.passed_over) if resume else []  # samples a loader worker was stopped on
        # DataLoader restarts its round robin at its worker 0; that worker must play the stream that
        # was due next, so logical streams are rotated by the number of batches already consumed.
        self.first_stream = resume.next_stream() if resume else 0

    def raw_samples(
        self,
        worker: int,
        workers: int,
        lazy: Callable[[], bool] = lambda: False,
        resume_at: DrawPoint | None = None,
        ended: Callable[[int, int], None] = lambda draw, samples: None,
    ) -> Iterator[dict | ShardError]:
        """Resampled shards through a shuffle buffer; the RNG draws depend only on (seed, rank, worker). A shard
        drawn while `lazy()` holds gives its files' bytes as LazyBytes (read when decoded). `resume_at`: go on
        from there (replay_draws). `ended(draw, samples)` is told of each shard draw as it ends."""
        shards, rng = self.shards_and_rng(worker, workers)
        buffer: list[dict] = []
        first_draw, taken_before, url = 0, 0, None
        if resume_at is not None:
            rng.bit_generator.state = resume_at.rng_state
            buffer = yield from self._read_buffered(resume_at)
            first_draw, taken_before, url = resume_at.draw, resume_at.taken, resume_at.url
        failures_in_a_row = unreadable_in_a_row = 0
        read_before = self.start_positions.get(worker, 0) > 0  # a resumed stream had read its shards
        unreadable_since = time.monotonic()
        for draw in itertools.count(first_draw):
            if url is None:
                url = shards[draw % len(shards)] if self.in_order else shards[int(rng.integers(len(shards)))]
            got_any = unreadable = False
            taken = 0
            # the samples a resume had taken from this draw are passed over reading their headers only
            items = read_shard(url, SHARD_RETRY_DELAYS, lazy=lazy() or taken_before > 0)
            if self.teacher_cache:
                items = with_cache(items, cache_shard_for(url, self.teacher_cache))
            for item in items:
                if isinstance(item, ShardError):
                    unreadable = True
                    yield item
                    continue
                got_any = read_before = True
                taken += 1
                if taken <= taken_before:
                    continue
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(item)
                    continue
                pick = int(rng.integers(len(buffer)))
                buffer[pick], item = item, buffer[pick]
                yield item
            # a resumed draw that reads shorter than before ended, for the record, where the samples taken had
            ended(draw, max(taken, taken_before))
            taken_before = 0
            failures_in_a_row = 0 if got_any else failures_in_a_row + 1
            if not (unreadable and not got_any):
                unreadable_in_a_row, unreadable_since = 0, time.monotonic()
            else:
                unreadable_in_a_row += 1
            waited = time.monotonic() - unreadable_since
            if read_before and unreadable_in_a_row and (unreadable_in_a_row > 4 * len(shards) or waited > STORAGE_WAIT_S):
                # Read before, unreadable now: the storage, not the data. Not a UserError, so that Ray restarts
                # the workers from the newest checkpoint (scaling.max_failures) instead of ending the run.
                raise ShardsUnreadableError(
                    f"the last {unreadable_in_a_row} shards this worker drew ({waited:.0f} s) could not be read, "
                    f"though it had read samples before (shared storage unreachable?), e.g. {url}"
                )
            if failures_in_a_row > 4 * len(shards):
                raise NoUsableData(
                    f"{NoUsableData.MARKER}no sample in any of the {len(shards)} shards of this worker (each is empty or "
                    f"unreadable), e.g. {shards[0]}"
                )
            url = None

    def shards_and_rng(self, worker: int, workers: int) -> tuple[list[str], np.random.Generator]:
        """The shards logical stream `worker` draws from, and its RNG as at the stream's start."""
        shards = train_shard_subset(self.urls, self.rank, self.world_size, worker, workers)
        return shards, np.random.default_rng([self.seed, self.rank, worker])

    def _read_buffered(self, point: DrawPoint) -> Generator[ShardError, None, list[dict]]:
        """The samples a resumed stream's shuffle buffer held (`point.buffer`), read again from their shards (each
        shard once; a local one's headers only). Samples a shard no longer gives (unreadable now, or written
        again since) are left out, counted once per shard: its read error, or a ShardError saying so. A shard
        damaged past the samples wanted counts nothing here: the draws that read it whole counted it."""
        wanted: dict[str, set[int]] = {}
        for draw, index in point.buffer:
            wanted.setdefault(point.urls[draw], set()).add(index)
        found: dict[tuple[str, int], dict] = {}
        errors: dict[str, ShardError] = {}
        for url, indices in wanted.items():
            items = read_shard(url, SHARD_RETRY_DELAYS, lazy=True)
            if self.teacher_cache:
                items = with_cache(items, cache_shard_for(url, self.teacher_cache))
            index = 0
            for item in items:
                if isinstance(item, ShardError):
                    errors[url] = item
                    continue
                if index in indices:
                    found[(url, index)] = item
                index += 1
        missing = Counter(point.urls[draw] for draw, index in point.buffer if (point.urls[draw], index) not in found)
        for url, count in missing.items():
            yield errors.get(url) or ShardError(url, f"{count} sample(s) a resume read from it before are no longer in it")
        # a shard drawn twice gives two equal samples, as it did before the resume: copies, not one dict twice
        return [dict(found[(point.urls[draw], index)]) for draw, index in point.buffer if (point.urls[draw], index) in found]

    def __iter__(self) -> Iterator[Batch]:
        loader_worker, workers = _worker_slot()
        worker = (loader_worker + self.first_stream) % workers  # the logical stream this process plays
        start = self.start_positions.get(worker, 0)
        shards, rng = self.shards_and_rng(worker, workers)
        digest = self.draws_digest(worker, shards)
        point = None
        if start > 0 and worker in self.start_draws and self.start_draws_of.get(worker) == digest:
            point = replay_draws(shards, rng, self.in_order, self.shuffle_buffer, self.start_draws[worker], start)
        # Without a record of these draws (a checkpoint from before it was kept, or a resume with another seed,
        # shuffle buffer or shard list, whose draws the record is not of), a resume passes over the samples drawn
        # before it in the same order, reading the shards' headers but not their files (a stream's whole bytes):
        # only what is still in the shuffle buffer afterwards is read (when decoded).
        forwarding = [start > 0 and point is None]
        ended: list[tuple[int, int]] = []
        raw = self.raw_samples(
            worker, workers, lazy=lambda: forwarding[0], resume_at=point, ended=lambda *draw: ended.append(draw)
        )
        drawn = 0
        while forwarding[0] and drawn < start:
            if not isinstance(next(raw), ShardError):
                drawn += 1
        forwarding[0] = False
        batches = _decode_into_batches(
            raw,
            self.spec,
            self.batch_size,
            worker,
            Counter(),
            start_position=start,
            give_up_after=self.give_up_after,
            buffers=self.buffers,
            decoded=DecodedClips(self.decoded_cache_bytes) if self.decoded_cache_bytes > 0 else None,
            watch=self.watch,
            pass_over=self.passes_over(worker),
            limit_s=self.decode_limit_s,
        )
        for batch in batches:  # the generators are lazy: `ended` holds the draws that ended before this batch's samples
            batch.ended_draws, ended[:] = list(ended), []
            batch.draws_of = digest
            yield batch

    def draws_digest(self, worker: int, shards: list[str]) -> str:
        """What logical stream `worker`'s draws and shuffle depend on, besides how many samples each shard holds."""
        import hashlib
        import json

        what = [self.seed, self.rank, worker, self.shuffle_buffer, self.in_order, shards]
        return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]

    def passes_over(self, worker: int) -> Callable[[int, dict], bool] | None:
        """Whether logical stream `worker` passes over a sample: one a loader worker was stopped on, at every
        draw (by shard and key); one whose name was too long for the DecodeWatch to keep whole (UNNAMED), at
        the position this stream drew it (a replay meets it there while the storage reads as it did)."""
        if not self.passed_over:
            return None
        positions = {position for stream, position, key, _ in self.passed_over if stream == worker and key == UNNAMED}
        samples = {(url, key) for _, _, key, url in self.passed_over if key != UNNAMED}
        return lambda position, item: position in positions or (item.get("__url__"), item.get("__key__")) in samples

    def release(self, batch: Batch) -> None:
        """Nothing reads `batch`'s tensors any more: its loader worker may reuse their memory."""
        if self.buffers is not None:
            self.buffers.release(batch)


@dataclass
class DrawPoint:
    """Where a training stream stood after some number of raw samples: the shard draw in progress and how many
    of its samples it had taken, the RNG's state, and its shuffle buffer as (draw, sample index in that draw)."""

    draw: int
    url: str  # the shard of that draw
    taken: int
    rng_state: dict
    buffer: list[tuple[int, int]]
    urls: dict[int, str]  # the shard of each draw the buffer holds samples of


def replay_draws(
    shards: list[str], rng: np.random.Generator, in_order: bool, shuffle_buffer: int, counts: list[int], position: int
) -> DrawPoint:
    """TrainStream.raw_samples' draws and shuffle, played with sample references instead of samples, up to its
    `position`-th sample out: `counts` gives each draw's samples (the draw after the last one counted is the one
    in progress), so no shard is read. Pure arithmetic: a million samples take seconds."""
    buffer: list[tuple[int, int]] = []
    urls: dict[int, str] = {}
    out = 0
    for draw in itertools.count():
        url = shards[draw % len(shards)] if in_order else shards[int(rng.integers(len(shards)))]
        urls[draw] = url
        known = draw < len(counts)
        taken = 0
        while not known or taken < counts[draw]:
            taken += 1
            if len(buffer) < shuffle_buffer:
                buffer.append((draw, taken - 1))
                continue
            buffer[int(rng.integers(len(buffer)))] = (draw, taken - 1)
            out += 1
            if out == position:
                return DrawPoint(draw, url, taken, rng.bit_generator.state, buffer, {d: urls[d] for d, _ in buffer})
    raise AssertionError("unreachable: itertools.count() does not end")


@dataclass
class StreamState:
    """What a consumer took from a TrainStream: per-worker positions and skip counts (checkpointed)."""

    num_workers: int
    positions: dict[int, int] = field(default_factory=dict)
    batches: int = 0
    base_skips: Counter = field(default_factory=Counter)  # from before a resume (or a restart of the loader)
    worker_skips: dict[int, dict[str, int]] = field(default_factory=dict)
    # (logical stream, position, key, shard) of each sample a loader worker was stopped on: streams pass over them
    passed_over: list[tuple[int, int, str, str]] = field(default_factory=list)
    # per logical stream, the samples each of its shard draws gave, in draw order: what a resume needs to work out
    # its place without reading the shards drawn before it (replay_draws); a stream without it reads them again
    draw_counts: dict[int, list[int]] = field(default_factory=dict)
    draws_of: dict[int, str] = field(default_factory=dict)  # per logical stream, TrainStream.draws_digest

    def update(self, batch: Batch) -> None:
        self.positions[batch.worker] = batch.position
        self.worker_skips[batch.worker] = batch.skips
        self.batches += 1
        recorded_of = self.draws_of.get(batch.worker)
        if recorded_of == "":  # the record broke (below): the stream's resumes read, as without one
            return
        if recorded_of != batch.draws_of:  # a start, or a resume with other settings (it read from draw 0)
            self.draws_of[batch.worker] = batch.draws_of
            self.draw_counts[batch.worker] = []
        counts = self.draw_counts.setdefault(batch.worker, [])
        for draw, samples in batch.ended_draws:
            if draw < len(counts):
                counts[draw] = samples  # told again: the later word holds
            elif draw == len(counts):
                counts.append(samples)
            else:  # a gap: this record cannot place a resume, nor can any continuation of it
                del self.draw_counts[batch.worker]
                self.draws_of[batch.worker] = ""  # no stream's digest, and kept: no later batch starts a record
                break

    def next_stream(self) -> int:
        """The logical loader stream whose batch comes next (batches alternate over streams in order)."""
        return self.batches % max(1, self.num_workers)

    def go_on_without(self, sample: StuckSample) -> None:
        """The loader starts again from these positions, without `sample`: its workers count skips afresh."""
        self.base_skips = Counter(self.skips())
        self.worker_skips = {}
        self.passed_over.append((sample.stream, sample.position, sample.key, sample.url))

    def skips(self) -> dict[str, int]:
        total = Counter(self.base_skips)
        for counts in self.worker_skips.values():
            total.update(counts)
        return dict(total)

    def state_dict(self) -> dict:
        return {
            "num_workers": self.num_workers,
            "positions": dict(self.positions),
            "batches": self.batches,
            "skips": self.skips(),
            "passed_over": [list(entry) for entry in self.passed_over],
            "draw_counts": {str(w): list(counts) for w, counts in self.draw_counts.items()},
            "draws_of": {str(w): digest for w, digest in self.draws_of.items()},
        }

    @classmethod
    def from_state_dict(cls, state: dict, num_workers: int) -> StreamState:
        if int(state["num_workers"]) != num_workers:
            raise UserError(
                f"the checkpoint was written with data.loader_workers={state['num_workers']}; resume with the same "
                f"value (got {num_workers}): each loader worker's place in the data is saved"
            )
        positions = {int(k): int(v) for k, v in state["positions"].items()}
        return cls(
            num_workers=num_workers,
            positions=positions,
            batches=int(state.get("batches", 0)),
            base_skips=Counter(state.get("skips", {})),
            passed_over=[(int(s), int(p), str(k), str(u)) for s, p, k, u in state.get("passed_over", [])],
            draw_counts={int(w): [int(n) for n in counts] for w, counts in state.get("draw_counts", {}).items()},
            draws_of={int(w): str(digest) for w, digest in state.get("draws_of", {}).items()},
        )


class TrainBatches:
    """A rank's training batches: `make_stream(state)` through a DataLoader, each loader worker watched. `state`
    is where the stream starts (a fresh StreamState, or a checkpoint's), and the consumer updates it with
    every batch it takes.

    A worker that spends longer than `limit_s` decoding one sample (a file that sends FFmpeg into an endless
    loop) is stopped by a DecodeWatchdog, and the loader starts again where the consumer is, the stream
    passing over that sample (`decoder_hang`). `state` keeps the sample, so a resume from a later checkpoint
    passes over it too. With
    `limit_s` 0 nothing is watched; without loader workers the stream decodes in this process, where its
    own `decode_limit_s` applies (decode_within).
    """

    def __init__(
        self,
        make_stream: Callable[[StreamState], TrainStream],
        state: StreamState,
        workers: int,
        prefetch_batches: int,
        limit_s: float,
        name: str,
        on_stop: Callable[[StuckSample], None] = lambda sample: None,
    ):
        self.make_stream, self.state, self.name = make_stream, state, name
        self.on_stop = on_stop  # told of each stopped sample at once (the trainer notes it in the run folder)
        self.workers, self.prefetch_batches = workers, prefetch_batches
        self.limit_s = limit_s if workers > 0 else 0.0
        self.owners: dict[int, TrainStream] = {}  # id(batch) -> the stream whose shared buffers it holds
        self.watchdog: DecodeWatchdog | None = None
        self.waiting_since = 0.0  # time.monotonic() when the consumer began to wait for a batch; 0: not waiting
        self._start()

    def _start(self) -> None:
        self.stream = self.make_stream(self.state)
        if self.limit_s > 0:
            self.stream.watch = DecodeWatch()
        seed = int(np.random.SeedSequence([self.stream.seed, self.stream.rank]).generate_state(1)[0])
        self.batches = iterate_off_the_main_thread(make_loader(self.stream, self.workers, self.prefetch_batches, seed))
        if self.stream.watch is not None:
            self.watchdog = DecodeWatchdog(self.stream.watch, self.limit_s, self.waited)

    def waited(self) -> float:
        """Seconds the consumer has been waiting for the batch it asked for (0 when it is not waiting)."""
        since = self.waiting_since
        return time.monotonic() - since if since else 0.0

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        while True:
            self.waiting_since = time.monotonic()
            try:
                batch = next(self.batches)
                self.owners[id(batch)] = self.stream
                return batch
            except RuntimeError:  # DataLoader's "worker ... exited unexpectedly", after the watchdog stopped it
                if self.watchdog is None or not self.watchdog.stopped:
                    raise
            finally:
                self.waiting_since = 0.0
            # Outside the except block, whose traceback holds the old loader: closing it ends its workers
            # before the new ones fork.
            self._go_on_without()

    def _go_on_without(self) -> None:
        import sys

        stuck = self.watchdog.stopped
        self.close()  # first: a worker it stops meanwhile is in `stuck` too
        for sample in stuck:
            print(
                f"vaemo: {self.name}: a loader worker spent {sample.seconds:.0f} s on the clip {sample.key} of "
                f"{sample.url} (data.decode_timeout_s={self.limit_s:g}); it was stopped, and the stream goes on "
                "without that clip (skip: decoder_hang)",
                file=sys.stderr,
                flush=True,
            )
            self.state.go_on_without(sample)
            self.on_stop(sample)
        self._start()

    def release(self, batch: Batch) -> None:
        """Nothing reads `batch`'s tensors any more: the loader worker that made it may reuse their memory."""
        owner = self.owners.pop(id(batch), None)
        if owner is not None:
            owner.release(batch)

    def close(self) -> None:
        """Stop the watchdog and the loader's workers."""
        if self.watchdog is not None:
            self.watchdog.close()
            self.watchdog = None
        self.batches = iter(())  # the DataLoader's iterator, dropped, ends its workers


def iterate_off_the_main_thread(loader: DataLoader) -> Iterator:
    """iter(loader), called from another thread: torch then installs no SIGCHLD handler (it does so from the
    main thread only, once per process). That handler raises on a loader worker's death in whatever line the
    main thread runs; without it, a worker the DecodeWatchdog stopped fails the consumer's wait for a batch
    (DataLoader's own check of its workers), where TrainBatches expects it. Ray Train runs the training
    function off the main thread; a consumer in a test or a script may not, and where a loader was made on
    the main thread before, torch's handler is installed for the whole process."""
    made: list = []

    def make() -> None:
        try:
            made.append(iter(loader))
        except BaseException as err:  # re-raised below, in the caller's thread
            made.append(err)

    thread = threading.Thread(target=make, name="vaemo loader start")
    thread.start()
    thread.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]


# ----------------------------------------------------------------------------------------------
# Evaluation: each sample exactly once across ranks x workers
# ----------------------------------------------------------------------------------------------


class EvalStream(IterableDataset):
    """One pass over the shards; rank r of `world_size` with its loader workers sees a disjoint part.

    With at least as many shards as (ranks x workers) whole shards are split; otherwise every slot reads
    all shards and keeps every n-th sample, which still gives each sample to exactly one slot.
    """

    def __init__(self, urls: list[str], spec: DecodeSpec, batch_size: int, *, rank: int = 0, world_size: int = 1):
        self.urls, self.spec, self.batch_size = urls, spec, batch_size
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[Batch]:
        worker, workers = _worker_slot()
        slots = self.world_size * workers
        slot = self.rank * workers + worker
        if len(self.urls) >= slots:
            shards, keep = self.urls[slot::slots], None
        else:
            shards, keep = self.urls, (lambda index: index % slots == slot)
        raw = (item for url in shards for item in read_shard(url))
        yield from _decode_into_batches(raw, self.spec, self.batch_size, worker, Counter(), final_partial=True, keep=keep)


def _quiet_worker(_: int) -> None:
    torch.set_num_threads(1)


def make_loader(dataset: IterableDataset, workers: int, prefetch_batches: int = 2, seed: int = 0) -> DataLoader:
    """A DataLoader over a stream that already yields whole batches (decoding runs in the workers). It sets
    no timeout: a resume (inside the worker, before its first batch) reads the shards of its shuffle buffer again,
    and one from a checkpoint without the draws' record for as long as the run had drawn. Each start draws its
    workers' seed from a generator of its own (`seed`), not from the process's torch RNG: a validation pass, a
    resume or a restart after a stuck worker then leaves the training's own random draws (dropout) as an
    uninterrupted run has them."""
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        prefetch_factor=prefetch_batches if workers > 0 else None,
        worker_init_fn=_quiet_worker if workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
    )


def probe_usable(urls: list[str], spec: DecodeSpec, limit: int, teacher_cache: str = "", decode_limit_s: float = 0.0) -> None:
    """Read the shards in order until one sample `spec` can use; NoUsableData after `limit` unusable ones
    (or all of them). What the preflight runs, so a stage that cannot get data says so before any weight
    loads; usable data costs one decoded sample. Each clip is waited for at most `decode_limit_s`
    (decode_within; 0: as long as it takes)."""
    reasons: Counter = Counter()
    for url in urls:
        items = read_shard(url)
        if teacher_cache:
            items = with_cache(items, cache_shard_for(url, teacher_cache))
        for item in items:
            if isinstance(item, ShardError):
                reasons["unreadable_shard"] += 1
                break
            try:
                decode_within(
                    decode_limit_s, partial(decode_sample, item, spec), item.get("__url__", ""), item.get("__key__", "")
                )
                return
            except SkipSample as skip:
                reasons[skip.reason] += 1
            if sum(n for r, n in reasons.items() if r != "unreadable_shard") >= limit:
                raise NoUsableData.after(reasons)
    raise NoUsableData.after(reasons)
