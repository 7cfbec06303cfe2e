"""Stage-1 step time with the offline teacher cache vs the online teacher, on the tiny and a mid-size preset.

Online, a step runs the frozen teacher's video pass (vision tower + LLM over frames), then the student's
audio pass, the chunked top-k KD and the optimizer step. From a cache the vision tower is not even built
and the teacher pass is gone: the targets arrive with the batch.

Two measurements, each printing both times and the ratio cache/online (target <= 0.5):
- compute: one process, pre-decoded batches, the same model, batch and prompts on both sides; the model
  passes and the optimizer step only (median of the timed steps). Presets `tiny` and `mid`; `--unpacked`
  turns shared-prefix packing off (vaemo/model/packing.py) to show what it saves on both sides.
- trainer (`--trainer`): the real `jobs/stage1.py` (Ray Train, 2 DeepSpeed workers, webdataset +
  torchcodec decoding in loader processes) on a synthesized world, after `jobs/teacher_cache.py` wrote
  its cache; wall time per step as the run reports it (median of the steady report intervals). This is
  the step a user waits for: a cached step also decodes no frames, and under ZeRO-3 gathers no vision
  tower. Tiny preset, under its ZeRO-2 and under ZeRO-3 (the cluster preset's setting).

    .venv/bin/python bench/stage1_step.py                  # compute: tiny and mid
    .venv/bin/python bench/stage1_step.py --presets mid --steps 5
    .venv/bin/python bench/stage1_step.py --presets --trainer   # trainer only (about 5 min here)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The mid-size preset: a ~0.1B Qwen2.5-VL-shaped model (LLM 512 x 8 layers, vision 384 x 12 blocks) on
# 16 frames of 224 px, with a frozen audio encoder as with a pretrained Whisper. It fits 2 cores.
PRESETS = {
    "tiny": [],
    "mid": [
        "model.tiny_vlm.hidden_size=512",
        "model.tiny_vlm.num_layers=8",
        "model.tiny_vlm.num_heads=8",
        "model.tiny_vlm.num_kv_heads=4",
        "model.tiny_vlm.intermediate_size=1408",
        "model.tiny_vlm.vision_hidden_size=384",
        "model.tiny_vlm.vision_depth=12",
        "model.tiny_vlm.vision_heads=6",
        "model.tiny_vlm.vision_intermediate_size=1536",
        "data.num_frames=16",
        "data.frame_height=224",
        "data.frame_width=224",
        "model.tiny_audio.d_model=384",
        "model.tiny_audio.num_layers=4",
        "model.tiny_audio.num_heads=6",
        "model.tiny_audio.ffn_dim=1536",
        "stage1.train_audio_encoder=false",
    ],
}


def synthetic_batch(cfg, batch_size: int, seed: int):
    """A batch shaped like the stream's (random frames and sound, real captions from the world)."""
    import numpy as np
    import torch

    from vaemo.data import vocab
    from vaemo.data.stream import Batch

    rng = np.random.default_rng(seed)
    d = cfg.data
    metas = []
    for _ in range(batch_size):
        obj, emotion = vocab.OBJECTS[int(rng.integers(4))], vocab.EMOTIONS[int(rng.integers(4))]
        metas.append(
            {
                "caption": f"A {emotion} artwork with a {obj} moving across a glowing background.",
                "object": obj,
                "emotion": emotion,
            }
        )
    generator = torch.Generator().manual_seed(seed)
    video = torch.randint(
        0, 256, (batch_size, d.num_frames, 3, d.frame_height, d.frame_width), dtype=torch.uint8, generator=generator
    )
    samples = int(d.audio_seconds * 16000)
    audio = torch.randn(batch_size, samples, generator=generator) * 0.1
    return Batch(
        keys=[f"clip-{seed}-{i}" for i in range(batch_size)],
        video=video,
        audio=audio,
        audio_len=[samples] * batch_size,
        duration=[d.audio_seconds] * batch_size,
        meta=metas,
        has_audio=[True] * batch_size,
    )


def step_inputs(objective, model, batch, step: int):
    """The inputs a training worker prepares for this step (its prompts drawn from the step's own seed)."""
    import numpy as np

    from vaemo.train.trainer import synchronize

    inputs = objective.prepare(model, batch, np.random.default_rng([0, step]))
    synchronize(inputs, 1, objective.chunk)
    return inputs


def plain_step(objective, model, module, optimizer, batch, step: int) -> float:
    """One optimizer step as a training worker takes it, in this process (prepare, loss, backward, update);
    returns its loss."""
    loss = module(step_inputs(objective, model, batch, step))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def time_steps(cfg, batches, steps: int, warmup: int, cached: bool) -> float:
    import torch

    from vaemo.model import build_model
    from vaemo.teacher_cache import teacher_records
    from vaemo.train.objectives import AlignObjective, build_stage_model
    from vaemo.train.trainer import StageModule

    if cached:  # the cache, written beforehand by the same frozen teacher
        teacher = build_model(cfg.model, cfg.data, seed=cfg.seed).eval()
        for b in batches:
            b.teacher, b.video = teacher_records(teacher, cfg, b, "bench"), None
        del teacher
        cfg = copy.deepcopy(cfg)
        cfg.stage1.teacher.mode, cfg.stage1.teacher.cache_dir = "cache", "(in memory)"
    objective = AlignObjective(cfg)
    model = build_stage_model(cfg, objective, drop_vision=cached).model
    module = StageModule(model, None, objective)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        plain_step(objective, model, module, optimizer, batches[step % len(batches)], step)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def trainer_ratios(steps: int, warmup: int) -> None:
    """Wall time per step of the real stage-1 job (bench/trainer_overhead.py runs it), online vs cache."""
    from trainer_overhead import distributed

    from vaemo.data.synth import Ranges, synthesize

    with tempfile.TemporaryDirectory(prefix="vaemo-stage1-step-") as tmp:
        world, cache = Path(tmp) / "world", Path(tmp) / "cache"
        synthesize(
            world, train_clips=320, val_clips=16, bench_clips=16, clips_per_shard=40, seed=0, ranges=Ranges(duration=(2.0, 3.0))
        )
        started = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "jobs/teacher_cache.py"),
                "--config",
                str(ROOT / "configs/tiny.yaml"),
                "--out",
                str(cache),
                "--actors",
                "2",
                f"data.train_shards={world}/train/*.tar",
                f"data.val_shards={world}/val/*.tar",
                "stage1.topk=16",
            ],
            check=True,
            capture_output=True,
            cwd=ROOT,
        )
        print(f"trainer: teacher cache of 336 clips written in {time.perf_counter() - started:.0f} s (2 actors)")
        for name, ds_config in (("tiny preset, ZeRO-2", "ds_configs/zero2.json"), ("ZeRO-3", "ds_configs/zero3.json")):
            runs = {}
            for side, extra in (("online", ()), ("cache", ("stage1.teacher.mode=cache", f"stage1.teacher.cache_dir={cache}"))):
                r = distributed(world, steps, warmup, 8, 1, Path(tmp) / side, ds_config, ("stage1.topk=16", *extra), report=5)
                runs[side] = {"wall": 2 * 8 / r["samples_per_s"], **r["breakdown_s"]}  # 2 workers x 8 clips a step
            online, cached = runs["online"], runs["cache"]
            parts = "; ".join(
                f"{side} " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in r.items() if k != "wall") for side, r in runs.items()
            )
            print(
                f"trainer ({name}, 2 workers x 8 clips): online {online['wall'] * 1000:.0f} ms/step, cache "
                f"{cached['wall'] * 1000:.0f} ms/step, ratio cache/online {cached['wall'] / online['wall']:.2f} "
                f"(target <= 0.5)  [{parts}]",
                flush=True,
            )


def main() -> None:
    import torch

    from vaemo.config import load_config

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--presets",
        nargs="*",
        default=list(PRESETS),
        choices=list(PRESETS),
        help="compute measurements to run (none: only --trainer)",
    )
    p.add_argument("--trainer", action="store_true", help="also time the real stage-1 job, cache vs online")
    p.add_argument("--trainer-steps", type=int, default=30, help="measured steps of each trainer run")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=8, help="clips per step")
    p.add_argument("--topk", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--unpacked",
        action="store_true",
        help="compute: without shared-prefix packing (model.pack_prefixes=false), to see what it saves",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.presets:
        cfg = load_config(
            ROOT / "configs/tiny.yaml",
            [*PRESETS[name], f"stage1.topk={args.topk}", f"model.pack_prefixes={not args.unpacked}"],
            stage=1,
        )
        online = time_steps(cfg, [synthetic_batch(cfg, args.batch, s) for s in range(2)], args.steps, args.warmup, cached=False)
        cached = time_steps(cfg, [synthetic_batch(cfg, args.batch, s) for s in range(2)], args.steps, args.warmup, cached=True)
        print(
            f"{name}: online {online * 1000:.0f} ms/step, cache {cached * 1000:.0f} ms/step, "
            f"ratio cache/online {cached / online:.2f} (target <= 0.5)",
            flush=True,
        )
    if args.trainer:
        trainer_ratios(args.trainer_steps, warmup=10)


if __name__ == "__main__":
    main()
