"""The vision tower's forward + backward with its windows batched (vaemo) vs transformers' loop over windows.

transformers runs SDPA once per attention window (vaemo/model/window_attention.py). One process, one torch
thread (what each CPU training worker gets), two towers alternating within each round, the median of the
timed passes; prints both times and the ratio batched/looped (below 1: faster), and checks that the two
give the same outputs.
- `tiny`: the tiny preset's tower on its stage-0 batch (8 clips x 8 frames of 112 px: 32 windows a block).
- `7b-layout`: Qwen2.5-VL-7B's window layout (112 px windows, full attention in blocks 7, 15, 23, 31;
  32 blocks) at the tiny width, on 2 clips x 16 frames of 448 x 252 px: windows of two lengths.

    .venv/bin/python bench/vision_windows.py
    .venv/bin/python bench/vision_windows.py --rounds 5 --passes 6
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

CASES = {
    "tiny": (dict(depth=4, fullatt_block_indexes=[0, 1, 2, 3]), [[4, 8, 8]] * 8),
    "7b-layout": (dict(depth=32, fullatt_block_indexes=[7, 15, 23, 31]), [[8, 18, 32]] * 2),
}


def tower(case: str):
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    from vaemo.config import TinyVLMConfig

    t = TinyVLMConfig()
    layout, grid = CASES[case]
    config = Qwen2_5_VLConfig(
        vision_config=dict(
            hidden_size=t.vision_hidden_size,
            intermediate_size=t.vision_intermediate_size,
            num_heads=t.vision_heads,
            out_hidden_size=t.hidden_size,
            window_size=112,
            **layout,
        )
    ).vision_config
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = Qwen2_5_VisionTransformerPretrainedModel._from_config(config)
    grid = torch.tensor(grid)
    patches = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14)
    return model, patches, grid


def timed_pass(model, patches, grid) -> tuple[float, torch.Tensor]:
    model.zero_grad()
    start = time.perf_counter()
    out = model(patches, grid_thw=grid).pooler_output
    out.square().sum().backward()
    return time.perf_counter() - start, out.detach()


def main() -> None:
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionAttention

    from vaemo.model.window_attention import BatchedWindowAttention

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--passes", type=int, default=4, help="timed passes per tower and round (after one untimed)")
    args = p.parse_args()
    torch.set_num_threads(1)
    for case in args.cases:
        model, patches, grid = tower(case)
        ratios = []
        for round_ in range(args.rounds):
            seconds, outputs = {}, {}
            for name, cls in (("looped", Qwen2_5_VLVisionAttention), ("batched", BatchedWindowAttention)):
                for block in model.blocks:
                    block.attn.__class__ = cls
                timed_pass(model, patches, grid)
                runs = [timed_pass(model, patches, grid) for _ in range(args.passes)]
                seconds[name] = statistics.median(s for s, _ in runs)
                outputs[name] = runs[0][1]
            same = torch.equal(outputs["looped"], outputs["batched"])
            ratios.append(seconds["batched"] / seconds["looped"])
            print(
                f"{case} round {round_ + 1}: looped {seconds['looped'] * 1e3:.1f} ms, batched {seconds['batched'] * 1e3:.1f} ms, "
                f"ratio {ratios[-1]:.2f}, outputs {'equal bit for bit' if same else 'DIFFER'}",
                flush=True,
            )
        print(f"{case}: batched/looped {statistics.median(ratios):.2f} (median of {args.rounds} rounds)")


if __name__ == "__main__":
    main()
