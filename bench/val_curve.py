"""A stage's learning curve on the val split: train once to --steps, export every checkpoint and score it on
a bench made of the val clips (`val-bench`), so that step counts are chosen on val and the bench split is
only reported.

A checkpoint at step s of a run of S steps is not a run of s steps (its learning rate has not decayed yet):
the curve shows where accuracy stops rising, not the exact score of a shorter run.

Stage 1 reads its teacher from a cache written once before it (as `make demo` and `make science` do;
`--stage1-teacher online` runs the teacher every step). Learning rates and other settings go in as dotted
overrides:

    .venv/bin/python bench/val_curve.py --stage 1 --world runs/demo/data \
        --init-from runs/demo/stage0/export --steps 600 --every 100 --out /tmp/curve-s1
    .venv/bin/python bench/val_curve.py --stage 0 --world runs/demo/data --steps 1200 --every 400 \
        --out /tmp/curve-s0-lr4e-3 train.lr=4e-3
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CELLS = [(m, t) for m in ("audio", "visual", "audio_visual") for t in ("content", "emotion")]


def main() -> None:
    from vaemo.data.synth import bench_from_shards
    from vaemo.demo import stage1_teacher_cache
    from vaemo.eval.run import evaluate
    from vaemo.train.export import export_checkpoint
    from vaemo.train.launch import run_stage

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs/tiny.yaml"))
    p.add_argument("--stage", type=int, required=True, choices=[0, 1, 2])
    p.add_argument("--world", required=True, help="a world folder with train/, val/ and bench/ (vaemo data synth)")
    p.add_argument("--init-from", default="", help="the previous stage's export (stages 1 and 2)")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--every", type=int, required=True, help="checkpoint (and score) every N steps")
    p.add_argument("--first", type=int, default=0, help="score checkpoints from this step on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--stage1-teacher", choices=["cache", "online"], default="cache", help="stage 1's teacher (as make demo's)")
    p.add_argument("--max-items", type=int, default=0, help="score only the first N val items (smoke runs)")
    p.add_argument("--out", required=True)
    p.add_argument("overrides", nargs="*", help="more dotted config overrides")
    args = p.parse_args()

    world, out = Path(args.world), Path(args.out)
    val_bench = out / "val-bench"
    if not (val_bench / "items.jsonl").is_file():
        bench_from_shards(sorted(world.glob("val/*.tar")), val_bench, args.seed)
    overrides = [
        f"data.train_shards={world}/train/*.tar",
        f"data.val_shards={world}/val/*.tar",
        f"data.bench_dir={world}/bench",
        f"seed={args.seed}",
        f"train.max_steps={args.steps}",
        f"train.checkpoint_every={args.every}",
        f"train.keep_checkpoints={args.steps // args.every + 1}",
        *([f"model.init_from={args.init_from}"] if args.init_from else []),
        *args.overrides,
    ]
    if args.stage == 1 and args.stage1_teacher == "cache":
        overrides += stage1_teacher_cache(out, args.config, overrides, fresh=False, actors=args.actors)
    run_stage(args.stage, args.config, out / "run", overrides, overwrite=True)
    rows = []
    for checkpoint in sorted((out / "run" / "checkpoints").glob("step-*")):
        step = int(checkpoint.name.split("-")[1])
        if step < args.first:
            continue
        export = export_checkpoint(checkpoint, out / f"export-{step}")
        report, _ = evaluate(export, val_bench, actors=args.actors, deaf_check=False, max_items=args.max_items)
        rows.append((step, [report["accuracy"].get(m, {}).get(t, float("nan")) for m, t in CELLS]))
    curve = [{"step": step, **{f"{m}/{t}": v for (m, t), v in zip(CELLS, values)}} for step, values in rows]
    (out / "curve.json").write_text(json.dumps(curve, indent=1))
    print(f"\nstage {args.stage}, seed {args.seed}, val split ({val_bench}; {out / 'curve.json'}):")
    print("step   " + " ".join(f"{m[:5]}-{t[:4]:4s}" for m, t in CELLS))
    for step, values in rows:
        print(f"{step:<6d} " + " ".join(f"{v:10.3f}" for v in values))


if __name__ == "__main__":
    main()
