"""Clips/s of the full training data pipeline vs. the decode-only ceiling on the same clips.

Full pipeline: TrainStream over webdataset shards (tar reading, resampling, shuffle buffer, torchcodec
decode + resize + 16 kHz audio, collation) through a DataLoader with W workers, batches delivered to
the main process. Ceiling: the same decode calls on the bytes of the very clips that the pipeline
delivered in that round (clips differ in cost by 10x: frame rate, size, codec), already in memory, in W
processes, results discarded. Prints both and their ratio (target >= 0.9). This machine's speed drifts by
+-10% over tens of seconds, so the rounds are short, each pairs a pipeline run with the ceiling on its clips,
and the median of their ratios is reported.

    .venv/bin/python bench/data_throughput.py                      # synthesizes 400 clips if needed
    .venv/bin/python bench/data_throughput.py --shards 'runs/data/train/*.tar' --workers 2 --batches 60
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vaemo.data.decode import DecodeSpec, decode_audio, decode_video, split_sample  # noqa: E402
from vaemo.data.stream import TrainStream, expand_shards, make_loader  # noqa: E402
from vaemo.data.tars import read_shard  # noqa: E402

SPEC = DecodeSpec(num_frames=8, height=112, width=112, audio_seconds=3.0)


def _decode_only(raw: bytes) -> int:
    import torch

    torch.set_num_threads(1)
    decode_video(raw, SPEC)
    decode_audio(raw, SPEC)
    return 1


def ceiling(work: list[bytes], workers: int) -> float:
    with get_context("fork").Pool(workers) as pool:
        pool.map(_decode_only, work[: workers * 2])  # warm up each process
        start = time.perf_counter()
        pool.map(_decode_only, work, chunksize=8)
        return len(work) / (time.perf_counter() - start)


def pipeline(urls: list[str], workers: int, batch_size: int, batches: int, seed: int) -> tuple[float, list[str]]:
    """Clips/s of the loader, and the keys of the clips it delivered while timed."""
    stream = TrainStream(urls, SPEC, batch_size, seed=seed, shuffle_buffer=32)
    loader = iter(make_loader(stream, workers, prefetch_batches=2))
    for _ in range(max(1, workers) * 2):  # warm-up: worker start, shuffle buffers filling
        next(loader)
    start = time.perf_counter()
    keys = [key for batch in itertools.islice(loader, batches) for key in batch.keys]
    return len(keys) / (time.perf_counter() - start), keys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default=None, help="training shards (default: synthesize 400 clips)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=80)
    parser.add_argument("--rounds", type=int, default=7)
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
    rounds = []
    for seed in range(args.rounds):  # interleaved, so drifts in machine load hit both sides alike
        pipeline_rate, keys = pipeline(urls, args.workers, args.batch_size, args.batches, seed)
        ceiling_rate = ceiling([clip_bytes[key] for key in keys], max(1, args.workers))
        rounds.append((pipeline_rate / ceiling_rate, ceiling_rate, pipeline_rate))
    ratio, ceiling_rate, pipeline_rate = sorted(rounds)[len(rounds) // 2]
    print(f"decode-only ceiling : {ceiling_rate:7.1f} clips/s  ({args.workers} processes, in-memory bytes)")
    print(f"full pipeline       : {pipeline_rate:7.1f} clips/s  ({args.workers} DataLoader workers, shards)")
    print(
        f"ratio               : {ratio:.2f}  (median of {len(rounds)} rounds: "
        f"{', '.join(f'{r[0]:.2f}' for r in rounds)}; target >= 0.9)"
    )
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
