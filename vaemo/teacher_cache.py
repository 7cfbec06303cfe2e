"""Offline teacher cache for stage 1: run the frozen visual teacher once, train the audio pathway from disk.

`vaemo teacher-cache --config PRESET --stage1-overrides... --out CACHE` (or jobs/teacher_cache.py) reads
the stage-1 config (starting model, frame sampling, stage1.topk/temperature/questions), sends whole
shards to a pool of Ray actors that each hold one frozen model, and writes one cache shard per source
shard plus CACHE/teacher-cache.json (file formats: vaemo/data/teacher_records.py). Stage 1 with
`stage1.teacher.mode=cache stage1.teacher.cache_dir=CACHE` then builds no vision tower and runs no
teacher pass.

A cache is keyed by a fingerprint of everything that shapes the teacher's outputs
(vaemo/cache_fingerprint.py); training refuses a cache whose fingerprint differs, naming what changed.

Each clip gets fixed prompts, drawn from a generator seeded by its key (online, prompts vary per step).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import time
from collections import Counter
from pathlib import Path

import numpy as np

from vaemo import progress
from vaemo.cache_fingerprint import fingerprint
from vaemo.config import Config, config_from_dict, config_to_dict, load_config
from vaemo.data.teacher_records import MANIFEST, TeacherRecord, cache_shard_for, encode_record
from vaemo.errors import UserError

# ----------------------------------------------------------------------------------------------
# Writing a cache
# ----------------------------------------------------------------------------------------------


def key_rng(key: str) -> np.random.Generator:
    """Fixed prompts per clip: the generator depends only on the sample's key."""
    return np.random.default_rng(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little"))


def teacher_records(model, cfg: Config, batch, key: str) -> list[TeacherRecord]:
    """The frozen teacher's top-k targets for each clip of a batch (fixed prompts per clip key)."""
    import torch

    from vaemo.losses import teacher_topk
    from vaemo.model import PromptItem
    from vaemo.train.objectives import align_sequences, write_teacher_responses

    s = cfg.stage1
    asked = [
        (p, r, i)
        for i, (clip, meta) in enumerate(zip(batch.keys, batch.meta))
        for p, r in align_sequences(meta, key_rng(clip), cfg.prompts, s.questions, s.responses)
    ]
    asked = write_teacher_responses(model, batch, asked, s.teacher_response_tokens, lockstep=False)
    plans = [[(p, r) for p, r, i in asked if i == clip] for clip in range(len(batch))]
    items = [PromptItem("visual", p, r, i) for p, r, i in asked]
    inputs = model.prompts.batch(items, batch.video, None, batch.duration)
    with torch.no_grad():
        hidden = model(inputs).hidden[inputs.pred_mask.to(model.vlm.device)]
        targets = teacher_topk(hidden, model.logits, s.topk, s.temperature, s.kd_chunk_size)
    lengths = inputs.response_lengths()
    bounds = np.cumsum([0, *lengths])
    out, row = [], 0
    for plan in plans:
        start, stop = bounds[row], bounds[row + len(plan)]
        out.append(
            TeacherRecord(
                key,
                plan,
                lengths[row : row + len(plan)],
                targets.ids[start:stop].cpu().numpy(),
                targets.logprobs[start:stop].cpu().numpy(),
                targets.tail[start:stop].cpu().numpy(),
            )
        )
        row += len(plan)
    return out


class TeacherCacheWriter:
    """Holds one frozen teacher and turns source shards into cache shards (a Ray actor, or in-process)."""

    def __init__(self, config: dict, out_dir: str, threads: int = 1):
        import torch

        from vaemo.data.decode import DecodeSpec
        from vaemo.model import build_model

        torch.set_num_threads(max(1, threads))
        self.cfg = config_from_dict(config)
        self.out_dir = out_dir
        self.device = "cuda" if self.cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu"
        self.model = build_model(self.cfg.model, self.cfg.data, seed=self.cfg.seed).to(self.device).eval()
        self.fingerprint = fingerprint(self.cfg)[0]
        d = self.cfg.data
        self.spec = DecodeSpec.for_data(
            d,
            need_video=True,
            need_audio=False,  # the teacher sees frames
            need_fields=("caption",) if self.cfg.stage1.responses == "caption" else (),
        )

    def write_shard(self, url: str) -> dict:
        """Cache one source shard (atomically: a half-written cache shard never has the final name)."""
        from vaemo.data.stream import _decode_into_batches
        from vaemo.data.tars import ShardWriter, read_shard

        skips: Counter = Counter()
        with ShardWriter(cache_shard_for(url, self.out_dir)) as shard:
            batches = _decode_into_batches(
                read_shard(url),
                self.spec,
                self.cfg.data.batch_size,
                0,
                skips,
                final_partial=True,
                limit_s=self.cfg.data.decode_timeout_s,
            )
            for batch in batches:
                if not len(batch):
                    continue
                for key, record in zip(batch.keys, teacher_records(self.model, self.cfg, batch, self.fingerprint)):
                    shard.write(key, encode_record(record))
        return {
            "shard": os.path.basename(url),
            "path": cache_shard_for(url, self.out_dir),
            "node": socket.gethostname(),
            "cached": shard.samples,
            "skipped": dict(skips),
        }


def check_driver_sees(report: dict) -> None:
    """The cache shard an actor reports is where the driver can read it: an actor on a node whose --out is not
    the shared folder writes a shard nobody else sees, and a manifest listing it would pass for a whole cache."""
    if not os.path.isfile(report["path"]):
        raise UserError(
            f"the teacher-cache shard written on node {report['node']} ({report['path']}) is not there on this node: "
            "--out must be on storage every node sees at the same path"
        )


def build_cache(cfg: Config, shards: list[str], out: str | Path, actors: int = 2, cpus_per_actor: float = 1.0) -> dict:
    """Write the cache for `shards` into `out`; returns the manifest."""
    from vaemo.data.stream import expand_shards

    urls = expand_shards(shards)
    names = [os.path.basename(u) for u in urls]
    if len(set(names)) != len(names):
        raise UserError("--shards name two shards with the same file name; cache them into separate --out folders")
    out = Path(out).expanduser().resolve()  # the actors write there from their own working directories
    out.mkdir(parents=True, exist_ok=True)
    key, parts = fingerprint(cfg)
    manifest_path = out / MANIFEST
    previous = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    if previous and previous.get("fingerprint") != key:
        raise UserError(
            f"--out '{out}' holds a teacher cache for another fingerprint ({previous.get('fingerprint')}); "
            f"choose another --out or delete it"
        )
    manifest_path.unlink(missing_ok=True)  # absent while shards are (re)written: an interrupted cache is refused
    started = time.time()
    config = config_to_dict(cfg)
    reports: list[dict] = []
    with progress.task(f"teacher cache ({len(urls)} shards)", len(urls)) as update:
        if actors == 0:
            writer = TeacherCacheWriter(config, str(out), int(cpus_per_actor))
            for done, url in enumerate(urls, 1):
                reports.append(writer.write_shard(url))
                update(done)
        else:
            import ray

            from vaemo.cluster import check_nodes_see, connect_ray, map_on_actors

            connect_ray()
            # one GPU an actor where the cluster has GPUs, or will have them (scaling.autoscaling)
            gpus = float(cfg.scaling.use_gpu and (cfg.scaling.autoscaling or ray.cluster_resources().get("GPU", 0) >= 1))
            # every node that could host an actor sees the shards, the models and --out, before any model loads
            model_paths = [(f"model.{name}", getattr(cfg.model, name) or "") for name in ("vlm", "audio_encoder", "init_from")]
            per_actor = {"CPU": cpus_per_actor, "GPU": gpus}
            check_nodes_see([("--shards", url) for url in urls] + model_paths, ("--out", out), per_actor)
            work = map_on_actors(
                TeacherCacheWriter,
                (config, str(out), int(cpus_per_actor)),
                "write_shard",
                urls,
                actors,
                cpus_per_actor,
                gpus,
                cfg.scaling.autoscaling,
            )
            for done, report in enumerate(work, 1):
                check_driver_sees(report)
                reports.append(report)
                update(done)
    skipped: Counter = Counter()
    for r in reports:
        skipped.update(r["skipped"])
    shards_done = {
        **previous.get("shards", {}),
        **{r["shard"]: {"cached": r["cached"], "skipped": r["skipped"]} for r in reports},
    }
    manifest = {
        "fingerprint": key,
        "parts": parts,
        "shards": dict(sorted(shards_done.items())),
        "cached": sum(v["cached"] for v in shards_done.values()),
        "seconds": round(time.time() - started, 1),
    }
    manifest_path.write_text(json.dumps(manifest, indent=1))
    progress.log(
        f"cached the teacher for {sum(r['cached'] for r in reports)} clips in {out} "
        f"(fingerprint {key}; skipped {dict(skipped) or 'none'})"
    )
    return manifest


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def add_cache_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="the stage-1 preset (model, frames, stage1.topk/temperature)")
    p.add_argument("--out", required=True, help="cache folder: one shard per source shard + teacher-cache.json")
    p.add_argument(
        "--shards",
        action="append",
        default=[],
        help="source shards (brace/glob; repeatable); default: data.train_shards and data.val_shards",
    )
    p.add_argument("--actors", type=int, default=2, help="Ray actors, one frozen teacher each (0: in-process)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs Ray reserves per actor")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (as for jobs/stage1.py)")


def cache_config(config: str, overrides: list[str]) -> Config:
    """The stage-1 config a cache is written for; one line naming the field when it stores nothing."""
    cfg = load_config(config, overrides, stage=1)
    if cfg.stage1.topk <= 0:
        raise UserError(
            f"config field 'stage1.topk' of {config} must be > 0 for a teacher cache (it stores the top-k; "
            "or run stage 1's teacher online: stage1.teacher.mode=online, or jobs/demo.py --stage1-teacher online)"
        )
    return cfg


def default_shards(cfg: Config) -> list[str]:
    """The clips a stage-1 run reads: its train shards, and its val shards when it has them."""
    return [s for s in (cfg.data.train_shards, cfg.data.val_shards) if s]


def run_cache(args: argparse.Namespace) -> int:
    from vaemo.args import output_folder

    if args.actors < 0:
        raise UserError("--actors must be >= 0")
    cfg = cache_config(args.config, args.overrides)
    from vaemo.model.build import check_checkpoint_folders

    check_checkpoint_folders(cfg.model, cfg.data.audio_seconds)
    build_cache(cfg, args.shards or default_shards(cfg), output_folder(args.out), args.actors, args.cpus_per_actor)
    return 0


def main(argv: list[str] | None = None) -> int:
    from vaemo.args import ArgParser
    from vaemo.errors import exit_on_user_error

    parser = ArgParser(prog="jobs/teacher_cache.py", description="Run stage 1's frozen teacher once; write its top-k.")
    add_cache_args(parser)
    return exit_on_user_error(run_cache)(parser.parse_args(argv))
