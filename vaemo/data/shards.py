"""`vaemo data pack` (a user's clips -> webdataset shards) and `vaemo data inspect` (what shards hold)."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from vaemo.data.decode import CLIP_EXTENSIONS, DecodeSpec, SkipSample, decode_audio, decode_video, split_sample
from vaemo.data.stream import ShardError, expand_shards, read_shard
from vaemo.errors import UserError


# ----------------------------------------------------------------------------------------------
# pack
# ----------------------------------------------------------------------------------------------


def clip_key(relative: str) -> str:
    """A webdataset key for a clip path: no dots (the key ends at the first dot), no slashes."""
    stem = relative.rsplit(".", 1)[0]
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem.replace(os.sep, "__"))


def read_manifest(path: Path) -> dict[str, dict]:
    """labels.jsonl: one JSON object per line with `clip` (path relative to SRC_DIR) and label fields."""
    if not path.is_file():
        raise UserError(f"manifest '{path}' does not exist")
    labels: dict[str, dict] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            raise UserError(f"manifest '{path}' line {number} is not valid JSON") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("clip"), str):
            raise UserError(f"manifest '{path}' line {number} needs a string field 'clip' (the clip's path)")
        labels[os.path.normpath(entry.pop("clip"))] = entry
    return labels


@dataclass
class PackReport:
    clips: int = 0
    labelled: int = 0
    shards: int = 0
    unmatched_manifest: list[str] = field(default_factory=list)
    ignored_files: int = 0


def pack(src: str | Path, out: str | Path, manifest: str | Path | None = None, shard_size: int = 100,
         prefix: str = "shard") -> PackReport:
    """Pack SRC's clips (any depth) with their labels into OUT/{prefix}-NNNNNN.tar.

    Labels come from the manifest, else from a sidecar `clip.json` next to the clip. Every field is
    kept; `source` records the clip's relative path.
    """
    import webdataset as wds

    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise UserError(f"source folder '{src}' does not exist")
    if shard_size < 1:
        raise UserError("--shard-size must be >= 1")
    labels = read_manifest(Path(manifest)) if manifest else {}
    report = PackReport()
    clips: list[str] = []
    for root, _, files in os.walk(src):
        for name in sorted(files):
            rel = os.path.normpath(os.path.relpath(os.path.join(root, name), src))
            if name.rsplit(".", 1)[-1].lower() in CLIP_EXTENSIONS:
                clips.append(rel)
            elif not name.endswith(".json"):
                report.ignored_files += 1
    clips.sort()
    if not clips:
        raise UserError(f"source folder '{src}' holds no clip ({', '.join(CLIP_EXTENSIONS)})")
    keys = [clip_key(c) for c in clips]
    duplicates = [k for k, n in Counter(keys).items() if n > 1]
    if duplicates:
        raise UserError(f"clips map to the same key '{duplicates[0]}'; rename one of them")
    out.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(out / f"{prefix}-%06d.tar"), maxcount=shard_size, verbose=0, mtime=0.0,
                         encoder=False) as sink:
        for rel, key in zip(clips, keys):
            meta = dict(labels.get(rel, {}))
            sidecar = src / (rel.rsplit(".", 1)[0] + ".json")
            if not meta and sidecar.is_file():
                try:
                    meta = json.loads(sidecar.read_text())
                except ValueError:
                    raise UserError(f"label file '{sidecar}' is not valid JSON") from None
            if meta:
                report.labelled += 1
            meta.setdefault("source", rel)
            ext = rel.rsplit(".", 1)[-1].lower()
            sink.write({"__key__": key, ext: (src / rel).read_bytes(), "json": json.dumps(meta).encode()})
            report.clips += 1
    report.shards = len(list(out.glob(f"{prefix}-*.tar")))
    report.unmatched_manifest = sorted(set(labels) - set(clips))
    return report


# ----------------------------------------------------------------------------------------------
# inspect
# ----------------------------------------------------------------------------------------------

_PROBE = DecodeSpec(num_frames=2, height=32, width=32, audio_seconds=1.0, need_video=False, need_audio=False)


def inspect_sample(sample: dict) -> str:
    """'audio_visual' | 'visual_only' | 'audio_only' for a usable sample; raises SkipSample otherwise."""
    _, raw, _ = split_sample(sample)
    video, _ = decode_video(raw, _PROBE)
    audio, _, _ = decode_audio(raw, _PROBE)
    if video is None and audio is None:
        raise SkipSample("corrupt_clip", "neither a video nor an audio stream")
    if video is None:
        return "audio_only"
    return "visual_only" if audio is None else "audio_visual"


def _inspect_shard(url: str) -> dict:
    counts = {"samples": 0, "ok": 0, "skipped": Counter(), "modalities": Counter(), "read": False}
    for item in read_shard(url):
        if isinstance(item, ShardError):
            counts["skipped"]["unreadable_shard"] += 1
            continue
        counts["read"] = True
        counts["samples"] += 1
        try:
            counts["modalities"][inspect_sample(item)] += 1
            counts["ok"] += 1
        except SkipSample as skip:
            counts["skipped"][skip.reason] += 1
    return counts


def inspect_shards(shards: list[str], workers: int = 0) -> dict:
    """Counts over all samples of the shards: {samples, ok, skipped{reason}, modalities{...}, shards}."""
    urls = [u for spec in shards for u in expand_shards(spec)]
    workers = min(len(urls), workers or os.cpu_count() or 1)
    if workers > 1:
        with get_context("spawn").Pool(workers) as pool:
            parts = pool.map(_inspect_shard, urls)
    else:
        parts = [_inspect_shard(u) for u in urls]
    total = {"samples": 0, "ok": 0, "skipped": Counter(), "modalities": Counter()}
    readable = 0
    for part in parts:
        total["samples"] += part["samples"]
        total["ok"] += part["ok"]
        total["skipped"].update(part["skipped"])
        total["modalities"].update(part["modalities"])
        readable += part["read"]
    return {"samples": total["samples"], "ok": total["ok"], "skipped": dict(total["skipped"]),
            "modalities": dict(total["modalities"]), "shards": len(urls), "readable_shards": readable}
