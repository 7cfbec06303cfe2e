"""Bytes one training step moves per GPU for the 7B preset under ZeRO-3, by where the frozen weights live.

A calculation from shapes, not a measurement: the model is the 7B preset's (Qwen2.5-VL-7B and
Whisper-large-v3's encoder, built from the real transformers classes on the meta device, with each stage's
trainable parts added by vaemo's own stage builder), so the parameter counts are exact; the passes a step
makes are counted from the stage's objective (below). Three placements:

- partitioned: ZeRO-3 shards every weight and all-gathers it in every pass that uses it
  (deepspeed.frozen_weights=partitioned, the default);
- replicated: the frozen weights stay whole on every GPU, ZeRO-3 keeps the trainable parts
  (deepspeed.frozen_weights=replicated, the 7B preset's setting);
- hpz: partitioned, with ZeRO++ hierarchical partitioning (zero_hpz_partition_size = GPUs per node): the
  backward pass gathers from a second copy sharded within the node, so only forward gathers cross nodes.

Counting rules: an all-gather of S bytes over N ranks brings each rank S (N-1)/N, of which S (N-G)/N lives
on other nodes (G GPUs per node; any algorithm must move at least that across); a reduce-scatter of the
trainable gradients moves the same. Weights and gradients travel in bf16. Tensors up to ZeRO-3's persistence
threshold stay whole on every rank and are never gathered. A partitioned weight is gathered once per pass
that uses it (DeepSpeed's reuse window is ignored: it holds ~1e9 elements, a seventh of the LLM).

Passes per step (the teacher writes its own responses, as for clips without captions: one LLM forward per
token of stage1.teacher_response_tokens, the vision tower once for the prompt):
- stage 1: vision 2 forwards (writing, KD teacher); LLM T + 2 forwards (writing, teacher, student) and 1
  backward (+1 recomputation with activation checkpointing); audio encoder 1 forward; projector 1 + 1.
- stage 2: vision 3 forwards (writing, KD teacher, emotion pass); LLM T + 3 forwards (writing, teacher,
  emotion pass, KD student) and 2 backwards (+2 recomputations); audio encoder 2 forwards; adapters 1 + 1.

Usage: .venv/bin/python bench/comm_bytes.py [--gpus-per-node 8] [--nodes 1 2 4]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

BF16 = 2
GB = 1e9


@dataclass
class Part:
    """One part of the model: elements ZeRO-3 would partition (above the persistence threshold), all its
    trainable elements (their gradients are reduced whatever their size), and how often a step uses them."""

    name: str
    frozen: int
    trainable: int
    forwards: int
    backwards: int
    with_gradient: int = 0


def part_of(name: str) -> str:
    if name.startswith("vlm.model.visual."):
        return "vision"
    if name.startswith("vlm."):
        return "llm"
    if name.startswith("audio_encoder."):
        return "audio_encoder"
    return "adapters"  # projector, enhancer, supervisor, stage heads


def stage_parts(stage: int) -> tuple[list[Part], dict]:
    from gpu_stage1 import seven_b_stage  # the 7B preset's stage model on the meta device

    cfg, built = seven_b_stage(stage)
    threshold = json.loads((ROOT / cfg.deepspeed.config).read_text())["zero_optimization"].get(
        "stage3_param_persistence_threshold", 100_000
    )
    counts: dict[str, list[int]] = {}  # part -> [frozen, trainable above the threshold, all trainable]
    named = dict(built.model.named_parameters())
    if built.extra is not None:
        named.update({f"extra.{n}": p for n, p in built.extra.named_parameters()})
    for name, param in named.items():
        count = counts.setdefault(part_of(name), [0, 0, 0])
        count[2] += param.numel() if param.requires_grad else 0
        if param.numel() > threshold:
            count[int(param.requires_grad)] += param.numel()
    writes = cfg.stage1.teacher_response_tokens
    ckpt = int(cfg.model.activation_checkpointing)
    if stage == 1:
        passes = {"vision": (2, 0), "llm": (writes + 2, 1 + ckpt), "audio_encoder": (1, 0), "adapters": (1, 1)}
    else:
        passes = {"vision": (3, 0), "llm": (writes + 3, 2 * (1 + ckpt)), "audio_encoder": (2, 0), "adapters": (1, 1)}
    if (cfg.stage1.train_audio_encoder or cfg.stage1.audio_encoder_top_layers) and stage == 1:
        passes["audio_encoder"] = (1, 1)
    parts = []
    for name, (forwards, backwards) in passes.items():
        frozen, trainable, with_gradient = counts.get(name, [0, 0, 0])
        parts.append(Part(name, frozen, trainable, forwards, backwards, with_gradient))
    info = {"threshold": threshold, "teacher_tokens": writes, "checkpointing": bool(ckpt)}
    return parts, info


def step_bytes(parts: list[Part], placement: str, ranks: int, per_node: int) -> tuple[float, float]:
    """(bytes received per GPU per step, of which from other nodes)."""
    total = inter = 0.0
    share, remote = (ranks - 1) / ranks, (ranks - min(per_node, ranks)) / ranks
    node_share = (min(per_node, ranks) - 1) / min(per_node, ranks)
    for p in parts:
        gathered = p.trainable + (p.frozen if placement != "replicated" else 0)
        if placement == "hpz":  # forward gathers over all ranks; backward gathers from the in-node copy
            total += BF16 * gathered * (p.forwards * share + p.backwards * node_share)
            inter += BF16 * gathered * p.forwards * remote
        else:
            total += BF16 * gathered * (p.forwards + p.backwards) * share
            inter += BF16 * gathered * (p.forwards + p.backwards) * remote
        grads = BF16 * p.with_gradient  # reduce-scatter of the trainable gradients
        total += grads * share
        inter += grads * remote
    return total, inter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    g = args.gpus_per_node
    summary = []
    for stage in (1, 2):
        parts, info = stage_parts(stage)
        frozen = sum(p.frozen for p in parts)
        trainable = sum(p.trainable for p in parts)
        print(
            f"\nstage {stage}: {frozen / 1e9:.2f} B frozen and {trainable / 1e6:.1f} M trainable elements above the "
            f"persistence threshold ({info['threshold']:,}); teacher writes {info['teacher_tokens']} tokens; "
            f"activation checkpointing {'on' if info['checkpointing'] else 'off'}"
        )
        for p in parts:
            print(
                f"  {p.name:14s} frozen {p.frozen / 1e6:9.1f} M  trainable {p.trainable / 1e6:7.1f} M  "
                f"(all trainable {p.with_gradient / 1e6:6.2f} M)  forwards {p.forwards:3d}  backwards {p.backwards}"
            )
        print(
            f"  {'GB per GPU per step':32s}"
            + "".join(f"{n} node{'s' if n > 1 else ' '} ({n * g:2d} GPUs)    " for n in args.nodes)
        )
        for placement in ("partitioned", "hpz", "replicated"):
            cells = []
            for nodes in args.nodes:
                total, inter = step_bytes(parts, placement, nodes * g, g)
                cells.append(f"{total / GB:7.1f} ({inter / GB:6.1f} inter)")
            print(f"  {placement:32s}" + "   ".join(cells))
        worst = args.nodes[-1] * g
        totals = {pl: step_bytes(parts, pl, worst, g) for pl in ("partitioned", "replicated")}
        summary.append(
            f"stage {stage}: {totals['partitioned'][0] / GB:.1f} GB/GPU/step partitioned vs {totals['replicated'][0] / GB:.3f} "
            f"replicated on {worst} GPUs (calculated; replicated keeps {BF16 * frozen / GB:.1f} GB of frozen weights per GPU)"
        )
    print()
    print("\n".join(summary))


if __name__ == "__main__":
    main()
