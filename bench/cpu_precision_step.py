"""Seconds per training step on this CPU with fp32 weights vs bf16 weights (`model.dtype`), and where they go.

One process, one torch thread (what each CPU training worker gets), the tiny preset's stage-0 joint step
(vision tower + LLM + auxiliary heads; `step.step` past the vision warm-up) on one batch of random frames
with the synthetic world's captions; forward, backward and AdamW; the median of the timed steps. Prints both
times and the ratio bf16/fp32, and with --profile the operators that take the time in each precision.

Why it exists: a CPU with bf16 instructions (avx512_bf16, amx) might have made the tiny preset's steps
cheaper. On this 2-core machine they are not: see the README ("Precision").

    .venv/bin/python bench/cpu_precision_step.py
    .venv/bin/python bench/cpu_precision_step.py --steps 6 --profile
    .venv/bin/python bench/cpu_precision_step.py --conv3d   # the patch embedding as transformers computes it

It also times the vision tower's patch embedding alone, as vaemo computes it (one matrix product) and as
a Conv3d, in each precision.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def patch_embedding_seconds(model, video: torch.Tensor, conv3d: bool, repeats: int = 4) -> float:
    """Forward + backward of the vision tower's patch embedding alone on the batch's patches (the fastest of
    `repeats`), as vaemo runs it (one matrix product) or as transformers does (Conv3d)."""
    from vaemo.model.vision import PatchProjection, video_inputs

    embed = model.vlm.model.visual.patch_embed
    patches, _ = video_inputs(video, model.spec.visual, embed.proj.weight.dtype)
    embed.proj.__class__ = torch.nn.Conv3d if conv3d else PatchProjection
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        embed(patches).float().sum().backward()
        seconds.append(time.perf_counter() - start)
    embed.proj.weight.grad = None
    embed.proj.__class__ = PatchProjection
    return min(seconds)


def timed_steps(config: str, overrides: list[str], dtype: str, steps: int, profile: bool, conv3d: bool) -> float:
    from vaemo.config import load_config
    from vaemo.data import vocab
    from vaemo.data.stream import Batch
    from vaemo.train.objectives import build_stage_model, objective_for
    from vaemo.train.trainer import synchronize

    cfg = load_config(config, [*overrides, f"model.dtype={dtype}"], stage=0)
    objective = objective_for(cfg)
    built = build_stage_model(cfg, objective)
    trainable = [p for p in [*built.model.parameters(), *built.extra.parameters()] if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.train.lr)
    d = cfg.data
    generator = torch.Generator().manual_seed(0)
    video = torch.randint(
        0, 256, (d.batch_size, d.num_frames, 3, d.frame_height, d.frame_width), dtype=torch.uint8, generator=generator
    )
    rng = np.random.default_rng(0)
    cues = [vocab.Cues(vocab.OBJECTS[i % 4], 1, vocab.EMOTIONS[i % 4], 0.5, 0.5) for i in range(d.batch_size)]
    meta = [{"caption": vocab.caption(c, rng), "object": c.object, "emotion": c.emotion} for c in cues]
    batch = Batch(
        keys=[str(i) for i in range(d.batch_size)],
        video=video,
        audio=None,
        audio_len=[0] * d.batch_size,
        duration=[2.5] * d.batch_size,
        meta=meta,
    )

    matmul, conv = (patch_embedding_seconds(built.model, video, c) for c in (False, True))
    print(f"{dtype} patch embedding, forward + backward: matrix product {matmul * 1e3:.1f} ms, Conv3d {conv * 1e3:.1f} ms")
    if conv3d:  # the step as transformers' own module computes it
        built.model.vlm.model.visual.patch_embed.proj.__class__ = torch.nn.Conv3d

    def one_step() -> None:
        step = objective.prepare(built.model, batch, rng)
        step.step = cfg.stage0.vision_warmup_steps + 1
        synchronize(step, 1, cfg.stage1.kd_chunk_size)
        objective.loss(built.model, built.extra, step).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    one_step()  # first-call allocations and kernel selection
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        one_step()
        seconds.append(time.perf_counter() - start)
    if profile:
        from torch.profiler import profile as torch_profile

        with torch_profile() as prof:
            one_step()
        print(f"\n{dtype}: operators by own CPU time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    return statistics.median(seconds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs/tiny.yaml"))
    p.add_argument("--steps", type=int, default=5, help="timed steps per precision (after one untimed)")
    p.add_argument("--profile", action="store_true", help="also print the top operators of one step in each precision")
    p.add_argument("--conv3d", action="store_true", help="run the patch embedding as transformers' Conv3d, not vaemo's product")
    p.add_argument("overrides", nargs="*", help="dotted config overrides (e.g. a smaller data.frame_height)")
    args = p.parse_args()
    torch.set_num_threads(1)
    fp32 = timed_steps(args.config, args.overrides, "float32", args.steps, args.profile, args.conv3d)
    bf16 = timed_steps(args.config, args.overrides, "bfloat16", args.steps, args.profile, args.conv3d)
    print(f"stage-0 step, the config's batch, 1 thread: fp32 {fp32:.3f} s, bf16 {bf16:.3f} s, ratio bf16/fp32 {bf16 / fp32:.1f}")


if __name__ == "__main__":
    main()
