"""How fast the tiny vision tower learns the world's shapes and emotions under each `data.frame_fit`.

Stage 0 first trains the vision tower alone with auxiliary object/emotion heads (`stage0.vision_warmup_
steps`); whatever that tower cannot tell apart, no later stage recovers. This probe runs exactly that part
in plain PyTorch (one process, no Ray or DeepSpeed, so it is quick and repeatable): it decodes a world's
train and val splits once per fit, trains the tower and stage 0's heads with the preset's learning rate
and schedule for each fit and seed, and prints the **val** split's accuracy of each head (bench is never
read: settings are chosen here and reported there).

    .venv/bin/vaemo data synth --config configs/tiny.yaml --out runs/data
    .venv/bin/python bench/vision_probe.py --data runs/data --steps 900 --seeds 0 1

The tiny preset's `data.frame_fit: crop` was chosen with it (README, "Shaping the tiny preset").
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vaemo.config import load_config  # noqa: E402
from vaemo.data import vocab  # noqa: E402
from vaemo.data.decode import DecodeSpec, SkipSample, decode_sample  # noqa: E402
from vaemo.data.stream import expand_shards  # noqa: E402
from vaemo.data.tars import ShardError, read_shard  # noqa: E402
from vaemo.model import build_model  # noqa: E402
from vaemo.train.objectives import SeeObjective  # noqa: E402
from vaemo.train.trainer import learning_rate  # noqa: E402

LABELS = {"object": vocab.OBJECTS, "emotion": vocab.EMOTIONS}
HEADS = [(task, pool) for task in LABELS for pool in SeeObjective.POOLS]  # stage 0's, for the tiny preset


def decode_split(pattern: str, spec: DecodeSpec) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """All usable clips of some shards: frames (N, F, 3, H, W) uint8 and label indices per task."""
    frames, labels = [], {task: [] for task in LABELS}
    for url in expand_shards(pattern):
        for sample in read_shard(url):
            if isinstance(sample, ShardError):
                continue
            try:
                clip = decode_sample(sample, spec)
            except SkipSample:
                continue
            frames.append(clip.video)
            for task, names in LABELS.items():
                labels[task].append(names.index(clip.meta[task]))
    return torch.stack(frames), {task: torch.tensor(v) for task, v in labels.items()}


def probe(cfg, train, val, steps: int, batch: int, seed: int, report_every: int) -> list[dict]:
    torch.manual_seed(seed)
    model = build_model(cfg.model, cfg.data, seed=seed)
    heads = nn.ModuleDict({f"{task}_{pool}": nn.Linear(model.hidden_size, len(LABELS[task])) for task, pool in HEADS}).to(
        model.dtype
    )
    params = list(model.vlm.model.visual.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    rng = np.random.default_rng(seed)

    def logits(video: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = model.video_tokens(video).float()
        pooled = {"max": tokens.amax(1), "mean": tokens.mean(1)}
        return {name: head(pooled[name.split("_")[1]].to(head.weight.dtype)).float() for name, head in heads.items()}

    rows, start = [], time.perf_counter()
    for step in range(1, steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, step)
        pick = torch.from_numpy(rng.integers(0, len(train[0]), batch))
        out = logits(train[0][pick])
        loss = sum(F.cross_entropy(out[name], train[1][name.split("_")[0]][pick]) for name in out) / 2
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        optimizer.step()
        if step % report_every and step != steps:
            continue
        correct = dict.fromkeys(heads, 0)
        with torch.no_grad():
            for first in range(0, len(val[0]), 32):
                for name, scores in logits(val[0][first : first + 32]).items():
                    truth = val[1][name.split("_")[0]][first : first + 32]
                    correct[name] += int((scores.argmax(-1) == truth).sum())
        rows.append(
            {
                "step": step,
                "loss": round(float(loss.detach()), 3),
                "seconds": round(time.perf_counter() - start),
                **{f"val_{name}_acc": round(c / len(val[0]), 3) for name, c in correct.items()},
            }
        )
        print(json.dumps({"seed": seed, **rows[-1]}), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs/tiny.yaml"))
    parser.add_argument("--data", default=str(ROOT / "runs/data"), help="a world written by `vaemo data synth`")
    parser.add_argument("--fits", nargs="+", default=["letterbox", "crop", "stretch"])
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--batch", type=int, default=16, help="clips per step (the preset: 2 workers x 8)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--report-every", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    finals: dict[str, list[dict]] = {}
    for fit in args.fits:
        cfg = load_config(args.config, [f"data.frame_fit={fit}", f"train.max_steps={args.steps}"], stage=0)
        spec = DecodeSpec.for_data(cfg.data, need_video=True, need_audio=False, need_fields=tuple(LABELS))
        train = decode_split(f"{args.data}/train/*.tar", spec)
        val = decode_split(f"{args.data}/val/*.tar", spec)
        print(f"{fit}: {len(train[0])} train and {len(val[0])} val clips decoded", flush=True)
        finals[fit] = [probe(cfg, train, val, args.steps, args.batch, seed, args.report_every)[-1] for seed in args.seeds]

    heads = [f"val_{task}_{pool}_acc" for task, pool in HEADS]
    print(f"\nval accuracy after {args.steps} steps, mean over seeds {args.seeds} (each seed in brackets)")
    print(f"{'fit':<10}" + "".join(f"{h[4:-4]:>28}" for h in heads))
    for fit, rows in finals.items():
        cells = [f"{statistics.mean(r[h] for r in rows):.3f} ({' '.join(f'{r[h]:.2f}' for r in rows)})" for h in heads]
        print(f"{fit:<10}" + "".join(f"{c:>28}" for c in cells))


if __name__ == "__main__":
    main()
