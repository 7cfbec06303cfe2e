"""What keeping decoded clips in memory (`data.decoded_cache_mb`) saves a stage that reads its clips for
several epochs: the same stage run with and without it, legs alternating, timed from the end of its first
epoch (before that, both decode every clip) to its last step, from the run's own metrics.

    .venv/bin/python bench/decoded_cache.py --world runs/demo/data --stage 0 --steps 450 --rounds 1

Prints seconds per step of each leg and their ratio (kept / decoded every draw: below 1 is a saving). The
ratio, not the seconds, carries to another machine of the same core count.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def seconds_per_step(run_dir: Path, after_step: int) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "elapsed_s" in r]
    first = next(r for r in rows if r["step"] >= after_step)
    last = rows[-1]
    return (last["elapsed_s"] - first["elapsed_s"]) / (last["step"] - first["step"])


def main() -> None:
    from vaemo.config import load_config
    from vaemo.data.stream import expand_shards
    from vaemo.data.tars import ShardError, read_shard
    from vaemo.train.launch import run_stage

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs/tiny.yaml"))
    p.add_argument("--world", required=True, help="a world folder with train/ and val/ (vaemo data synth)")
    p.add_argument("--stage", type=int, default=0, choices=[0, 1, 2])
    p.add_argument("--init-from", default="", help="the previous stage's export (stages 1 and 2)")
    p.add_argument("--steps", type=int, default=450)
    p.add_argument("--cache-mb", type=int, default=1024, help="data.decoded_cache_mb of the kept leg")
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args()

    world = Path(args.world).resolve()
    overrides = [
        f"data.train_shards={world}/train/*.tar",
        f"data.val_shards={world}/val/*.tar",
        f"data.bench_dir={world}/bench",
        f"train.max_steps={args.steps}",
        f"train.checkpoint_every={args.steps}",
        *([f"model.init_from={args.init_from}"] if args.init_from else []),
    ]
    cfg = load_config(args.config, overrides, stage=args.stage)
    clips = sum(not isinstance(s, ShardError) for url in expand_shards(cfg.data.train_shards) for s in read_shard(url))
    epoch_steps = -(-clips // (cfg.data.batch_size * cfg.scaling.num_workers))
    if args.steps < 2 * epoch_steps:
        raise SystemExit(f"--steps {args.steps} leaves no time after the first epoch ({epoch_steps} steps)")
    legs: dict[int, list[float]] = {0: [], args.cache_mb: []}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for mb in legs:
                out = Path(tmp) / f"r{round_}-{mb}"
                run_stage(args.stage, args.config, out, [*overrides, f"data.decoded_cache_mb={mb}"], overwrite=True)
                legs[mb].append(seconds_per_step(out, epoch_steps + 25))
                print(f"round {round_}: decoded_cache_mb={mb}: {legs[mb][-1]:.3f} s/step after step {epoch_steps + 25}")
    decoded, kept = statistics.median(legs[0]), statistics.median(legs[args.cache_mb])
    print(
        f"stage {args.stage} after its first epoch ({epoch_steps} steps of {args.steps}): {decoded:.3f} s/step decoding "
        f"every draw, {kept:.3f} with kept clips ({args.cache_mb} MiB per loader worker): ratio {kept / decoded:.2f}"
    )


if __name__ == "__main__":
    main()
