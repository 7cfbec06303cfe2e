"""Teacher-cache records: what `vaemo teacher-cache` stores per sample, and how a stream reads it back.

A cache is a folder of tar shards named like the source shards they cover (`CACHE/train-000003.tar`
covers `.../train/train-000003.tar`) plus `teacher-cache.json`, the manifest. Each cached sample has
the source sample's key and two files:

- `KEY.teacher.json`: {"fingerprint": hex, "sequences": [[prompt, response], ...], "lengths": [n, ...]}:
  the prompts the teacher answered and how many response positions each one has;
- `KEY.teacher.npz`: `ids` (N, k) int32, `logprobs` (N, k) float32 at the distillation temperature,
  `tail` (N,) float32 (log of the mass outside the top k), N = sum(lengths), sequences in order.

Training streams read a cache shard beside each source shard and merge its files into the samples by
key (`with_cache`), so the clip itself is never copied.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass

import numpy as np

from vaemo.data.tars import ShardError, read_shard

TEACHER_JSON = "teacher.json"
TEACHER_NPZ = "teacher.npz"
MANIFEST = "teacher-cache.json"


@dataclass
class TeacherRecord:
    fingerprint: str
    sequences: list[tuple[str, str]]  # (prompt, response) pairs the teacher answered, in order
    lengths: list[int]  # response positions of each sequence
    ids: np.ndarray  # (N, k) int32
    logprobs: np.ndarray  # (N, k) float32
    tail: np.ndarray  # (N,) float32


def encode_record(record: TeacherRecord) -> dict[str, bytes]:
    """The two files of one cached sample, by extension."""
    buffer = io.BytesIO()
    np.savez(
        buffer, ids=record.ids.astype(np.int32), logprobs=record.logprobs.astype(np.float32), tail=record.tail.astype(np.float32)
    )
    meta = {"fingerprint": record.fingerprint, "sequences": [list(s) for s in record.sequences], "lengths": list(record.lengths)}
    return {TEACHER_JSON: json.dumps(meta).encode(), TEACHER_NPZ: buffer.getvalue()}


def decode_record(files: dict) -> TeacherRecord:
    """Parse a sample's teacher files; ValueError/KeyError when they are damaged."""
    meta = json.loads(files[TEACHER_JSON])
    arrays = np.load(io.BytesIO(files[TEACHER_NPZ]))
    record = TeacherRecord(
        fingerprint=str(meta["fingerprint"]),
        sequences=[tuple(s) for s in meta["sequences"]],
        lengths=[int(n) for n in meta["lengths"]],
        ids=arrays["ids"],
        logprobs=arrays["logprobs"],
        tail=arrays["tail"],
    )
    n = sum(record.lengths)
    if len(record.sequences) != len(record.lengths) or record.ids.shape[0] != n or record.tail.shape != (n,):
        raise ValueError("teacher record sizes disagree")
    return record


def cache_shard_for(source_url: str, cache_dir: str) -> str:
    """The cache shard that covers a source shard: same file name, in the cache folder."""
    return os.path.join(cache_dir, os.path.basename(source_url))


def with_cache(samples, cache_url: str):
    """Merge the cache shard's teacher files into the source samples, by key.

    The cache shard is read whole when its source shard opens (a few MB per thousand clips at k=64);
    a source sample without a cached record passes through as is and is skipped by the decoder.
    """
    cached: dict[str, dict] = {}
    if os.path.exists(cache_url):
        for item in read_shard(cache_url):
            if not isinstance(item, ShardError):
                cached[item["__key__"]] = item
    for item in samples:
        if not isinstance(item, ShardError) and item["__key__"] in cached:
            extra = cached[item["__key__"]]
            item = {**item, **{ext: extra[ext] for ext in (TEACHER_JSON, TEACHER_NPZ) if ext in extra}}
        yield item
