"""Scoring one export on several benches: one actor pool for all of them vs one pool per bench.

`make science` scores every stage's export on the bench and the val split (the final one on the shifted
bench too). Each pool loads the model into every actor first; this prints the wall seconds of both ways,
their ratio (one pool / a pool each; below 1 is a saving), and checks that the accuracies agree.
Rounds alternate the order of the two ways, since this machine drifts over minutes.

    .venv/bin/python bench/eval_pool.py --model runs/science/seed0/stage2/export \
        --bench runs/science/seed0/data/bench runs/science/seed0/data/val-bench runs/science/seed0/data/shifted/bench
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vaemo.cluster import connect_ray  # noqa: E402
from vaemo.eval.run import evaluate, evaluate_benches  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="an export folder")
    parser.add_argument("--bench", nargs="+", required=True, help="ArtEmoBench folders")
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    benches = {str(k): b for k, b in enumerate(args.bench)}

    def one_pool() -> dict:
        return {name: report for name, (report, _) in evaluate_benches(args.model, benches, actors=args.actors).items()}

    def pool_each() -> dict:
        return {name: evaluate(args.model, b, actors=args.actors, label=name)[0] for name, b in benches.items()}

    connect_ray()  # Ray's own start-up belongs to neither way
    seconds: dict[str, list[float]] = {"one pool": [], "a pool each": []}
    reports = {}
    for r in range(args.rounds):
        order = [("one pool", one_pool), ("a pool each", pool_each)]
        for name, run in order if r % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            reports[name] = run()
            seconds[name].append(time.perf_counter() - start)
    if reports["one pool"] != reports["a pool each"]:
        raise SystemExit("the two ways gave different reports")
    for name, values in seconds.items():
        print(f"{name}: " + ", ".join(f"{v:.1f}" for v in values) + " s")
    ratios = [a / b for a, b in zip(seconds["one pool"], seconds["a pool each"])]
    print(
        f"summary: {len(benches)} benches, one pool / a pool each = {sum(ratios) / len(ratios):.2f} "
        f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)}); same reports: yes"
    )


if __name__ == "__main__":
    main()
