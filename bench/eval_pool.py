"""Scoring exports on several benches: one actor pool for every (export, bench) pair vs one pool per export.

`make science` scores each seed's exports (after stages 0, 1 and 2, and the stage-2 ablation) on the bench
and the val split (the final one on the shifted bench too). A pool starts its actors (processes, imports)
and loads the model into each; one pool for all the pairs starts once and has each actor load each export
once. This prints the wall seconds of both ways, their ratio (one pool / a pool per export; below 1 is a
saving), and checks that the reports agree. Rounds alternate the order of the two ways, since this
machine drifts over minutes. With one --model this compares one pool for its benches against the
pool per bench that came before.

    .venv/bin/python bench/eval_pool.py \
        --model runs/science/seed0/stage0/export runs/science/seed0/stage1/export runs/science/seed0/stage2/export \
        --bench runs/science/seed0/data/bench runs/science/seed0/data/val-bench
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vaemo.cluster import connect_ray  # noqa: E402
from vaemo.eval.run import evaluate_runs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", required=True, help="export folders")
    parser.add_argument("--bench", nargs="+", required=True, help="ArtEmoBench folders")
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-items", type=int, default=0, help="score only the first N items of each bench (smoke runs)")
    args = parser.parse_args()
    options = {"actors": args.actors, "max_items": args.max_items}
    runs = {f"{m}/{b}": (model, bench) for m, model in enumerate(args.model) for b, bench in enumerate(args.bench)}

    def one_pool() -> dict:
        return {name: report for name, (report, _) in evaluate_runs(runs, **options).items()}

    # The other way: a pool per export, or, with one export, a pool per bench (the way before that).
    groups = [[f"{m}/{b}" for b in range(len(args.bench))] for m in range(len(args.model))]
    if len(args.model) == 1:
        groups = [[name] for name in runs]

    def pools_apart() -> dict:
        reports = {}
        for group in groups:
            scored = evaluate_runs({name: runs[name] for name in group}, **options)
            reports.update({name: report for name, (report, _) in scored.items()})
        return reports

    connect_ray()  # Ray's own start-up belongs to neither way
    each = "a pool per bench" if len(args.model) == 1 else "a pool per export"
    seconds: dict[str, list[float]] = {"one pool": [], each: []}
    reports = {}
    for r in range(args.rounds):
        order = [("one pool", one_pool), (each, pools_apart)]
        for name, run in order if r % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            reports[name] = run()
            seconds[name].append(time.perf_counter() - start)
    if reports["one pool"] != reports[each]:
        raise SystemExit("the two ways gave different reports")
    for name, values in seconds.items():
        print(f"{name}: " + ", ".join(f"{v:.1f}" for v in values) + " s")
    ratios = [a / b for a, b in zip(seconds["one pool"], seconds[each])]
    print(
        f"summary: {len(args.model)} exports x {len(args.bench)} benches, one pool / {each} = "
        f"{sum(ratios) / len(ratios):.2f} (rounds: {', '.join(f'{x:.2f}' for x in ratios)}); same reports: yes"
    )


if __name__ == "__main__":
    main()
