"""Which teacher wrote a stage-1 teacher cache, and the check that training reads a matching one.

A cache is keyed by a fingerprint of everything that shapes the teacher's outputs: the starting model (a
digest of its files, or the tiny config and seed), the prompt template and prompt sets, frame sampling, k
and the temperature. Training refuses a cache whose fingerprint differs, naming what changed. Writing a
cache is vaemo/teacher_cache.py's; this module sits below it so that the stage objectives and the launcher
can check a cache without importing the writer (and its Ray actors).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from dataclasses import asdict
from pathlib import Path

from vaemo.config import Config
from vaemo.data.teacher_records import MANIFEST, cache_shard_for
from vaemo.errors import UserError
from vaemo.model.prompts import PromptBuilder

FINGERPRINT_VERSION = 3
WHOLE_FILE_LIMIT = 4 << 20  # files above this are digested from evenly spaced blocks (weights are GBs)
BLOCKS, BLOCK = 16, 64 << 10


def folder_digest(path: str | Path) -> str:
    """A digest of a model folder: every file's name and size, small files whole, large ones by blocks."""
    root = Path(path)
    h = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        size = file.stat().st_size
        h.update(f"{file.relative_to(root)}\0{size}\0".encode())
        with open(file, "rb") as f:
            if size <= WHOLE_FILE_LIMIT:
                h.update(f.read())
            else:
                for i in range(BLOCKS):
                    f.seek((size - BLOCK) * i // (BLOCKS - 1))
                    h.update(f.read(BLOCK))
    return h.hexdigest()


def fingerprint_parts(cfg: Config) -> dict:
    m, d, s = cfg.model, cfg.data, cfg.stage1
    if m.init_from:
        model = {"init_from": folder_digest(m.init_from)}
    elif m.vlm == "tiny":
        model = {"tiny_vlm": asdict(m.tiny_vlm), "tiny_audio": asdict(m.tiny_audio), "seed": cfg.seed}
    else:
        model = {"vlm": folder_digest(m.vlm)}
    prompts = {
        "template": hashlib.sha256(inspect.getsource(PromptBuilder).encode()).hexdigest(),
        "system_prompt": m.system_prompt,
        "max_response_tokens": m.max_response_tokens,
        "describe": list(cfg.prompts.describe),
        "questions": s.questions,
        "sets": cfg.prompts.questions,
        "responses": s.responses,
        "teacher_response_tokens": s.teacher_response_tokens,
    }
    frames = {
        "num_frames": d.num_frames,
        "frame_height": d.frame_height,
        "frame_width": d.frame_width,
        "frame_sampling": d.frame_sampling,
        "pair_seconds": d.pair_seconds,
        "frame_fit": d.frame_fit,
        # the frames come from the clip's audio window: another length shows the teacher another stretch of time
        "audio_seconds": d.audio_seconds,
    }
    return {
        "version": FINGERPRINT_VERSION,
        "model": model,
        "prompts": prompts,
        "frames": frames,
        "topk": s.topk,
        "temperature": s.temperature,
    }


def fingerprint(cfg: Config) -> tuple[str, dict]:
    parts = fingerprint_parts(cfg)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16], parts


def _flat(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def check_cache(cfg: Config, shard_urls: list[str]) -> None:
    """Refuse (exit 2) a cache that is missing, stale, or lacks a shard this run reads."""
    cache = Path(cfg.stage1.teacher.cache_dir)
    manifest_path = cache / MANIFEST
    if not manifest_path.is_file():
        raise UserError(
            f"stage1.teacher.cache_dir '{cache}' holds no {MANIFEST}: write it with "
            f"`vaemo teacher-cache` (or jobs/teacher_cache.py) first"
        )
    manifest = json.loads(manifest_path.read_text())
    wanted, parts = fingerprint(cfg)
    if manifest.get("fingerprint") != wanted:
        old, new = _flat(manifest.get("parts", {})), _flat(parts)
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise UserError(
            f"stale teacher cache '{cache}': made for another {', '.join(changed[:4]) or 'fingerprint'} "
            f"than this run uses; rebuild it with `vaemo teacher-cache`"
        )
    missing = [u for u in shard_urls if not os.path.exists(cache_shard_for(u, str(cache)))]
    if missing:
        raise UserError(
            f"teacher cache '{cache}' does not cover shard '{missing[0]}' ({len(missing)} missing); "
            f"run `vaemo teacher-cache` over it"
        )
