"""Training steps of a Qwen2.5-VL-7B-shaped VAEmotionLLM on one GPU: tokens/s, MFU, peak memory.

No weights are needed: the VLM (Qwen2.5-VL-7B's config: LLM 3584 x 28 layers, vocab 152,064; vision
tower 1280 x 32 blocks) and the audio encoder (Whisper-large-v3's encoder) are randomly initialised on
the GPU in bf16. Two measurements:
- stage 1's step, hand-built for MFU: the frozen teacher's video pass on 8 clips x 16 frames (three
  prompts per clip: a description and two questions), the student's audio pass, the chunked top-k KL and
  AdamW on the projector; SDPA with and without prefix packing, and FlashAttention-2 when it imports;
- the 7B preset's stage-1 and stage-2 steps through vaemo's own objectives at the preset's shapes (stage 2:
  the EmoAdapter's Enhancer, Supervisor and LoRA, KD against the stage-1 model, activation
  checkpointing), plain AdamW on one GPU: step time, and the peak memory against bench/memory.py's
  estimate for the same step.
It needs torch, transformers and PyYAML only (vaemo's model and objectives import neither Ray, DeepSpeed
nor torchcodec), so `vaemo/`, `bench/` and `configs/` are all it needs to carry.
Run through bench/gpu_stage1.sh; the last line is the summary.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

PRESET = ROOT / "configs/qwen2.5-vl-7b.yaml"
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12}
# Qwen2.5-VL-7B and Whisper-large-v3's encoder; --smoke shrinks every width and depth (a CPU check of
# this script's code path, run by the test suite).
SEVEN_B = dict(
    vocab=152064,
    hidden=3584,
    ffn=18944,
    layers=28,
    heads=28,
    kv_heads=4,
    mrope=[16, 24, 24],
    vision_hidden=1280,
    vision_ffn=3420,
    vision_depth=32,
    vision_heads=16,
    full_attention=[7, 15, 23, 31],
    audio_hidden=1280,
    audio_layers=32,
    audio_heads=20,
    audio_ffn=5120,
)
SMOKE = dict(
    vocab=4096,
    hidden=128,
    ffn=256,
    layers=2,
    heads=4,
    kv_heads=2,
    mrope=[4, 6, 6],
    vision_hidden=64,
    vision_ffn=128,
    vision_depth=2,
    vision_heads=4,
    full_attention=[1],
    audio_hidden=64,
    audio_layers=2,
    audio_heads=4,
    audio_ffn=128,
)


def model_configs(dims: dict, tokens):
    """The transformers configs of the VLM and the Whisper encoder at `dims` (SEVEN_B or SMOKE)."""
    from transformers import Qwen2_5_VLConfig, WhisperConfig

    d = dims
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=d["vocab"],
            hidden_size=d["hidden"],
            intermediate_size=d["ffn"],
            num_hidden_layers=d["layers"],
            num_attention_heads=d["heads"],
            num_key_value_heads=d["kv_heads"],
            max_position_embeddings=128000,
            bos_token_id=tokens.im_start,
            eos_token_id=tokens.im_end,
            pad_token_id=tokens.pad,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": d["mrope"]},
        ),
        vision_config=dict(
            depth=d["vision_depth"],
            hidden_size=d["vision_hidden"],
            intermediate_size=d["vision_ffn"],
            num_heads=d["vision_heads"],
            out_hidden_size=d["hidden"],
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=d["full_attention"],
        ),
        vision_start_token_id=tokens.vision_start,
        vision_end_token_id=tokens.vision_end,
        image_token_id=tokens.image_pad,
        video_token_id=tokens.video_pad,
        tie_word_embeddings=False,
    )
    whisper = WhisperConfig(
        num_mel_bins=128,
        d_model=d["audio_hidden"],
        encoder_layers=d["audio_layers"],
        encoder_attention_heads=d["audio_heads"],
        encoder_ffn_dim=d["audio_ffn"],
        decoder_layers=1,
        decoder_attention_heads=d["audio_heads"],
        decoder_ffn_dim=d["audio_ffn"],
        max_source_positions=1500,
    )
    return config, whisper


def seven_b_stage(stage: int, dims: dict = SEVEN_B, device: str = "meta", attn: str = "sdpa", overrides: tuple[str, ...] = ()):
    """The 7B preset's stage model, (config, StageModel): the VLM and Whisper encoder at `dims` built on
    `device` (meta: shapes only, for the sizing benchmarks; a GPU: random bf16 weights, for timing), with
    the stage's trainable parts added by vaemo's own stage builder."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from vaemo.config import load_config
    from vaemo.data import vocab
    from vaemo.model.build import assemble_model
    from vaemo.model.tokenizer import SpecialTokens, build_tiny_tokenizer
    from vaemo.model.vision import CLIP_MEAN, CLIP_STD
    from vaemo.train.objectives import build_stage_model, objective_for

    cfg = load_config(PRESET, list(overrides), stage=stage)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    tokenizer = build_tiny_tokenizer(vocab.corpus())  # only the embedding's size matters here: 152,064 rows
    tokens = SpecialTokens.of(tokenizer)
    vlm_config, whisper_config = model_configs(dims, tokens)
    whisper_config._attn_implementation = "sdpa"
    with torch.device(device):
        vlm = Qwen2_5_VLForConditionalGeneration._from_config(vlm_config, attn_implementation=attn, dtype=dtype)
        encoder = WhisperEncoder(whisper_config).to(dtype)
        model = assemble_model(vlm, encoder, tokenizer, tokens, (CLIP_MEAN, CLIP_STD), cfg.model, cfg.data, dtype)
        parts = build_stage_model(cfg, objective_for(cfg), model=model)
    return cfg, parts


def build(attn: str, frames: int, size: int, audio_seconds: float, dims: dict, device: str):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from vaemo.data import vocab
    from vaemo.model.audio import AudioProjector
    from vaemo.model.tokenizer import SpecialTokens, build_tiny_tokenizer
    from vaemo.model.vaemo_llm import ModelSpec, VAEmotionLLM
    from vaemo.model.vision import CLIP_MEAN, CLIP_STD, VisualSpec

    d = dims
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokenizer = build_tiny_tokenizer(vocab.corpus())  # ids fit in the 152k vocabulary; the text is short anyway
    tokens = SpecialTokens.of(tokenizer)
    config, whisper = model_configs(dims, tokens)
    whisper._attn_implementation = "sdpa" if attn == "flash_attention_2" else attn
    with torch.device(device):  # initialised where it runs: 8B parameters on a CPU would take minutes
        vlm = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation=attn, dtype=dtype)
        encoder = WhisperEncoder(whisper).to(dtype)
        projector = AudioProjector(d["audio_hidden"], d["hidden"], 2 * d["hidden"], 4).to(dtype)
    visual = VisualSpec(
        num_frames=frames,
        height=size,
        width=size,
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        frame_sampling="uniform",
    )
    spec = ModelSpec(
        visual=visual,
        audio_seconds=audio_seconds,
        n_mels=128,
        projector_stride=4,
        projector_hidden=2 * d["hidden"],
        tokens=tokens.to_dict(),
        system_prompt="You are a helpful assistant.",
        max_response_tokens=48,
    )
    model = VAEmotionLLM(vlm, encoder, projector, tokenizer, spec).to(device)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("projector."))
    return model


def clip_prompts(clips: int):
    from vaemo.data import vocab
    from vaemo.data.bench import mcq_prompt
    from vaemo.model import PromptItem

    items = []
    for i in range(clips):
        caption = (
            f"A {vocab.EMOTIONS[i % 4]} painting: a {vocab.OBJECTS[i % 4]} drifts over a warm, glowing field "
            "while soft chords rise and fall."
        )
        items.append(("Describe this artwork.", caption, i))
        for task in vocab.TASKS:
            options = list(vocab.OPTIONS[task])
            items.append((mcq_prompt(vocab.QUESTION_VARIANTS[task][0], options), options[i % 4], i))
    return [PromptItem("visual", p, r, i) for p, r, i in items], [PromptItem("audio", p, r, i) for p, r, i in items]


def step_flops(model, teacher, student, patches: int, audio_positions: int) -> float:
    """Model FLOPs of the step as run: matmuls 2 N per token (forward), attention 8 L d per attended
    (query, key) pair (4 L d S^2 for a causal sequence of S), and the student's backward through the
    frozen LLM (input gradients only: about one more forward). A packed pass (vaemo/model/packing.py)
    counts its packed tokens and the pairs its block mask allows."""
    text = model.vlm.config.text_config
    llm = sum(p.numel() for n, p in model.vlm.named_parameters() if ".visual." not in n and "embed_tokens" not in n)
    vision = sum(p.numel() for n, p in model.vlm.named_parameters() if ".visual." in n)
    audio = sum(p.numel() for p in model.audio_encoder.parameters())
    per_pair = 8 * text.num_hidden_layers * text.hidden_size

    def llm_pass(inputs) -> float:
        packing = model.packing_for(inputs)
        if packing is None:
            lengths = inputs.attention_mask.sum(1).tolist()
            return sum(2 * llm * s + per_pair * s * s / 2 for s in lengths)
        used = int(packing.scatter.unique().numel())  # packed positions some sequence reads: not padding
        return 2 * llm * used + per_pair * (int(packing.mask.sum()) - (packing.mask.shape[0] * packing.mask.shape[-1] - used))

    return llm_pass(teacher) + 2 * llm_pass(student) + 2 * vision * patches + 2 * audio * audio_positions


def run_once(attn: str, args) -> list[dict]:
    """Build the model for one attention implementation and time the step: with SDPA packed (vaemo's
    default) and unpacked, with FlashAttention-2 unpacked (it takes no block mask)."""
    import torch

    from vaemo.losses import distill, teacher_topk

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    model = build(attn, args.frames, args.size, args.audio_seconds, SMOKE if args.smoke else SEVEN_B, device)
    build_s = time.perf_counter() - started
    teacher_items, student_items = clip_prompts(args.clips)
    generator = torch.Generator().manual_seed(0)
    video = torch.randint(0, 256, (args.clips, args.frames, 3, args.size, args.size), dtype=torch.uint8, generator=generator)
    audio = torch.randn(args.clips, int(args.audio_seconds * 16000), generator=generator) * 0.1
    duration = [args.audio_seconds] * args.clips
    teacher = model.prompts.batch(teacher_items, video, None, duration)
    student = model.prompts.batch(student_items, None, audio, duration)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step():
        with torch.no_grad():
            hidden = model(teacher).hidden[teacher.pred_mask.to(device)]
            targets = teacher_topk(hidden, model.logits, args.topk, 1.0, 256)
        hidden = model(student).hidden[student.pred_mask.to(device)]
        kd = distill(hidden, model.logits, targets, 1.0, 256)
        (kd.kl_sum / kd.count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if cuda and k in name), None)
    # Tokens of the sequences the step trains on, however they are laid out: comparable across modes.
    tokens = int(teacher.attention_mask.sum() + student.attention_mask.sum())
    patches = args.clips * (args.frames // 2) * (args.size // 14) ** 2
    results = []
    for packed in [True, False] if attn == "sdpa" else [False]:
        model.pack_prefixes = packed
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(args.warmup + args.steps):
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        seconds = statistics.median(times)
        flops = step_flops(model, teacher, student, patches, int(args.audio_seconds * 50) * args.clips)
        label = f"{attn}{' packed' if packed else ''}"
        result = {
            "attn": label,
            "step_s": seconds,
            "tokens_per_s": tokens / seconds,
            "tokens": tokens,
            "tflops": flops / seconds / 1e12,
            "mfu": (flops / seconds / peak) if peak else math.nan,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else math.nan,
            "build_s": build_s,
            "device": name,
        }
        print(
            f"  {label}: step {seconds:.3f} s, {result['tokens_per_s']:.0f} tokens/s ({tokens} sequence tokens), "
            f"{result['tflops']:.0f} TFLOP/s, MFU {result['mfu']:.1%}, peak {result['peak_gib']:.1f} GiB, "
            f"built in {build_s:.0f} s",
            flush=True,
        )
        results.append(result)
    model = optimizer = None  # frees the GPU memory before the next attention implementation builds its model
    if cuda:
        torch.cuda.empty_cache()
    return results


def size(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.1f} GB" if n_bytes >= 1e9 else f"{n_bytes / 1e6:.1f} MB"


def preset_steps(args) -> list[dict]:
    """Stage 1's and stage 2's training steps as the 7B preset runs them, through vaemo's own objectives
    (its prompts, KD against the stage-1 model, the EmoAdapter's Enhancer, Supervisor and LoRA, activation
    checkpointing) on one GPU with plain AdamW: step time, and peak memory against bench/memory.py's
    estimate of the same step (one GPU, everything whole). The clips are captioned, so the teacher writes no
    responses of its own."""
    import torch
    from memory import AllocationPeak, estimate, plain_training

    from vaemo.model.build import choose_attention

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    attn = choose_attention("auto", torch.bfloat16)
    dims = SMOKE if args.smoke else SEVEN_B
    shapes = (
        (
            f"data.batch_size={args.clips}",
            f"data.num_frames={args.frames}",
            f"data.frame_height={args.size}",
            f"data.frame_width={args.size}",
            f"data.audio_seconds={args.audio_seconds}",
        )
        if args.smoke
        else ()
    )
    results = []
    for stage in (1, 2):
        cfg, meta_parts = seven_b_stage(stage, dims, "meta", attn, shapes)
        # CUDA's attention kernels keep what FlashAttention-2 keeps; the CPU's masked SDPA keeps probabilities
        guess = estimate(cfg, meta_parts, ranks=1, replicated=True, plain=True, attention="flash" if cuda else "eager")
        del meta_parts
        started = time.perf_counter()
        cfg, parts = seven_b_stage(stage, dims, device, attn, shapes)
        build_s = time.perf_counter() - started
        one_step, lasting = plain_training(cfg, parts)
        one_step(0)  # creates AdamW's state
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times, tracker = [], None
        for index in range(1, args.steps + 1):
            last = index == args.steps
            sync()
            t0 = time.perf_counter()
            if last and not cuda:  # on the CPU, the dispatch-mode tracker of bench/memory.py --check
                with AllocationPeak(lasting()) as tracker:
                    one_step(index)
            else:
                one_step(index)
            sync()
            times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() if cuda else tracker.peak
        result = {
            "stage": stage,
            "step_s": statistics.median(times),
            "peak_gb": peak / 1e9,
            "estimate_gb": guess.total / 1e9,
            "build_s": build_s,
        }
        parts_text = ", ".join(f"{k} {size(v)}" for k, v in guess.parts.items())
        print(
            f"  stage {stage} ({attn}, {cfg.data.batch_size} clips x {cfg.data.num_frames} frames "
            f"{cfg.data.frame_height}px, {cfg.data.audio_seconds:g} s audio): step {result['step_s']:.2f} s, "
            f"peak {size(peak)} vs estimate {size(guess.total)} ({parts_text}): "
            f"estimate/peak {guess.total / peak:.2f}; built in {build_s:.0f} s",
            flush=True,
        )
        results.append(result)
        parts = one_step = lasting = None  # frees the device before the next stage builds
        if cuda:
            torch.cuda.empty_cache()
    return results


def main() -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=8)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=224, help="frame height and width (multiple of 28)")
    p.add_argument("--audio-seconds", type=float, default=10.0)
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--smoke",
        action="store_true",
        help="a shrunken model (runs on a CPU): checks the code path; the preset steps then take their shapes "
        "from --clips/--frames/--size/--audio-seconds too",
    )
    args = p.parse_args()
    if not torch.cuda.is_available() and not args.smoke:
        print("GPU_STAGE1 skipped: no CUDA device (--smoke runs a shrunken model on the CPU)", flush=True)
        return 1
    from vaemo.model.build import choose_attention

    flash = choose_attention("auto", torch.bfloat16) == "flash_attention_2"
    print("stage-1 step, hand-built (8 clips x 16 frames 224 px unless told otherwise):", flush=True)
    results = run_once("sdpa", args)
    if flash:
        results += run_once("flash_attention_2", args)
    print("the 7B preset's steps through vaemo's objectives (its shapes), peak memory vs bench/memory.py:", flush=True)
    stages = preset_steps(args)
    parts = [
        f"{r['attn']} {r['tokens_per_s']:.0f} tok/s MFU {r['mfu']:.1%} peak {r['peak_gib']:.1f} GiB step {r['step_s']:.2f} s"
        for r in results
    ]
    parts += [
        f"preset stage {r['stage']} step {r['step_s']:.2f} s peak {size(r['peak_gb'] * 1e9)} "
        f"est {size(r['estimate_gb'] * 1e9)} ({r['estimate_gb'] / r['peak_gb']:.2f})"
        for r in stages
    ]
    smoke = " (smoke: shrunken model)" if args.smoke else ""
    print(
        f"GPU_STAGE1 {results[0]['device']}{smoke} | {args.clips} clips x {args.frames} frames {args.size}px | "
        + " | ".join(parts)
        + ("" if flash else " | flash-attn not installed or not for this GPU"),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
