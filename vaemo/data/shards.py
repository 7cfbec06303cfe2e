"""`vaemo data pack` (a user's clips -> webdataset shards) and `vaemo data inspect` (what shards hold)."""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Iterator

from vaemo.config import DataConfig
from vaemo.data.decode import (
    CLIP_EXTENSIONS,
    DecodeSpec,
    SkipSample,
    decode_audio,
    decode_sample,
    decode_video,
    split_sample,
)
from vaemo.data.stream import expand_shards
from vaemo.data.tars import ShardError, ShardWriter, read_shard
from vaemo.data.watchdog import decode_within
from vaemo.errors import UserError, read_user_text

# ----------------------------------------------------------------------------------------------
# pack
# ----------------------------------------------------------------------------------------------


def clip_key(relative: str) -> str:
    """A webdataset key for a clip path: no dots (the key ends at the first dot), no slashes, no spaces;
    letters of any script stay (two clips named in Japanese must not both become '___')."""
    stem = relative.rsplit(".", 1)[0]
    return re.sub(r"[^\w-]", "_", stem.replace(os.sep, "__"))


def same_spelling(path: str) -> str:
    """A relative path as pack matches it with the manifest: normalised, and in Unicode's composed form (macOS
    writes file names decomposed: 'café' as 'cafe' plus a combining accent, which a manifest typed elsewhere
    is not). Keys, `source` and messages keep the file system's spelling."""
    return unicodedata.normalize("NFC", os.path.normpath(path))


def read_manifest(path: Path) -> dict[str, dict]:
    """labels.jsonl: one JSON object per line with `clip` (path relative to SRC_DIR) and label fields."""
    if not path.is_file():
        raise UserError(f"manifest '{path}' does not exist")
    labels: dict[str, dict] = {}
    lines: dict[str, int] = {}
    for number, line in enumerate(read_user_text(path, "manifest").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line, parse_constant=_not_json)
        except ValueError as err:
            raise UserError(f"manifest '{path}' line {number} is not valid JSON{_detail(err)}") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("clip"), str):
            raise UserError(f"manifest '{path}' line {number} needs a string field 'clip' (the clip's path)")
        clip = same_spelling(entry.pop("clip"))
        if clip in lines:
            raise UserError(f"manifest '{path}' names the clip '{clip}' twice (lines {lines[clip]} and {number}); keep one line")
        labels[clip], lines[clip] = entry, number
    return labels


class NotJSONValue(ValueError):
    """NaN and Infinity: Python's json reads them, JSON has no such values, and other readers refuse them."""


def _not_json(name: str) -> None:
    raise NotJSONValue(f"{name} is not a JSON value (leave the field out for a missing label)")


def _detail(err: ValueError) -> str:
    """What to add to 'is not valid JSON': the reason where it is not the syntax."""
    return f" ({err})" if isinstance(err, NotJSONValue) else ""


@dataclass
class PackReport:
    clips: int = 0
    labelled: int = 0
    shards: dict[str, int] = field(default_factory=dict)  # split -> shards written
    split_clips: dict[str, int] = field(default_factory=dict)  # split -> clips
    unmatched_manifest: list[str] = field(default_factory=list)
    ignored_files: int = 0
    ignored_types: Counter = field(default_factory=Counter)  # extension -> files left out as not clips
    without_audio: list[str] = field(default_factory=list)
    without_video: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    held_out: list[str] = field(default_factory=list)  # clips whose `split` keeps them out of training
    broken_links: list[str] = field(default_factory=list)


TRAIN_SPLITS = ("train", "training")
VAL_SPLITS = ("val", "valid", "validation", "dev")
HELD_OUT_SPLITS = ("test", "testing", "bench", "benchmark", "eval", "evaluation", "holdout", "heldout", "held-out")


def choose_splits(keys: list[str], metas: list[dict], val_fraction: float, names: list[str] | None = None) -> list[str]:
    """'train', 'val' or 'held_out' per clip: its own `split` field, else a deterministic `val_fraction` of
    the rest (the clips whose key hashes lowest; at least one when the fraction is above zero). A test or
    benchmark clip is never trained on; a `split` pack does not know is an error naming the clip."""
    import hashlib

    splits = []
    for number, meta in enumerate(metas):
        given = str(meta.get("split") or "").strip().lower()  # null: not given
        if given and given not in TRAIN_SPLITS + VAL_SPLITS + HELD_OUT_SPLITS:
            raise UserError(
                f"clip '{(names or keys)[number]}' has split '{meta['split']}'; use train, val (or valid, validation, "
                "dev) or test (held out: not packed), or leave it out to let --val-fraction choose"
            )
        splits.append("val" if given in VAL_SPLITS else "held_out" if given in HELD_OUT_SPLITS else "train" if given else "")
    free = [i for i, s in enumerate(splits) if not s]
    wanted = min(len(free), max(1, round(val_fraction * len(free)))) if val_fraction > 0 and free else 0
    order = sorted(free, key=lambda i: hashlib.sha256(keys[i].encode()).hexdigest())
    for rank, i in enumerate(order):
        splits[i] = "val" if rank < wanted else "train"
    return splits


def streams_of(raw: bytes) -> tuple[bool, bool]:
    """(has video, has audio) of a clip, from its container (no decoding); raises ValueError if unreadable."""
    from torchcodec.decoders import AudioDecoder, VideoDecoder

    def opens(decoder) -> bool:
        try:
            decoder(raw)
            return True
        except ValueError as err:
            if "stream" in str(err).lower():
                return False
            raise
        except RuntimeError as err:
            raise ValueError(str(err)) from None

    return opens(VideoDecoder), opens(AudioDecoder)


def files_under(folder: Path) -> Iterator[Path]:
    """Every file under `folder` at any depth, linked folders and files included, each once, and links to
    nothing (the caller reports them); sorted within each folder. What the tree holds itself is taken at
    its own path (its key, its manifest entry), never through a link to it; what links reach outside the
    tree is taken at the first path that reaches it, so a link back up ends and two links give one clip."""
    inside = {os.path.realpath(folder)}
    for root, folders, files in os.walk(folder):
        inside.update(os.path.realpath(p) for p in (os.path.join(root, n) for n in (*folders, *files)) if not os.path.islink(p))
    taken: set[str] = set()

    def first_visit(path: str) -> bool:
        real = os.path.realpath(path)
        if real in taken or (os.path.islink(path) and real in inside):
            return False
        taken.add(real)  # when a folder is queued, not walked, so that its twin is never queued
        return True

    for root, folders, files in os.walk(folder, followlinks=True):
        folders[:] = [name for name in sorted(folders) if first_visit(os.path.join(root, name))]
        for name in sorted(files):
            if first_visit(os.path.join(root, name)):
                yield Path(root) / name


def pack(
    src: str | Path,
    out: str | Path,
    manifest: str | Path | None = None,
    shard_size: int = 100,
    val_fraction: float = 0.05,
    workers: int = 2,
) -> PackReport:
    """Pack SRC's clips (any depth) with their labels into OUT/train-NNNNNN.tar and OUT/val-NNNNNN.tar.

    Labels come from a sidecar `clip.json` next to the clip and from the manifest, the manifest's value where
    both give a field; every field is kept and `source` records the clip's relative path. A clip's `split`
    field chooses its split, else `val_fraction` of the clips go to val. Each split gets at least `workers`
    shards when it has that many clips (every training worker reads its own shards), smaller shards if need be.
    """

    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise UserError(f"source folder '{src}' " + ("is a file; give the folder of clips" if src.exists() else "does not exist"))
    if shard_size < 1:
        raise UserError("--shard-size must be >= 1")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError("--val-fraction must be in [0, 1)")
    if workers < 1:
        raise UserError("--workers must be >= 1")
    labels = read_manifest(Path(manifest)) if manifest else {}
    report = PackReport()
    clips: list[str] = []
    for path in files_under(src):
        rel = os.path.normpath(os.path.relpath(path, src))
        ext = path.name.rsplit(".", 1)[-1].lower() if "." in path.name else ""
        if not path.exists():
            report.broken_links.append(rel)
        elif ext in CLIP_EXTENSIONS:
            clips.append(rel)
        elif ext != "json":
            report.ignored_files += 1
            report.ignored_types[f".{ext}" if ext else "(no extension)"] += 1
    clips.sort()
    if not clips:
        raise UserError(f"source folder '{src}' holds no clip ({', '.join(CLIP_EXTENSIONS)})")
    keys = [clip_key(c) for c in clips]
    duplicates = [k for k, n in Counter(keys).items() if n > 1]
    if duplicates:
        named = [clip for clip, key in zip(clips, keys) if key == duplicates[0]]
        raise UserError(f"clips '{named[0]}' and '{named[1]}' map to the same key '{duplicates[0]}'; rename one of them")
    metas = []
    for rel in clips:
        meta: dict = {}
        sidecar = src / (rel.rsplit(".", 1)[0] + ".json")
        if sidecar.is_file():
            try:
                meta = json.loads(read_user_text(sidecar, "label file"), parse_constant=_not_json)
            except ValueError as err:
                raise UserError(f"label file '{sidecar}' is not valid JSON{_detail(err)}") from None
            if not isinstance(meta, dict):
                raise UserError(f"label file '{sidecar}' holds {type(meta).__name__}, not a JSON object of label fields")
        meta.update(labels.get(same_spelling(rel), {}))
        meta.setdefault("source", rel)
        metas.append(meta)
    splits = choose_splits(keys, metas, val_fraction, clips)
    report.held_out = [clips[i] for i, split in enumerate(splits) if split == "held_out"]
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        members = [i for i, s in enumerate(splits) if s == split]
        for old in out.glob(f"{split}-*.tar"):
            old.unlink()
        if not members:
            continue
        shards = max(min(workers, len(members)), -(-len(members) // shard_size))
        per_shard = -(-len(members) // shards)
        for number, first in enumerate(range(0, len(members), per_shard)):
            with ShardWriter(out / f"{split}-{number:06d}.tar") as shard:
                for i in members[first : first + per_shard]:
                    rel, key, meta = clips[i], keys[i], metas[i]
                    raw = (src / rel).read_bytes()
                    try:
                        has_video, has_audio = streams_of(raw)
                        if not has_video:
                            report.without_video.append(rel)
                        if not has_audio:
                            report.without_audio.append(rel)
                    except ValueError:
                        report.unreadable.append(rel)
                    ext = rel.rsplit(".", 1)[-1].lower()
                    shard.write(key, {ext: raw, "json": json.dumps(meta).encode()})
                    report.clips += 1
        report.shards[split] = len(list(out.glob(f"{split}-*.tar")))
        report.split_clips[split] = len(members)
    report.unmatched_manifest = sorted(set(labels) - {same_spelling(clip) for clip in clips})
    report.labelled = sum(1 for i, meta in enumerate(metas) if splits[i] != "held_out" and set(meta) - {"source", "split"})
    return report


# ----------------------------------------------------------------------------------------------
# inspect
# ----------------------------------------------------------------------------------------------

_PROBE = DecodeSpec(num_frames=2, height=32, width=32, audio_seconds=1.0, need_video=False, need_audio=False)


def inspect_sample(sample: dict) -> str:
    """'audio_visual' | 'visual_only' | 'audio_only' for a usable sample; raises SkipSample otherwise."""
    _, raw, _ = split_sample(sample)
    video, _ = decode_video(raw, _PROBE)
    audio = decode_audio(raw, _PROBE)[0]
    if video is None and audio is None:
        raise SkipSample("corrupt_clip", "neither a video nor an audio stream")
    if video is None:
        return "audio_only"
    return "visual_only" if audio is None else "audio_visual"


def _inspect_shard(url: str, stage_spec: DecodeSpec | None = None) -> dict:
    within = partial(decode_within, DataConfig().decode_timeout_s, source=url)  # a clip that hangs FFmpeg is skipped
    counts = {
        "samples": 0,
        "ok": 0,
        "skipped": Counter(),
        "modalities": Counter(),
        "read": False,
        "usable": 0,
        "unusable": Counter(),
        "examples": {},  # reason -> the first few samples skipped for it, named
    }

    def named(skip: SkipSample, key: str) -> None:
        examples = counts["examples"].setdefault(skip.reason, [])
        example = f"{url}: {key}" + (f" ({skip.detail})" if skip.detail else "")
        if len(examples) < EXAMPLES_PER_REASON and example not in examples:  # a clip both checks skip: once
            examples.append(example)

    for item in read_shard(url):
        if isinstance(item, ShardError):
            counts["skipped"]["unreadable_shard"] += 1
            counts["examples"].setdefault("unreadable_shard", []).append(f"{url} ({item.detail})")
            continue
        counts["read"] = True
        counts["samples"] += 1
        key = item.get("__key__", "")
        try:
            counts["modalities"][within(partial(inspect_sample, item), key=key)] += 1
            counts["ok"] += 1
        except SkipSample as skip:
            counts["skipped"][skip.reason] += 1
            named(skip, key)
        if stage_spec is not None:
            try:
                within(partial(decode_sample, item, stage_spec), key=key)
                counts["usable"] += 1
            except SkipSample as skip:
                counts["unusable"][skip.reason] += 1
                named(skip, key)
    return counts


EXAMPLES_PER_REASON = 3


def inspect_shards(shards: list[str], workers: int = 0, stage_spec: DecodeSpec | None = None) -> dict:
    """Counts over all samples of the shards: {samples, ok, skipped{reason}, modalities{...}, shards}; with
    `stage_spec` (a stage's DecodeSpec), also how many samples that stage can use and why not the others."""
    urls = [u for spec in shards for u in expand_shards(spec)]
    workers = min(len(urls), workers or os.cpu_count() or 1)
    inspect_one = partial(_inspect_shard, stage_spec=stage_spec)
    if workers > 1:
        with get_context("spawn").Pool(workers) as pool:
            parts = pool.map(inspect_one, urls)
    else:
        parts = [inspect_one(u) for u in urls]
    total = {"samples": 0, "ok": 0, "skipped": Counter(), "modalities": Counter(), "usable": 0, "unusable": Counter()}
    readable = 0
    examples: dict[str, list[str]] = {}
    for part in parts:
        for name in ("samples", "ok", "usable"):
            total[name] += part[name]
        for name in ("skipped", "modalities", "unusable"):
            total[name].update(part[name])
        readable += part["read"]
        for reason, named in part["examples"].items():
            kept = examples.setdefault(reason, [])
            kept.extend(named[: EXAMPLES_PER_REASON - len(kept)])
    report = {
        "samples": total["samples"],
        "ok": total["ok"],
        "skipped": dict(total["skipped"]),
        "modalities": dict(total["modalities"]),
        "shards": len(urls),
        "readable_shards": readable,
        "examples": examples,  # the first few samples skipped per reason: "shard: key (detail)"
    }
    if stage_spec is not None:
        report["stage"] = {"usable": total["usable"], "skipped": dict(total["unusable"])}
    return report
