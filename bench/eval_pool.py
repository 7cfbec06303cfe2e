"""Scoring several benches with one actor pool vs one pool per bench (what `make science` does per stage).

Each round scores the same export on every bench named, first with a fresh pool per bench (`evaluate` per
bench, as before pools were shared), then with one pool for all (`evaluate_all`), and checks that both give
the same reports. Prints seconds per leg and the ratio one pool / a pool per bench; the ratio, not the
seconds, is what carries between machines.

    .venv/bin/python bench/eval_pool.py --model runs/science/seed0/stage2/export \\
        --bench runs/science/seed0/data/bench runs/science/seed0/data/val-bench runs/science/seed0/data/shifted/bench
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vaemo.eval.run import Evaluation, evaluate, evaluate_all  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="an export folder")
    parser.add_argument("--bench", required=True, nargs="+", help="ArtEmoBench folders")
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    ratios = []
    for round_ in range(1, args.rounds + 1):
        start = time.perf_counter()
        apart = [evaluate(args.model, bench, actors=args.actors)[0] for bench in args.bench]
        apart_s = time.perf_counter() - start
        start = time.perf_counter()
        together = [report for report, _ in evaluate_all([Evaluation(args.model, b) for b in args.bench], actors=args.actors)]
        together_s = time.perf_counter() - start
        if together != apart:
            raise SystemExit("one pool and a pool per bench gave different reports")
        ratios.append(together_s / apart_s)
        print(f"round {round_}: a pool per bench {apart_s:.1f} s, one pool {together_s:.1f} s, ratio {ratios[-1]:.2f}")
    rounds = ", ".join(f"{r:.2f}" for r in ratios)
    print(f"summary: one pool / a pool per bench = {sum(ratios) / len(ratios):.2f} (rounds: {rounds})")


if __name__ == "__main__":
    main()
