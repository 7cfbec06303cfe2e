"""What a stage costs before and after its steps, and what Ray Train's health-check interval costs per step.

    .venv/bin/python bench/stage_start.py --world runs/demo/data --runs 3
    .venv/bin/python bench/stage_start.py --world runs/demo/data --poll 2.0 0.2 --steps 100 --rounds 2

The first form runs a 2-step stage 0 `--runs` times in one Ray instance (as `make science` runs its stages)
and prints each run's wall time; with 2 steps nearly all of it is the fixed cost every stage pays: Ray
Train's controller and helper actors, the workers' imports, building the engine, the export and the
shutdown. `make science` pays it for each of its 12 training runs.

The second form runs a `--steps` stage 0 under each RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, legs alternating,
and prints seconds per step after step 20 from the run's own metrics, each interval's mean over rounds, and
each one's ratio to the first interval's. A shorter interval answers `ray.train.report` sooner (checkpoints,
the end of a run) but polls the workers more often during every step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

INTERVAL = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def main() -> None:
    from decoded_cache import seconds_per_step  # bench/, this script's folder

    from vaemo.cluster import connect_ray
    from vaemo.train.launch import run_stage

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs/tiny.yaml"))
    p.add_argument("--world", required=True, help="a world folder with train/ and val/ (vaemo data synth)")
    p.add_argument("--runs", type=int, default=3, help="2-step runs (the fixed cost)")
    p.add_argument("--poll", type=float, nargs="+", default=[], help="health-check intervals to compare (seconds)")
    p.add_argument("--steps", type=int, default=100, help="steps of each --poll leg")
    p.add_argument("--rounds", type=int, default=2, help="rounds of --poll legs")
    args = p.parse_args()

    world = Path(args.world).resolve()
    data = [
        f"data.train_shards={world}/train/*.tar",
        f"data.val_shards={world}/val/*.tar",
        f"data.bench_dir={world}/bench",
        "train.val_batches=0",
    ]
    connect_ray()
    time.sleep(20)  # the dashboard's processes finish starting; a stage started at once would share the CPU with them
    out = Path(tempfile.mkdtemp(prefix="vaemo-stage-start-"))
    if not args.poll:
        walls = []
        for run in range(args.runs):
            started = time.time()
            run_stage(0, args.config, out / f"run{run}", [*data, "train.max_steps=2"], overwrite=True)
            walls.append(time.time() - started)
            print(f"run {run}: {walls[-1]:.1f} s for a 2-step stage 0", flush=True)
        later = walls[1:] or walls
        shown = ", ".join(f"{w:.1f}" for w in later)
        print(f"fixed cost of a stage: {statistics.mean(later):.1f} s (runs after the first: {shown})")
        return
    per_interval: dict[float, list[float]] = {interval: [] for interval in args.poll}
    steps = [*data, f"train.max_steps={args.steps}", f"train.checkpoint_every={args.steps}", "train.report_every=20"]
    for round_ in range(args.rounds):
        for interval in args.poll:
            os.environ[INTERVAL] = str(interval)  # the controller reads it from the driver when the stage starts
            run_dir = out / f"poll{interval}-r{round_}"
            run_stage(0, args.config, run_dir, steps, overwrite=True)
            per_interval[interval].append(seconds_per_step(run_dir, 20))
            print(f"round {round_}, interval {interval:g} s: {per_interval[interval][-1]:.3f} s/step", flush=True)
    base = statistics.mean(per_interval[args.poll[0]])
    for interval, values in per_interval.items():
        mean = statistics.mean(values)
        print(
            f"interval {interval:g} s: {mean:.3f} s/step over {len(values)} legs, ratio to {args.poll[0]:g} s: {mean / base:.3f}"
        )


if __name__ == "__main__":
    main()
