"""Stage-1 step time with the offline teacher cache vs the online teacher, on the tiny and a mid-size preset.

Online, a step runs the frozen teacher's video pass (vision tower + LLM over frames), then the student's
audio pass, the chunked top-k KD and the optimizer step. From a cache the vision tower is not even built
and the teacher pass is gone: the targets arrive with the batch (decoding skips the frames too; that
saving is not counted here: both sides get pre-decoded batches). One process, the same model, batch and
prompts on both sides; median of the timed steps. Prints both times and the ratio (target <= 0.5).

    .venv/bin/python bench/stage1_step.py
    .venv/bin/python bench/stage1_step.py --presets mid --steps 5
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The mid-size preset: a ~0.1B Qwen2.5-VL-shaped model (LLM 512 x 8 layers, vision 384 x 12 blocks) on
# 16 frames of 224 px, with a frozen audio encoder as with a pretrained Whisper. It fits 2 cores.
PRESETS = {
    "tiny": [],
    "mid": ["model.tiny_vlm.hidden_size=512", "model.tiny_vlm.num_layers=8", "model.tiny_vlm.num_heads=8",
            "model.tiny_vlm.num_kv_heads=4", "model.tiny_vlm.intermediate_size=1408",
            "model.tiny_vlm.vision_hidden_size=384", "model.tiny_vlm.vision_depth=12",
            "model.tiny_vlm.vision_heads=6", "model.tiny_vlm.vision_intermediate_size=1536",
            "data.num_frames=16", "data.frame_height=224", "data.frame_width=224",
            "model.tiny_audio.d_model=384", "model.tiny_audio.num_layers=4", "model.tiny_audio.num_heads=6",
            "model.tiny_audio.ffn_dim=1536", "stage1.train_audio_encoder=false"],
}


def synthetic_batch(cfg, batch_size: int, seed: int):
    """A batch shaped like the stream's (random frames and sound, real captions from the world)."""
    import numpy as np
    import torch

    from vaemo.data import world
    from vaemo.data.stream import Batch

    rng = np.random.default_rng(seed)
    d = cfg.data
    metas = []
    for _ in range(batch_size):
        obj, emotion = world.OBJECTS[int(rng.integers(4))], world.EMOTIONS[int(rng.integers(4))]
        metas.append({"caption": f"A {emotion} artwork with a {obj} moving across a glowing background.",
                      "object": obj, "emotion": emotion})
    generator = torch.Generator().manual_seed(seed)
    video = torch.randint(0, 256, (batch_size, d.num_frames, 3, d.frame_height, d.frame_width), dtype=torch.uint8,
                          generator=generator)
    samples = int(d.audio_seconds * 16000)
    audio = torch.randn(batch_size, samples, generator=generator) * 0.1
    return Batch(keys=[f"clip-{seed}-{i}" for i in range(batch_size)], video=video, audio=audio,
                 audio_len=[samples] * batch_size, duration=[d.audio_seconds] * batch_size, meta=metas,
                 has_audio=[True] * batch_size)


def time_steps(cfg, batches, steps: int, warmup: int, cached: bool) -> float:
    import numpy as np
    import torch

    from vaemo.model import build_model, set_trainable
    from vaemo.teacher_cache import teacher_records
    from vaemo.train.recipes import AlignRecipe
    from vaemo.train.worker import StageModule, synchronize

    if cached:  # the cache, written beforehand by the same frozen teacher
        teacher = build_model(cfg.model, cfg.data, seed=cfg.seed).eval()
        for b in batches:
            b.teacher, b.video = teacher_records(teacher, cfg, b, "bench"), None
        del teacher
        cfg = copy.deepcopy(cfg)
        cfg.stage1.teacher.mode, cfg.stage1.teacher.cache_dir = "cache", "(in memory)"
    recipe = AlignRecipe(cfg)
    model = build_model(cfg.model, cfg.data, seed=cfg.seed)
    if cached:
        model.detach_vision()
    set_trainable(model, 1, None, recipe.also_trainable())
    module = StageModule(model, None, recipe)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for step in range(warmup + steps):
        batch = batches[step % len(batches)]
        t0 = time.perf_counter()
        inputs = recipe.prepare(model, batch, np.random.default_rng([0, step]))
        synchronize(inputs, 1, recipe.chunk)
        loss = module(inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    import torch

    from vaemo.config import load_config

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=8, help="clips per step")
    p.add_argument("--topk", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.presets:
        cfg = load_config(ROOT / "configs/tiny.yaml", [*PRESETS[name], f"stage1.topk={args.topk}"], stage=1)
        online = time_steps(cfg, [synthetic_batch(cfg, args.batch, s) for s in range(2)], args.steps, args.warmup,
                            cached=False)
        cached = time_steps(cfg, [synthetic_batch(cfg, args.batch, s) for s in range(2)], args.steps, args.warmup,
                            cached=True)
        print(f"{name}: online {online * 1000:.0f} ms/step, cache {cached * 1000:.0f} ms/step, "
              f"ratio cache/online {cached / online:.2f} (target <= 0.5)", flush=True)


if __name__ == "__main__":
    main()
