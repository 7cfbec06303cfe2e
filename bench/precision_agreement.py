"""Scoring in bf16 vs fp32: how often an export gives the same answer (the GPU's precision vs the CPU's).

Scores every item of a benchmark (with the deaf check) twice on the Ray actor pool and prints the share
of items answered alike and both accuracies.

    .venv/bin/python bench/precision_agreement.py --model runs/demo/stage2/export --bench runs/demo/data/bench
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vaemo.eval.run import evaluate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="an export folder")
    parser.add_argument("--bench", required=True, help="an ArtEmoBench folder")
    parser.add_argument("--actors", type=int, default=2)
    args = parser.parse_args()
    fp32, fp32_items = evaluate(args.model, args.bench, actors=args.actors, dtype="fp32", label="fp32")
    bf16, bf16_items = evaluate(args.model, args.bench, actors=args.actors, dtype="bf16", label="bf16")
    same = sum(a.predicted == b.predicted for a, b in zip(fp32_items, bf16_items))
    print(
        f"summary: fp32 vs bf16 same answer on {same} of {len(fp32_items)} items ({same / len(fp32_items):.3f}); "
        f"accuracy fp32 {fp32['accuracy']['all']:.3f}, bf16 {bf16['accuracy']['all']:.3f}"
    )


if __name__ == "__main__":
    main()
