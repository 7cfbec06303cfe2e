"""Clips/s of the full training data pipeline vs. the decode-only ceiling on the same clips.

Full pipeline: TrainStream over webdataset shards (tar reading, resampling, shuffle buffer, torchcodec
decode + resize + 16 kHz audio, collation) through a DataLoader with W workers, batches delivered to
the main process. Ceiling: the same decode calls on the bytes of the very clips that the pipeline
delivered (clips differ in cost by 10x: frame rate, size, codec), already in memory, in W processes,
results discarded. Prints both and their ratio (target >= 0.9).

This machine's speed drifts by +-15% within seconds (the same decode loop, repeated, takes 0.46-0.63 s),
so separate runs of the two sides compare drifts, not pipelines: ratios of 0.76 to 1.09 in one sitting.
Instead one loader and one process pool stay alive and alternate in short legs (a few seconds each):
the loader delivers `--batches` batches, then, once its workers are idle, the pool decodes those clips.
Between legs the batches the workers prepared while idle-waiting are drained untimed, so each pipeline
leg starts with empty queues (a small handicap for the pipeline, never a gift). The ratio of the summed
times over all legs is the figure; the median and spread of the per-leg ratios show how steady it is.

    .venv/bin/python bench/data_throughput.py                      # synthesizes 400 clips if needed
    .venv/bin/python bench/data_throughput.py --shards 'runs/data/train/*.tar' --workers 2 --legs 20
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vaemo.config import DataConfig  # noqa: E402
from vaemo.data.decode import DecodeSpec, decode_audio, decode_video, split_sample  # noqa: E402
from vaemo.data.stream import TrainStream, expand_shards, make_loader  # noqa: E402
from vaemo.data.tars import read_shard  # noqa: E402

SPEC = DecodeSpec(num_frames=8, height=112, width=112, audio_seconds=3.0)
CLOCK_TICK = os.sysconf("SC_CLK_TCK")


def _decode_only(raw: bytes) -> int:
    import torch

    torch.set_num_threads(1)
    decode_video(raw, SPEC)
    decode_audio(raw, SPEC)
    return 1


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK


def _cpu_of(pids: list[int]) -> float:
    return sum(_cpu_seconds(p) for p in pids)


def wait_until_idle(pids: list[int], quiet_seconds: float = 0.15) -> None:
    """Return once the processes used no CPU for `quiet_seconds` (loader workers with full queues)."""
    before = _cpu_of(pids)
    while True:
        time.sleep(quiet_seconds)
        now = _cpu_of(pids)
        if now == before:
            return
        before = now


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default=None, help="training shards (default: synthesize 400 clips)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=40, help="batches per pipeline leg")
    parser.add_argument("--legs", type=int, default=16, help="pipeline/ceiling leg pairs")
    parser.add_argument("--prefetch", type=int, default=DataConfig().prefetch_batches, help="data.prefetch_batches")
    args = parser.parse_args()

    tmp = None
    if args.shards is None:
        from vaemo.data.synth import Ranges, synthesize

        tmp = tempfile.TemporaryDirectory(prefix="vaemo-bench-")
        synthesize(
            tmp.name,
            train_clips=400,
            val_clips=16,
            bench_clips=16,
            clips_per_shard=50,
            seed=0,
            ranges=Ranges(duration=(2.0, 3.0)),
        )
        args.shards = f"{tmp.name}/train/*.tar"
    urls = expand_shards(args.shards)
    clip_bytes = {s["__key__"]: split_sample(s)[1] for u in urls for s in read_shard(u)}
    workers = max(1, args.workers)

    stream = TrainStream(urls, SPEC, args.batch_size, seed=0, shuffle_buffer=32, recycle_buffers=args.prefetch + 2)
    loader = iter(make_loader(stream, args.workers, prefetch_batches=args.prefetch))
    with get_context("fork").Pool(workers) as pool:
        pool.map(_decode_only, list(clip_bytes.values())[: workers * 2])  # load FFmpeg in each process
        for _ in range(workers * 2):  # worker start, shuffle buffers filling
            stream.release(next(loader))
        loader_pids = [w.pid for w in getattr(loader, "_workers", [])]
        pool_pids = [p.pid for p in getattr(pool, "_pool", [])]
        legs, cpu = [], {"loader": 0.0, "main": 0.0, "pool": 0.0}
        for _ in range(args.legs):
            wait_until_idle(loader_pids)
            for _ in range(workers * args.prefetch):  # drain what the workers prepared while waiting
                stream.release(next(loader))
            start, loader_cpu, main_cpu = time.perf_counter(), _cpu_of(loader_pids), time.process_time()
            keys = []
            for batch in itertools.islice(loader, args.batches):
                keys += batch.keys
                stream.release(batch)  # as the trainer does after its step
            pipeline_seconds = time.perf_counter() - start
            cpu["loader"] += _cpu_of(loader_pids) - loader_cpu
            cpu["main"] += time.process_time() - main_cpu
            wait_until_idle(loader_pids)
            start, pool_cpu = time.perf_counter(), _cpu_of(pool_pids)
            pool.map(_decode_only, [clip_bytes[key] for key in keys], chunksize=4)
            legs.append((len(keys), pipeline_seconds, time.perf_counter() - start))
            cpu["pool"] += _cpu_of(pool_pids) - pool_cpu
    del loader

    clips = sum(n for n, _, _ in legs)
    pipeline_rate = clips / sum(p for _, p, _ in legs)
    ceiling_rate = clips / sum(c for _, _, c in legs)
    per_leg = sorted(c / p for _, p, c in legs)
    print(f"decode-only ceiling : {ceiling_rate:7.1f} clips/s  ({workers} processes, in-memory bytes)")
    print(f"full pipeline       : {pipeline_rate:7.1f} clips/s  ({args.workers} DataLoader workers, shards)")
    print(
        f"ratio               : {pipeline_rate / ceiling_rate:.2f}  (over {len(legs)} alternating legs, {clips} clips each "
        f"side; per leg: median {statistics.median(per_leg):.2f}, range {per_leg[0]:.2f}-{per_leg[-1]:.2f}; target >= 0.9)"
    )
    pipeline_seconds, ceiling_seconds = clips / pipeline_rate, clips / ceiling_rate
    print(
        f"where the time goes  : CPU ms per clip: decoding alone {cpu['pool'] / clips * 1e3:.2f}, loader workers "
        f"{cpu['loader'] / clips * 1e3:.2f} (+ main process {cpu['main'] / clips * 1e3:.2f}); cores busy: pool "
        f"{cpu['pool'] / ceiling_seconds:.2f}, loader workers {cpu['loader'] / pipeline_seconds:.2f} of {workers}"
    )
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
