"""Stage-2 step time with the KD teacher reading the vision tokens its LM pass encoded vs running the tower again.

A stage-2 step runs the vision tower twice on the same frames: in the LM pass (emotion answers under every
modality) and in the KD teacher's pass (the model as stage 1 left it). The tower is frozen in stage 2 and the
Enhancer acts after it, so `VAEmotionLLM.sharing_video_tokens` lets the teacher read the LM pass's output.
One process, one torch thread (what each CPU training worker gets), the tiny preset on its stage-2 batch
(8 clips), the two sides alternating step by step; prints both median step times (prepare, forward,
backward, optimizer step), the ratio shared/unshared (below 1: faster), and checks that both sides give
the same losses.

With --teacher-share it also times the KD teacher's forward alone (its own tower pass included: an upper
bound on what a cache of stage 2's teacher targets could save of a step).

    .venv/bin/python bench/stage2_step.py
    .venv/bin/python bench/stage2_step.py --steps 12 --batch 8 --teacher-share
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def stage2_batch(cfg, batch_size: int, seed: int):
    """stage1_step's synthetic batch with the labels stage 2 reads."""
    import numpy as np
    from stage1_step import synthetic_batch

    from vaemo.data import vocab

    batch = synthetic_batch(cfg, batch_size, seed)
    rng = np.random.default_rng(seed)
    for meta in batch.meta:
        valence_sign, arousal_sign = vocab.EMOTION_SIGNS[meta["emotion"]]
        meta.update(valence=valence_sign * float(rng.uniform(0.3, 1)), arousal=arousal_sign * float(rng.uniform(0.3, 1)))
    return batch


def main() -> None:
    import torch
    from stage1_step import plain_step

    from vaemo.config import load_config
    from vaemo.model import VAEmotionLLM
    from vaemo.train.objectives import EmoAdapterObjective, build_stage_model
    from vaemo.train.trainer import StageModule

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8, help="timed steps per side (after one untimed)")
    p.add_argument("--batch", type=int, default=8, help="clips per step (the tiny preset's data.batch_size)")
    p.add_argument("--teacher-share", action="store_true", help="also time the KD teacher's forward alone")
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(ROOT / "configs/tiny.yaml", stage=2)
    batches = [stage2_batch(cfg, args.batch, seed) for seed in range(3)]
    sharing = VAEmotionLLM.sharing_video_tokens
    sides = {}
    for side in ("unshared", "shared"):
        objective = EmoAdapterObjective(cfg)
        built = build_stage_model(cfg, objective)  # the same seed on both sides: the same weights
        if side == "unshared":
            built.model.sharing_video_tokens = contextlib.nullcontext  # the tower runs in every pass
        module = StageModule(built.model, built.extra, objective)
        optimizer = torch.optim.AdamW([q for q in module.parameters() if q.requires_grad], lr=1e-4)
        sides[side] = (objective, built.model, module, optimizer, [], [])
    assert VAEmotionLLM.sharing_video_tokens is sharing
    for step in range(1 + args.steps):
        for objective, model, module, optimizer, times, losses in sides.values():
            start = time.perf_counter()
            losses.append(plain_step(objective, model, module, optimizer, batches[step % len(batches)], step))
            if step:
                times.append(time.perf_counter() - start)
    (_, _, _, _, unshared, unshared_losses), (_, _, _, _, shared, shared_losses) = sides.values()
    same = "the same losses" if unshared_losses == shared_losses else f"DIFFERENT losses {unshared_losses} {shared_losses}"
    a, b = statistics.median(unshared), statistics.median(shared)
    print(
        f"stage-2 step, tiny preset, {args.batch} clips, 1 thread: tower in every pass {a * 1000:.0f} ms, "
        f"teacher reads the LM pass's tokens {b * 1000:.0f} ms, ratio shared/unshared {b / a:.2f}; {same}"
    )
    if args.teacher_share:
        objective, model = sides["shared"][:2]
        teacher = statistics.median(teacher_seconds(objective, model, batches, args.steps))
        print(f"the KD teacher's forward alone (its tower included) {teacher * 1000:.0f} ms: {teacher / b:.2f} of a shared step")


def teacher_seconds(objective, model, batches, steps: int) -> list[float]:
    """Seconds of the KD teacher's pass (no grad, the model as stage 1 left it) on each step's inputs."""
    import torch
    from stage1_step import step_inputs

    seconds = []
    for step in range(1, 1 + steps):
        inputs = step_inputs(objective, model, batches[step % len(batches)], step)
        start = time.perf_counter()
        with torch.no_grad(), objective.teacher_view(model):
            objective.response_hidden(model, inputs.passes["teacher"])
        seconds.append(time.perf_counter() - start)
    return seconds


if __name__ == "__main__":
    main()
