"""Stage 1 from captions vs from responses the frozen teacher writes itself (no label at all), tiny world.

Both start from the same stage-0 export and run the tiny preset's stage 1 (`stage1.responses=caption` or
`teacher`) for each seed (training seed: data order, prompts), then score the benchmark. Prints audio
content and emotion accuracy per mode and seed, the mean and the spread between seeds.

    .venv/bin/python bench/stage1_responses.py --stage0 runs/demo/stage0/export --data runs/demo/data --seeds 0 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vaemo import progress  # noqa: E402
from vaemo.config import project_root  # noqa: E402
from vaemo.demo import score, train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage0", required=True, help="a stage-0 export (runs/demo/stage0/export)")
    parser.add_argument("--data", required=True, help="the world: DATA/train, DATA/val, DATA/bench (runs/demo/data)")
    parser.add_argument("--out", default="runs/bench-stage1-responses")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=0, help="stage-1 steps (default: the tiny preset's)")
    args = parser.parse_args()
    data, out = Path(args.data).resolve(), Path(args.out).resolve()
    config = str(project_root() / "configs/tiny.yaml")
    rows: dict[str, list[tuple[int, float, float]]] = {}
    for mode in ("caption", "teacher"):
        for seed in args.seeds:
            overrides = [
                f"model.init_from={Path(args.stage0).resolve()}",
                f"seed={seed}",
                f"stage1.responses={mode}",
                f"data.train_shards={data}/train/*.tar",
                f"data.val_shards={data}/val/*.tar",
                *([f"train.max_steps={args.steps}"] if args.steps else []),
            ]
            export = train(1, out / f"{mode}-seed{seed}", config, overrides, fresh=False)
            report = score(export, data / "bench", out / f"{mode}-seed{seed}" / "eval", f"{mode}, seed {seed}", 2)
            audio = report["accuracy"]["audio"]
            rows.setdefault(mode, []).append((seed, audio["content"], audio["emotion"]))
    print("\nstage 1 responses  seed  audio content  audio emotion")
    for mode, values in rows.items():
        for seed, content, emotion in values:
            print(f"{mode:17s}  {seed:4d}  {content:13.3f}  {emotion:13.3f}")
    for mode, values in rows.items():
        contents, emotions = [v[1] for v in values], [v[2] for v in values]
        spread = lambda xs: max(xs) - min(xs)  # noqa: E731
        progress.console.print(
            f"summary: {mode}: audio content {statistics.mean(contents):.3f} "
            f"(range {spread(contents):.3f}), audio emotion {statistics.mean(emotions):.3f} "
            f"(range {spread(emotions):.3f}) over seeds {args.seeds}"
        )


if __name__ == "__main__":
    main()
