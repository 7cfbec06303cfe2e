"""Per-GPU memory of a training step, by part: an estimate from shapes, checked against a measured peak.

The estimate builds the stage's model on the meta device (the real transformers classes; vaemo's own stage
builder adds what the stage trains), asks the stage's objective for a step's sequences on a batch of
dummy clips of the preset's shape (captioned, so no teacher writing is needed), and counts:
- weights: frozen ones whole on every GPU (deepspeed.frozen_weights=replicated) or 1/N of them plus one
  gathered block (partitioned); trainable ones 1/N (ZeRO-3), in the model's dtype;
- gradients: 1/N of the trainable elements in fp32 (ZeRO-3 keeps its gradient partition in fp32 under bf16)
  plus the reduce bucket; in a plain fp32 step, the trainable elements once;
- optimizer: AdamW's two moments, plus the fp32 master copy under bf16 (12 or 8 bytes per trainable element);
- activations: what the passes that train keep for their backward, counted by running the language model's
  blocks on the meta device at the pass's shape and summing the tensors autograd saves (weights excluded);
  with activation checkpointing, each block's input plus one block recomputed at a time; the audio encoder
  and projector likewise when they train; attention as the run uses it (FlashAttention-2 keeps q, k, v,
  its output and the log-sum-exp; eager keeps the probabilities);
- KD / LM chunks: the fp32 logits of one chunk of response positions (and their softmax), twice over.

The check runs one plain-PyTorch step (the same objective, AdamW, fp32, eager attention) of the tiny and a
mid-size model on this CPU under torch's MemTracker (every tensor created, by kind) and compares its peak
with the estimate at N = 1 for the same step: `--check` (target: within 20%).

    .venv/bin/python bench/memory.py            # the 7B preset on 8 x 80 GB, stages 1 and 2
    .venv/bin/python bench/memory.py --check    # estimate vs measured peak on tiny and mid-size models
"""

from __future__ import annotations

import argparse
import copy
import sys
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

GB = 1e9
# A mid-size model for the check: 8 blocks of 512 over a 4-block vision tower of 256.
MID = [
    "model.tiny_vlm.hidden_size=512",
    "model.tiny_vlm.num_layers=8",
    "model.tiny_vlm.num_heads=8",
    "model.tiny_vlm.num_kv_heads=4",
    "model.tiny_vlm.intermediate_size=1536",
    "model.tiny_vlm.vision_hidden_size=256",
    "model.tiny_vlm.vision_intermediate_size=512",
    "model.tiny_audio.d_model=256",
    "model.tiny_audio.ffn_dim=512",
]


@dataclass
class Estimate:
    parts: dict[str, float] = field(default_factory=dict)  # bytes
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def dummy_batch(cfg, clips: int):
    """Clips of the preset's shape with every label a stage may ask for (captions: no teacher writing)."""
    from vaemo.data.stream import Batch

    d, g = cfg.data, torch.Generator().manual_seed(0)
    video = torch.randint(0, 256, (clips, d.num_frames, 3, d.frame_height, d.frame_width), dtype=torch.uint8, generator=g)
    audio = torch.randn(clips, int(d.audio_seconds * 16000), generator=g) * 0.1
    emotions = list(cfg.stage2.emotions)
    metas = [
        {
            "caption": "A calm blue circle drifts slowly over a soft field while a quiet chord rises and falls.",
            "object": "circle",
            "emotion": emotions[i % len(emotions)],
            "valence": 0.3,
            "arousal": -0.2,
        }
        for i in range(clips)
    ]
    return Batch(
        keys=[str(i) for i in range(clips)],
        video=video,
        audio=audio,
        audio_len=[audio.shape[1]] * clips,
        duration=[d.audio_seconds] * clips,
        meta=metas,
        has_audio=[True] * clips,
    )


def training_passes(stage: int) -> tuple[str, ...]:
    """The passes whose activations the backward needs (the teacher's run without gradients)."""
    return ("student",) if stage == 1 else ("lm", "student")


class FlashSaved(torch.autograd.Function):
    """Attention that keeps for its backward exactly what FlashAttention-2 keeps: q, k, v, the output and
    the fp32 log-sum-exp per query (shapes only: it runs on the meta device)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


def flash_estimate_attention(module, query, key, value, attention_mask, **kwargs):
    groups = query.shape[1] // key.shape[1]
    out = FlashSaved.apply(query, key.repeat_interleave(groups, 1) if groups > 1 else key, value)
    return out.transpose(1, 2).contiguous(), None


def saved_bytes(run, exclude: set[int]) -> int:
    """Bytes of the tensors autograd saves while `run()` executes, each storage once, parameters excluded."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        base = t._base if t._base is not None else t
        if id(base) not in exclude:
            seen[id(base)] = base.numel() * base.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    del out
    return sum(seen.values())


def llm_activation_bytes(lm, rows: int, length: int, dtype: torch.dtype, checkpointing: bool) -> int:
    """What the language model's blocks keep for the backward of one (rows, length) pass, on the meta device:
    every block's saved tensors, or with checkpointing every block's input plus one block recomputed."""
    if next(lm.parameters()).device.type != "meta":
        lm = copy.deepcopy(lm).to("meta")
    hidden = lm.config.hidden_size
    params = {id(p) for p in lm.parameters()}
    flags = [layer.gradient_checkpointing for layer in lm.layers]
    for layer in lm.layers:  # count what a block saves when it is not recomputed
        layer.gradient_checkpointing = False
    try:
        with torch.device("meta"):
            x = torch.empty(rows, length, hidden, dtype=dtype, requires_grad=True)
            positions = torch.arange(length).view(1, 1, length).expand(3, rows, length)
            if not checkpointing:
                return saved_bytes(lambda: lm(inputs_embeds=x, position_ids=positions, use_cache=False).last_hidden_state, params)
            rotary = lm.rotary_emb(x, positions)
            one_block = saved_bytes(lambda: lm.layers[0](x, position_embeddings=rotary, position_ids=positions), params)
    finally:
        for layer, flag in zip(lm.layers, flags):
            layer.gradient_checkpointing = flag
    block_inputs = len(lm.layers) * rows * length * hidden * torch.finfo(dtype).bits // 8
    return block_inputs + one_block


def audio_activation_bytes(model, clips: int) -> int:
    """What the audio pathway (log-mel, encoder, projector) keeps for the backward of one batch of clips,
    on the meta device: nothing unless a part of it trains."""
    if not any(p.requires_grad for p in [*model.audio_encoder.parameters(), *model.projector.parameters()]):
        return 0
    if next(model.parameters()).device.type != "meta":
        model = copy.deepcopy(model).to("meta")
    params = {id(p) for p in model.parameters()}
    with torch.device("meta"):
        audio = torch.empty(clips, model.audio_samples)
        return saved_bytes(lambda: model.audio_tokens(audio), params)


def chunk_bytes(chunk: int, vocab: int) -> int:
    """One chunk of response positions: fp32 logits and their (log-)softmax, student and teacher."""
    return 2 * 2 * chunk * vocab * 4


def estimate(cfg, parts, ranks: int, replicated: bool, plain: bool, attention: str) -> Estimate:
    """The per-GPU peak of one training step of `parts` (a StageModel) under `cfg` on `ranks` GPUs."""
    from vaemo.train.objectives import objective_for

    model, extra = parts.model, parts.extra
    named = list(model.named_parameters()) + ([(f"extra.{n}", p) for n, p in extra.named_parameters()] if extra else [])
    frozen = sum(p.numel() * p.element_size() for _, p in named if not p.requires_grad)
    trainable_elems = sum(p.numel() for _, p in named if p.requires_grad)
    trainable = sum(p.numel() * p.element_size() for _, p in named if p.requires_grad)
    e = Estimate()
    if plain:
        e.parts["weights"] = frozen + trainable
        e.parts["gradients"] = trainable
        e.parts["optimizer"] = 2 * trainable
    else:
        largest_block = max(
            sum(p.numel() * p.element_size() for p in b.parameters()) for b in model.vlm.model.language_model.layers
        )
        e.parts["weights"] = (frozen if replicated else frozen / ranks + 2 * largest_block) + trainable / ranks
        e.parts["gradients"] = 4 * trainable_elems / ranks + 2 * 50_000_000  # fp32 partition + bf16 reduce bucket
        e.parts["optimizer"] = 12 * trainable_elems / ranks
    objective = objective_for(cfg)
    step = objective.prepare(model, dummy_batch(cfg, cfg.data.batch_size), np.random.default_rng(0))
    lm = model.vlm.model.language_model
    if attention == "flash":
        from transformers import AttentionInterface

        AttentionInterface.register("vaemo_flash_estimate", flash_estimate_attention)
        lm.config._attn_implementation = "vaemo_flash_estimate"
    acts = 0
    for name in training_passes(cfg.stage):
        rows, length = step.passes[name].input_ids.shape
        acts += llm_activation_bytes(lm, rows, length, model.dtype, cfg.model.activation_checkpointing)
        e.notes.append(f"{name} pass {rows} x {length} tokens")
    e.parts["activations"] = acts + audio_activation_bytes(model, cfg.data.batch_size)
    e.parts["kd/lm chunks"] = chunk_bytes(objective.chunk, model.vlm.config.text_config.vocab_size)
    return e


def main() -> None:
    from gpu_stage1 import seven_b_stage  # the 7B preset's stage model on the meta device

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--gpu-gb", type=float, default=80.0)
    parser.add_argument(
        "--check",
        nargs="*",
        choices=["tiny", "mid"],
        default=None,
        help="estimate vs measured peak on the tiny and mid-size models (both when none is named)",
    )
    args = parser.parse_args()
    if args.check is not None:
        check(args.check or ["tiny", "mid"])
        return
    lines = []
    for stage in (1, 2):
        cfg, parts = seven_b_stage(stage)
        replicated = cfg.deepspeed.frozen_weights == "replicated"
        with_ckpt = estimate(cfg, parts, args.gpus, replicated, plain=False, attention="flash")
        other = estimate(cfg, parts, args.gpus, not replicated, plain=False, attention="flash").parts["weights"]
        cfg.model.activation_checkpointing = False
        without = estimate(cfg, parts, args.gpus, replicated, plain=False, attention="flash")
        print(f"\nstage {stage} ({', '.join(with_ckpt.notes)}; batch {cfg.data.batch_size} clips per GPU):")
        for part, value in with_ckpt.parts.items():
            extra = f"   (without checkpointing {without.parts[part] / GB:6.1f})" if part == "activations" else ""
            if part == "weights":
                extra = f"   ({'partitioned' if replicated else 'replicated'} frozen weights: {other / GB:.1f})"
            print(f"  {part:14s} {value / GB:7.1f} GB{extra}")
        margin = args.gpu_gb - with_ckpt.total / GB
        lines.append(
            f"stage {stage}: estimated peak {with_ckpt.total / GB:.1f} GB per GPU ({args.gpus} x {args.gpu_gb:.0f} GB, "
            f"frozen weights {'replicated' if replicated else 'partitioned'}, activation checkpointing on; "
            f"{without.total / GB:.1f} GB without it; margin {margin:.1f} GB)"
        )
    print()
    print("\n".join(lines))


class AllocationPeak(TorchDispatchMode):
    """The most bytes of tensor storage alive at once: every storage an op creates inside the mode is counted
    until it is freed, on top of those alive when it starts (`known`: counted in `live` from the start)."""

    def __init__(self, known: list[torch.Tensor]):
        super().__init__()
        self.refs: dict[int, object] = {}
        self.live = 0
        for t in known:
            self.note(t.untyped_storage(), count=True)
        self.peak = self.live

    def note(self, storage: torch.UntypedStorage, count: bool = True) -> None:
        ptr = storage.data_ptr()
        if not ptr or ptr in self.refs:
            return
        size = storage.nbytes()
        self.live += size
        self.refs[ptr] = weakref.ref(storage, lambda _, ptr=ptr, size=size: self.freed(ptr, size))

    def freed(self, ptr: int, size: int) -> None:
        self.refs.pop(ptr, None)
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.note(t.untyped_storage())
        self.peak = max(self.peak, self.live)
        return out


def plain_training(cfg, parts):
    """A plain-PyTorch training step of a StageModel (the stage's objective, AdamW) on dummy clips of the
    preset's shape: (one_step(index), lasting() -> the tensors that live across steps)."""
    from vaemo.train.objectives import objective_for
    from vaemo.train.trainer import StageModule, synchronize

    objective = objective_for(cfg)
    module = StageModule(parts.model, parts.extra, objective).train()
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    batch = dummy_batch(cfg, cfg.data.batch_size)

    def one_step(index: int) -> None:
        inputs = objective.prepare(parts.model, batch, np.random.default_rng(index))
        synchronize(inputs, 1, objective.chunk)
        module(inputs).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def lasting() -> list[torch.Tensor]:
        state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        return [*module.parameters(), *module.buffers(), *state]

    return one_step, lasting


def measured_peak(cfg, parts) -> float:
    """Peak bytes of tensor storage during the second of two plain-PyTorch steps (the first creates AdamW's
    state): weights, optimizer state, activations, gradients and every temporary."""
    one_step, lasting = plain_training(cfg, parts)
    one_step(0)
    with AllocationPeak(lasting()) as tracker:
        one_step(1)
    return tracker.peak


def check(sizes: list[str]) -> None:
    from vaemo.config import load_config
    from vaemo.train.objectives import build_stage_model, objective_for

    worst = 0.0
    cases = [("tiny", []), ("mid-size", MID), ("mid-size, checkpointing", [*MID, "model.activation_checkpointing=true"])]
    for size, overrides in [case for case in cases if case[0].split("-")[0] in sizes]:
        for stage in (1, 2):
            plain = ["model.attn_implementation=eager", "model.dtype=float32", *overrides]
            cfg = load_config(ROOT / "configs/tiny.yaml", plain, stage=stage)
            parts = build_stage_model(cfg, objective_for(cfg))
            guess = estimate(cfg, parts, ranks=1, replicated=True, plain=True, attention="eager")
            total = measured_peak(cfg, parts)
            worst = max(worst, abs(guess.total / total - 1))
            parts_text = ", ".join(f"{k} {v / 1e6:.1f}" for k, v in guess.parts.items())
            print(
                f"{size} stage {stage}: estimated {guess.total / 1e6:.1f} MB ({parts_text}); measured peak "
                f"{total / 1e6:.1f} MB: ratio {guess.total / total:.2f}"
            )
    print(f"largest estimate error: {worst:.0%} (target: within 20%)")


if __name__ == "__main__":
    main()
