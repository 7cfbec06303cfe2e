"""Frames -> vision-tower patches: `video_inputs` against its definition, on one tiny stage-0 batch.

The definition normalises each clip's frames ((x / 255 - mean) / std per channel) and then patchifies them;
`video_inputs` patchifies the bytes of the whole batch and normalises the patch columns in place. Both run
the same float operations per pixel, so the patches must be equal bit for bit (checked here and in
tests/test_model.py). Prints the median milliseconds of each, on one torch thread (what a CPU training
worker gets), and the ratio new / definition.

    .venv/bin/python bench/video_inputs.py
    .venv/bin/python bench/video_inputs.py --clips 8 --frames 16 --size 224
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def by_definition(video: torch.Tensor, spec) -> torch.Tensor:
    from vaemo.model.vision import patchify

    mean = torch.tensor(spec.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.image_std).view(1, 3, 1, 1)
    return torch.cat([patchify((clip.float() / 255.0 - mean) / std, spec) for clip in video])


def median_ms(fn, repeats: int) -> float:
    fn()  # first-call allocations
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=int, default=8, help="clips per batch (the tiny preset's data.batch_size)")
    p.add_argument("--frames", type=int, default=8, help="frames per clip (data.num_frames)")
    p.add_argument("--size", type=int, default=112, help="frame height and width (data.frame_height/width)")
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()

    from vaemo.model.vision import VisualSpec, video_inputs

    torch.set_num_threads(1)
    spec = VisualSpec(args.frames, args.size, args.size, patch_size=14, temporal_patch_size=2, merge_size=2)
    video = torch.randint(0, 256, (args.clips, args.frames, 3, args.size, args.size), dtype=torch.uint8)
    if not torch.equal(video_inputs(video, spec, torch.float32)[0], by_definition(video, spec)):
        raise SystemExit("video_inputs differs from its definition")
    new = median_ms(lambda: video_inputs(video, spec, torch.float32), args.repeats)
    old = median_ms(lambda: by_definition(video, spec), args.repeats)
    shape = f"{args.clips} clips x {args.frames} frames of {args.size} px"
    print(f"{shape}, one thread: definition {old:.1f} ms, video_inputs {new:.1f} ms")
    print(f"video_inputs / definition: {new / old:.3f} (patches equal bit for bit)")


if __name__ == "__main__":
    main()
