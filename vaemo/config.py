"""The typed, validated config tree: YAML presets in configs/, `key=value` dotted overrides.

A preset holds settings for the whole pipeline. Per-stage settings live under `stages.stageN` in the
preset and are merged over the top-level sections when stage N runs; command-line overrides are
applied last, so `train.max_steps=5` always wins. A preset may start from another (`base: tiny.yaml`, a path
relative to it) and change only what differs. Every field is documented where it is declared (the
string under it); `vaemo config show` prints the resolved tree with those docs as comments.

Why plain dataclasses and a small hand-written loader (`load_config` to the end, about 240 lines) rather than
pydantic, which Ray already installs: the tree is read by Ray workers, Tune trials and DeepSpeed's config
builder as plain attribute access and `dataclasses.asdict`, and the loader's three jobs are narrow (dotted
overrides merged over per-stage sections; coercion of YAML and command-line strings to the declared type;
errors that name the dotted field and suggest the nearest one, exit status 2). Pydantic v2 would bring the
coercion and `extra="forbid"`, but not the stage merging, the override parsing or the error wording, and it
would put a second validation model beside the one the checks (`check` methods) implement.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import functools
import inspect
import math
import os
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from vaemo.errors import UserError, read_user_text

MODALITIES: tuple[str, ...] = ("audio", "visual", "audio_visual")
STAGES = (0, 1, 2)


class ConfigError(UserError):
    """A config key or value is wrong; the message names the field."""


# ----------------------------------------------------------------------------------------------
# The tree
# ----------------------------------------------------------------------------------------------


@dataclass
class SynthConfig:
    """The ArtEmo-Synth world written by `vaemo data synth` (spec/artemo-synth.md)."""

    train_clips: int = 2400
    """Clips in the train split."""
    val_clips: int = 192
    """Clips in the validation split (balanced over emotion x object)."""
    bench_clips: int = 192
    """Clips behind the ArtEmoBench test folder; each is asked 6 questions (3 modalities x 2 tasks)."""
    clips_per_shard: int = 100
    """Samples per webdataset tar shard."""
    short_side: list[int] = field(default_factory=lambda: [64, 224])
    """[low, high]: each clip's shorter frame side in pixels, drawn uniformly (spec: >= 64)."""
    aspect_ratio: list[float] = field(default_factory=lambda: [0.5625, 1.7778])
    """[low, high]: each clip's width / height, drawn log-uniformly (9:16 to 16:9 by default)."""
    fps: list[int] = field(default_factory=lambda: [10, 60])
    """[low, high]: each clip's frame rate, drawn uniformly (spec: 10-60)."""
    min_duration: float = 2.0
    """Shortest clip in seconds (spec: 2-8 s)."""
    max_duration: float = 8.0
    """Longest clip in seconds (spec: 2-8 s)."""
    sample_rates: list[int] = field(default_factory=lambda: [16000, 22050, 24000, 32000, 44100, 48000])
    """Audio sample rates a clip draws from (spec: 16-48 kHz)."""
    channels: list[int] = field(default_factory=lambda: [1, 2])
    """Audio channel counts a clip draws from (spec: mono or stereo)."""
    formats: list[str] = field(default_factory=lambda: ["mp4", "mkv", "webm", "mov"])
    """Containers a clip draws from: mp4 and mov (H.264 + AAC), mkv (MPEG-4 part 2 + Vorbis), webm (VP9 + Opus)."""
    domain_randomization: bool = True
    """Also randomise the rendering choices the spec leaves open (edge softness, outlines, the star's inner
    radius, background grain, band limits, the pluck's filter, small envelope and onset jitter)."""
    workers: int = 0
    """Processes rendering and encoding clips; 0 means one per CPU core."""

    def check(self, path: str) -> None:
        def pair(name: str, low: float, high: float) -> None:
            value = getattr(self, name)
            _require(
                len(value) == 2 and low <= value[0] <= value[1] <= high,
                f"{path}.{name}",
                f"must be [low, high] within {low}-{high}",
            )

        pair("short_side", 64, 4096)
        pair("aspect_ratio", 0.1, 10.0)
        pair("fps", 10, 60)
        _require(
            2.0 <= self.min_duration <= self.max_duration <= 8.0,
            f"{path}.min_duration",
            "and max_duration must satisfy 2 <= min_duration <= max_duration <= 8",
        )
        _require(
            bool(self.sample_rates) and all(16000 <= r <= 48000 for r in self.sample_rates),
            f"{path}.sample_rates",
            "must be a non-empty list of rates within 16000-48000",
        )
        _require(bool(self.channels) and set(self.channels) <= {1, 2}, f"{path}.channels", "must list 1 and/or 2")
        known = ("mp4", "mkv", "webm", "mov")
        _require(
            bool(self.formats) and set(self.formats) <= set(known), f"{path}.formats", f"must list some of {', '.join(known)}"
        )
        for name in ("train_clips", "val_clips", "bench_clips", "clips_per_shard"):
            _require(getattr(self, name) > 0, f"{path}.{name}", "must be > 0")
        _require(self.workers >= 0, f"{path}.workers", "must be >= 0 (0: one per CPU core)")


@dataclass
class DataConfig:
    """Where the clips are and how they are decoded and batched."""

    train_shards: str = "runs/data/train/*.tar"
    """Training shards: a glob, brace notation (`shards-{000..009}.tar`) or a URL webdataset opens."""
    val_shards: str = "runs/data/val/*.tar"
    """Validation shards, same notation; used for the periodic validation loss."""
    bench_dir: str = "runs/data/bench"
    """An ArtEmoBench folder (docs/data-formats.md) used by evaluations and sweeps."""
    num_frames: int = 8
    """Frames sampled uniformly over each clip; must be a multiple of the vision tower's temporal patch."""
    frame_height: int = 112
    """Decoded frame height in px; must be a multiple of patch_size x spatial_merge_size."""
    frame_width: int = 112
    """Decoded frame width in px; must be a multiple of patch_size x spatial_merge_size."""
    frame_sampling: Literal["uniform", "pairs"] = "uniform"
    """`uniform` frames over the clip, or uniformly spaced `pairs` of frames `pair_seconds` apart (a sharp
    picture plus motion in one temporal patch). Frames are chosen by time, whatever the clip's frame rate."""
    pair_seconds: float = 0.1
    """With `pairs`: the time between a pair's two frames (the nearest frame; at 10 fps, the next one); > 0."""
    frame_fit: Literal["letterbox", "crop", "stretch"] = "letterbox"
    """A clip of another aspect ratio than frame_height x frame_width: `letterbox` keeps all of the picture
    (black bars), `crop` keeps its centre at the scale of the shorter side, `stretch` keeps all of the
    picture without bars, its shapes squeezed by the aspect ratios' quotient."""
    audio_seconds: float = 4.0
    """Soundtrack length fed to the audio pathway: longer clips are cut, shorter ones filled (audio_fill).
    Frames come from the same window. Training draws where a longer clip's window starts, per clip;
    evaluation cuts it from the middle. A window shorter than the training clips lets training windows open
    anywhere in the sound, as windows cut from longer clips at evaluation do."""
    audio_fill: Literal["repeat", "silence"] = "repeat"
    """How a soundtrack shorter than audio_seconds fills the window: `repeat` it (as LAION-CLAP's
    "repeatpad"), or pad it with `silence` (as WhisperFeatureExtractor does). Whisper's log-mel floors every
    frame at the clip's peak minus 80 dB, so a silent tail carries the clip's peak loudness and, by its
    length, its duration: a model trained on clips shorter than the window learns to read them there and
    then misjudges clips that fill it. The export records the fill its last stage used; evaluation and
    `vaemo ask` decode alike."""
    audio_phase: Literal["start", "random"] = "start"
    """Where, in training, a soundtrack shorter than audio_seconds starts before it repeats: at its `start`,
    or at a `random` phase drawn per clip (its samples rotated), as a window cut from the middle of a longer
    clip starts anywhere in a note. Evaluation always starts at the clip's start. With `repeat` fill only.
    The tiny preset keeps `start` and makes its window (2 s) shorter than its clips (2-3 s) instead, so that
    training windows open between notes without a rotated soundtrack wrapping around mid-window (README,
    "Shaping the tiny preset")."""
    batch_size: int = 8
    """Clips per micro-batch on each training worker."""
    loader_workers: int = 1
    """DataLoader worker processes per training worker (decoding runs there); 0 decodes in-process."""
    shuffle_buffer: int = 64
    """Samples held in each loader worker's shuffle buffer for training streams."""
    prefetch_batches: int = 4
    """Batches each loader worker prepares ahead. The loader takes batches from its workers in turn, so a
    worker whose batch happens to be slow (clips differ 10x in decode cost) stalls the others once they
    hold this many; 4 keeps the workers busy (`bench/data_throughput.py`: 1.93 of 2 cores, vs 1.87 at 2).
    Each held batch is num_frames x frame size x batch_size bytes of shared memory."""
    decoded_cache_mb: int = 0
    """MiB of decoded clips each training loader worker keeps in memory and reuses when its stream draws the
    same clip again (each rank's loader workers read fixed shards, so a dataset read for several epochs
    decodes each clip once; clips past the budget are decoded on every draw). Host memory per rank is up to
    loader_workers x this. 0: off, as for a data set too large to read twice."""
    max_unusable_samples: int = 400
    """Samples a stream may read in a row without one the stage can use before the run stops (exit 2) with
    the counts by reason; the preflight probes the shards the same way before any weight loads."""
    decode_timeout_s: float = 300.0
    """Seconds a training loader worker may spend decoding one clip (a few ms to seconds normally) before it is
    stopped and the stream goes on without that clip (skip: decoder_hang): a file that sends FFmpeg into an
    endless loop would otherwise hang the run (the other ranks wait 30 min in a collective). 0: never.
    Validation, the teacher cache, the preflight and decoding without loader workers skip such a clip instead
    and leave the thread stuck on it behind (evaluation and `vaemo data inspect` do so with this default)."""

    def check(self, path: str) -> None:
        _require(self.num_frames >= 2, f"{path}.num_frames", "must be >= 2")
        _require(self.frame_height >= 28 and self.frame_width >= 28, f"{path}.frame_height", "and frame_width must be >= 28")
        _require(0.5 <= self.audio_seconds <= 30.0, f"{path}.audio_seconds", "must be within 0.5-30 s")
        _require(self.pair_seconds > 0, f"{path}.pair_seconds", "must be > 0 (a pair's second frame comes after its first)")
        _require(self.batch_size >= 1, f"{path}.batch_size", "must be >= 1")
        _require(self.loader_workers >= 0, f"{path}.loader_workers", "must be >= 0")
        _require(self.shuffle_buffer >= 1, f"{path}.shuffle_buffer", "must be >= 1")
        _require(self.prefetch_batches >= 1, f"{path}.prefetch_batches", "must be >= 1")
        _require(self.decoded_cache_mb >= 0, f"{path}.decoded_cache_mb", "must be >= 0")
        _require(self.max_unusable_samples >= 1, f"{path}.max_unusable_samples", "must be >= 1")
        _require(self.decode_timeout_s >= 0, f"{path}.decode_timeout_s", "must be >= 0 (0: never)")


@dataclass
class TinyVLMConfig:
    """Sizes of the tiny Qwen2.5-VL built from config when `model.vlm: tiny` (same classes as 7B)."""

    hidden_size: int = 128
    """LLM hidden size."""
    num_layers: int = 4
    """LLM decoder layers."""
    num_heads: int = 4
    """LLM attention heads."""
    num_kv_heads: int = 2
    """LLM key/value heads (grouped-query attention)."""
    intermediate_size: int = 256
    """LLM MLP width."""
    vision_hidden_size: int = 96
    """Vision tower width."""
    vision_depth: int = 4
    """Vision tower blocks."""
    vision_heads: int = 4
    """Vision tower attention heads."""
    vision_intermediate_size: int = 192
    """Vision tower MLP width."""
    patch_size: int = 14
    """Vision patch size in px."""
    spatial_merge_size: int = 2
    """Patches merged per side into one LLM token."""
    temporal_patch_size: int = 2
    """Frames per temporal patch."""

    def check(self, path: str) -> None:
        for name, value in dataclasses.asdict(self).items():
            _require(value >= 1, f"{path}.{name}", "must be >= 1")
        # What transformers' Qwen2.5-VL needs, checked here so that it fails before Ray starts: attention splits
        # the width into heads, grouped-query attention shares each key/value head among whole groups, the
        # LLM's RoPE rotates pairs of a head's channels, and the vision tower's 2-D RoPE builds a rotation
        # 4 * ceil(width / 4) wide (height and width halves of pairs).
        heads, kv = self.num_heads, self.num_kv_heads
        width = self.hidden_size // heads
        _require(self.hidden_size % heads == 0, f"{path}.hidden_size", f"must be a multiple of num_heads ({heads})")
        _require(heads % kv == 0, f"{path}.num_heads", f"must be a multiple of num_kv_heads ({kv})")
        _require(width % 2 == 0, f"{path}.hidden_size", f"/ num_heads (a head's width, {width}) must be even")
        vision_heads = self.vision_hidden_size // self.vision_heads
        _require(
            self.vision_hidden_size % self.vision_heads == 0 and vision_heads % 4 == 0,
            f"{path}.vision_hidden_size",
            f"must be a multiple of vision_heads ({self.vision_heads}) with a head width that is a multiple of 4",
        )


@dataclass
class TinyAudioConfig:
    """Sizes of the tiny Whisper encoder built from config when `model.audio_encoder: tiny`."""

    d_model: int = 96
    """Encoder width."""
    num_layers: int = 2
    """Encoder layers."""
    num_heads: int = 4
    """Encoder attention heads."""
    ffn_dim: int = 192
    """Encoder MLP width."""
    num_mel_bins: int = 80
    """Log-mel bins (80 as in Whisper up to v2, 128 for large-v3)."""

    def check(self, path: str) -> None:
        for name, value in dataclasses.asdict(self).items():
            _require(value >= 1, f"{path}.{name}", "must be >= 1")
        _require(self.d_model % self.num_heads == 0, f"{path}.d_model", f"must be a multiple of num_heads ({self.num_heads})")


@dataclass
class ProjectorConfig:
    """The trainable audio projector: encoder features -> LLM input embeddings."""

    pool_stride: int = 4
    """Encoder frames (50 per second) stacked (concatenated) into one audio token; 4 gives 12.5 tokens/s.
    data.audio_seconds must hold at least one token's worth (the preflight checks)."""
    hidden_size: int = 0
    """Hidden width of the 2-layer MLP; 0 means twice the LLM hidden size."""

    def check(self, path: str) -> None:
        _require(self.pool_stride >= 1, f"{path}.pool_stride", "must be >= 1")
        _require(self.hidden_size >= 0, f"{path}.hidden_size", "must be >= 0")


@dataclass
class EnhancerConfig:
    """Emotion Enhancer: x + g * MLP(LayerNorm(x)) on every modality token (stage 2)."""

    width: int = 256
    """Hidden width of the residual MLP."""
    gate_init: float = 0.0
    """Initial gate g; 0 makes stage 2 start exactly where stage 1 ended."""


@dataclass
class SupervisorConfig:
    """Emotion Supervisor: valence/arousal (and optional category) heads on pooled modality tokens."""

    hidden_size: int = 128
    """Hidden width of the heads."""
    categorical: bool = True
    """Also predict the emotion category (one class per stage2.emotions entry)."""


@dataclass
class LoRAConfig:
    """Optional LoRA on the LLM's attention projections (stage 2)."""

    rank: int = 0
    """LoRA rank; 0 turns LoRA off."""
    alpha: float = 16.0
    """LoRA scaling numerator (scale = alpha / rank)."""
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Names of the LLM linear layers that get adapters."""

    def check(self, path: str) -> None:
        _require(self.rank >= 0, f"{path}.rank", "must be >= 0 (0 turns LoRA off)")
        if self.rank:
            _require(self.alpha > 0, f"{path}.alpha", "must be > 0 (a scale of 0 trains adapters that change nothing)")
            _require(bool(self.targets), f"{path}.targets", "must name at least one layer when rank > 0")


@dataclass
class ModelConfig:
    """Which VLM and audio encoder to build, and the trainable parts vaemo adds."""

    vlm: str = "tiny"
    """`tiny` (a small Qwen2.5-VL built from config) or a local Qwen2.5-VL checkpoint folder."""
    audio_encoder: str = "tiny"
    """`tiny` (a small Whisper encoder built from config) or a local Whisper checkpoint folder."""
    init_from: Optional[str] = None
    """A vaemo export folder to start from (the previous stage's RUN_DIR/export); overrides vlm/audio."""
    tiny_vlm: TinyVLMConfig = field(default_factory=TinyVLMConfig)
    """Sizes used when vlm is `tiny`."""
    tiny_audio: TinyAudioConfig = field(default_factory=TinyAudioConfig)
    """Sizes used when audio_encoder is `tiny`."""
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    """The audio projector."""
    enhancer: EnhancerConfig = field(default_factory=EnhancerConfig)
    """The Emotion Enhancer (built in stage 2)."""
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
    """The Emotion Supervisor (built in stage 2)."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA on the LLM (stage 2, optional)."""
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    """`auto`: FlashAttention-2 when flash-attn imports on a CUDA device, else PyTorch SDPA."""
    pack_prefixes: bool = True
    """Run the prompt prefix a clip's sequences share (its video/audio tokens, the question) once per clip
    and modality, with a block attention mask; the results are the same. SDPA only (FlashAttention-2 runs
    unpacked). See vaemo/model/packing.py."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """`auto`: bfloat16 on GPU, float32 on CPU."""
    activation_checkpointing: bool = False
    """Training keeps only each transformer block's input and recomputes the block in the backward pass (the
    LLM's, the vision tower's and the audio encoder's blocks): activation memory falls from every block's
    intermediates to one block's, for about one more forward pass of compute. The 7B preset turns it on."""
    audio_window: Literal["auto", "full", "clip"] = "auto"
    """What the Whisper encoder runs on. `full`: the 30 s window it was trained on (the clip, then
    silence, as WhisperFeatureExtractor pads it), keeping the frames that cover the clip; `clip`: only
    the clip's frames (faster; close to `full`, not equal: see the README). `auto`: `full` for a
    checkpoint encoder, `clip` for the tiny one (whose window is the clip)."""
    system_prompt: str = "You are a helpful assistant."
    """System turn of the chat template; '' leaves it out (the tiny preset does, to keep sequences short)."""
    max_response_tokens: int = 48
    """Cap on a response's length in tokens (captions, answers)."""


@dataclass
class TrainConfig:
    """The optimisation loop shared by all stages (per-stage values under `stages.stageN.train`)."""

    max_steps: int = 100
    """Optimizer steps of the schedule; the training stream is resampled, so this fixes the run length."""
    stop_after: int = 0
    """Stop (with a checkpoint) after this step, keeping the max_steps schedule; 0 runs to max_steps."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    warmup_steps: int = 10
    """Linear warm-up steps before cosine decay."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Gradient-norm clipping (DeepSpeed `gradient_clipping`); 0 disables it."""
    checkpoint_every: int = 50
    """Save a checkpoint every N steps (and at the end)."""
    keep_checkpoints: int = 2
    """How many recent checkpoints Ray Train keeps."""
    report_every: int = 10
    """Report metrics (metrics.jsonl, TensorBoard, progress line) every N steps."""
    val_every: int = 0
    """Run the validation loss every N steps; 0 only at the end."""
    val_batches: int = 4
    """Validation micro-batches per worker each time validation runs: the worker's validation shards read in
    order from their first clip (the same clips every time). More than the shards hold repeats clips, which
    the run says before it starts."""
    export: bool = True
    """Write RUN_DIR/export (a folder `from_pretrained` loads) at the end."""

    def check(self, path: str) -> None:
        _require(self.max_steps >= 1, f"{path}.max_steps", "must be >= 1")
        _require(0 <= self.stop_after <= self.max_steps, f"{path}.stop_after", "must be within 0-max_steps")
        _require(self.lr > 0 and math.isfinite(self.lr), f"{path}.lr", "must be a positive number")
        _require(self.warmup_steps >= 0, f"{path}.warmup_steps", "must be >= 0")
        _require(0.0 <= self.min_lr_ratio <= 1.0, f"{path}.min_lr_ratio", "must be within 0-1")
        _require(self.checkpoint_every >= 1, f"{path}.checkpoint_every", "must be >= 1")
        _require(self.keep_checkpoints >= 1, f"{path}.keep_checkpoints", "must be >= 1")
        _require(self.report_every >= 1, f"{path}.report_every", "must be >= 1")
        _require(self.val_every >= 0, f"{path}.val_every", "must be >= 0")
        _require(self.val_batches >= 0, f"{path}.val_batches", "must be >= 0")
        _require(self.grad_clip >= 0, f"{path}.grad_clip", "must be >= 0")


@dataclass
class ScalingConfig:
    """How many Ray Train workers, and what each one gets."""

    num_workers: int = 2
    """Training worker processes (one per GPU on a cluster, one per CPU slot on a laptop)."""
    use_gpu: bool = False
    """Give each worker a GPU (NCCL, bf16); false runs on CPU with gloo."""
    cpus_per_worker: float = 1.0
    """CPUs Ray reserves per worker; also the torch thread count on CPU."""
    max_failures: int = 1
    """Worker-group restarts Ray Train attempts (from the last checkpoint) before giving up."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Ray placement strategy for the worker group."""
    autoscaling: bool = False
    """The cluster adds nodes on demand (KubeRay, Ray's cluster launcher with a minimum of 0 GPU nodes): a
    worker group its nodes cannot hold yet is left to the autoscaler, with one line, instead of refused."""

    def check(self, path: str) -> None:
        _require(self.num_workers >= 1, f"{path}.num_workers", "must be >= 1")
        _require(self.cpus_per_worker > 0, f"{path}.cpus_per_worker", "must be > 0")
        _require(self.max_failures >= 0, f"{path}.max_failures", "must be >= 0")


@dataclass
class DeepSpeedConfig:
    """DeepSpeed engine settings; the JSON holds ZeRO settings, the run config fills in the rest."""

    config: str = "ds_configs/zero3.json"
    """A DeepSpeed JSON (relative paths resolve against the project root)."""
    frozen_weights: Literal["partitioned", "replicated"] = "partitioned"
    """Under ZeRO-3, where the frozen weights live. `partitioned`: ZeRO-3 shards them like the rest and
    all-gathers them in every forward and backward pass. `replicated`: every rank keeps a whole copy
    (they must fit on one GPU beside the activations) and ZeRO-3 never gathers them, so a step moves
    only the trainable parts. Frozen tensors below the JSON's `stage3_param_persistence_threshold` stay
    with ZeRO-3, which keeps small tensors whole anyway. Ignored under ZeRO-0/1/2."""
    leaf_modules: list[str] = field(default_factory=lambda: ["auto"])
    """Under ZeRO-3, module classes (by class name) fetched whole: all of a block's parameters in one gather
    when it runs, and no DeepSpeed hooks on the modules inside it. `auto` (default) stands for the blocks
    each transformers model names in `_no_split_modules` (decoder layers, vision blocks, Whisper encoder
    layers). On a small model ZeRO-3's per-module hooks, not its bytes, are what it costs
    (bench/trainer_overhead.py); at 7B a decoder layer's gather is about 0.5 GB in bf16. Blocks that hold
    trainable parameters (the audio encoder in stage 1, LoRA-wrapped decoder layers in stage 2) keep the
    per-module hooks: DeepSpeed reduces a whole block's gradients each time the block's backward runs,
    twice in a step that runs the block twice. `[]`: hooks on every module. Names that match no module are
    skipped; workers/rankR.json lists the classes marked and those left hooked. Ignored under ZeRO-0/1/2."""


@dataclass
class Stage0Config:
    """Stage 0 ("see"): teach a VLM from scratch to see, standing in for a pretrained VLM."""

    aux_weight: float = 1.0
    """Weight of the auxiliary heads (one per labelled question set: emotion, and each prompts.questions set
    with an answer_field) on pooled visual tokens (a stand-in for pretraining)."""
    questions_per_clip: int = 1
    """Multiple-choice questions of each labelled set asked per clip and step, beside one caption."""
    vision_warmup_steps: int = 0
    """First steps run only the vision tower and the auxiliary heads (no LLM pass, so they are cheap): a
    tiny LLM trained jointly from scratch learns to ignore still-noisy visual tokens and hardly recovers.
    Validation always measures the whole objective (LM and heads), the one the stage ends on."""

    def check(self, path: str) -> None:
        _require(self.aux_weight >= 0, f"{path}.aux_weight", "must be >= 0")
        _require(self.questions_per_clip >= 0, f"{path}.questions_per_clip", "must be >= 0")
        _require(self.vision_warmup_steps >= 0, f"{path}.vision_warmup_steps", "must be >= 0")


@dataclass
class TeacherConfig:
    """Where stage 1's teacher distributions come from."""

    mode: Literal["online", "cache"] = "online"
    """`online`: run the frozen visual teacher every step; `cache`: read its top-k log-probs from a cache
    written by `vaemo teacher-cache` (no vision tower is built, no teacher pass runs; needs stage1.topk > 0)."""
    cache_dir: str = ""
    """The teacher-cache folder (its shards are named like the train/val shards they cover)."""


@dataclass
class PromptsConfig:
    """What the stages ask about a clip. The defaults are generic; the tiny preset names the synthetic
    world's words (its tokenizer knows only those)."""

    describe: list[str] = field(
        default_factory=lambda: [
            "Describe this clip.",
            "What happens in this clip?",
            "Describe the scene and the mood of this clip.",
        ]
    )
    """Description prompts (stage 0, stage 1, and stage 2's KD term); the response is the clip's caption (stage
    0) or, in stages 1 and 2, the caption or the frozen teacher's own answer (stage1.responses)."""
    questions: dict[str, Any] = field(default_factory=dict)
    """Multiple-choice question sets, `task: {ask: [paraphrases...], options: [...], answer_field: F}`, that
    stage 1 (stage1.questions) and stage 2's KD term (stage2.kd_questions) distil, answered with a random
    option: no label is used. With the optional `answer_field` (the clip's JSON field holding the right
    option, e.g. `object`), stage 0 asks the set with that answer (and trains a head on it), and stage 2's
    validation also scores it (`val_<task>_acc`)."""
    emotion_questions: list[str] = field(
        default_factory=lambda: ["Which emotion does this clip convey?", "What feeling does this clip express?"]
    )
    """How stages 0 and 2 ask for a clip's emotion (options: stage2.emotions); validation asks the first."""

    def check(self, path: str) -> None:
        _require(
            bool(self.describe) and all(isinstance(p, str) and p for p in self.describe),
            f"{path}.describe",
            "must be a non-empty list of prompts",
        )
        _require(bool(self.emotion_questions), f"{path}.emotion_questions", "must name at least one question")
        for task, spec in self.questions.items():
            ok = (
                isinstance(spec, dict)
                and {"ask", "options"} <= set(spec) <= {"ask", "options", "answer_field"}
                and isinstance(spec["ask"], list)
                and spec["ask"]
                and isinstance(spec["options"], list)
                and len(spec["options"]) >= 2
                and isinstance(spec.get("answer_field", ""), str)
            )
            _require(
                ok,
                f"{path}.questions.{task}",
                "must be {ask: [questions...], options: [at least 2], answer_field: FIELD (optional)}",
            )


@dataclass
class Stage1Config:
    """Stage 1 (VG-Align): distil the frozen visual pass into the audio pass."""

    temperature: float = 1.0
    """Softmax temperature tau of the KL term (loss is tau^2 * KL)."""
    topk: int = 0
    """0: full-vocabulary KL; k > 0: KL over the teacher's top-k tokens plus one tail bucket."""
    kd_chunk_size: int = 256
    """Response positions per chunk of the KL; bounds memory at chunk x vocab."""
    questions: bool = True
    """Also distil the teacher's answers to the question sets of `prompts.questions` (answered with a random
    option, so no label is used); nothing to ask when there are none."""
    responses: Literal["auto", "caption", "teacher"] = "auto"
    """The response to a description prompt: `caption` (the clip's caption field; clips without one are
    skipped), `teacher` (the frozen teacher's own greedy answer from the frames, the student distilled on
    it: stage 1 needs no label at all), `auto` (the caption when the clip has one, else the teacher's)."""
    teacher_response_tokens: int = 32
    """Length of a teacher-written response; every rank generates exactly this many tokens (ZeRO-3 ranks
    must make the same calls)."""
    train_audio_encoder: bool = False
    """Also train the audio encoder (a randomly initialised tiny one must learn; a pretrained Whisper need not)."""
    audio_encoder_top_layers: int = 0
    """Also train the audio encoder's last N transformer layers and its final layer norm: a pretrained
    encoder's top adapts to what the LLM reads, for a fraction of the whole encoder's gradients and optimizer
    state (0: none; train_audio_encoder trains all of it)."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """Online teacher or offline cache."""

    def check(self, path: str) -> None:
        _require(self.temperature > 0, f"{path}.temperature", "must be > 0")
        _require(self.topk >= 0, f"{path}.topk", "must be >= 0")
        _require(self.kd_chunk_size >= 1, f"{path}.kd_chunk_size", "must be >= 1")
        _require(self.teacher_response_tokens >= 1, f"{path}.teacher_response_tokens", "must be >= 1")
        _require(self.audio_encoder_top_layers >= 0, f"{path}.audio_encoder_top_layers", "must be >= 0")
        _require(
            not (self.train_audio_encoder and self.audio_encoder_top_layers),
            f"{path}.audio_encoder_top_layers",
            "must be 0 with train_audio_encoder=true (which trains the whole encoder)",
        )
        if self.teacher.mode == "cache":
            _require(self.topk > 0, f"{path}.topk", "must be > 0 with teacher.mode=cache (the cache holds top-k)")
            _require(bool(self.teacher.cache_dir), f"{path}.teacher.cache_dir", "must name the cache folder")


@dataclass
class Stage2Config:
    """Stage 2 (EmoAdapter): Enhancer + Supervisor, LM loss on emotion answers, KD to keep audio aligned."""

    use_enhancer: bool = True
    """Train the Emotion Enhancer (false for the ablation)."""
    use_supervisor: bool = True
    """Train with the Emotion Supervisor's valence/arousal loss (false for the ablation)."""
    lambda_lm: float = 1.0
    """Weight of the language loss on emotion-instruction answers."""
    lambda_sup: float = 1.0
    """Weight of the valence/arousal supervision on each path."""
    lambda_cat: float = 0.5
    """Weight of the categorical emotion head (when the supervisor has one)."""
    lambda_kd: float = 0.5
    """Weight of the KD term that keeps what stage 1 taught: the audio pass distils the visual pass of the
    model as stage 1 left it (without the Enhancer and LoRA, so the targets do not move)."""
    kd_questions: bool = True
    """The KD term also distils the answers to prompts.questions (content, not only emotion), not only
    the description (as stage 1 does with stage1.questions)."""
    kd_temperature: float = 1.0
    """Softmax temperature of stage 2's KD term (stage 1's is stage1.temperature)."""
    kd_topk: int = 0
    """0: full-vocabulary KL in stage 2's KD term; k > 0: the teacher's top-k tokens plus a tail bucket."""
    va_loss: Literal["mse", "ccc"] = "mse"
    """Valence/arousal loss. `mse`: the squared error summed over valence and arousal, averaged over every
    rank's labelled rows (so twice a mean over both numbers); `ccc`: 1 - concordance correlation, averaged
    over valence and arousal, of every rank's labelled rows together (the whole batch, however it is split
    over ranks; with fewer than two rows in all, each rank's mean squared error)."""
    emotions: list[str] = field(
        default_factory=lambda: ["amusement", "awe", "contentment", "excitement", "anger", "disgust", "fear", "sadness"]
    )
    """Emotion categories (default: ArtEmis's eight): the options of emotion questions and the categorical
    head's classes. A training clip whose `emotion` is not one of them is skipped (`unknown_emotion`)."""

    def check(self, path: str) -> None:
        for name in ("lambda_lm", "lambda_sup", "lambda_cat", "lambda_kd"):
            _require(getattr(self, name) >= 0, f"{path}.{name}", "must be >= 0")
        supervised = self.use_supervisor and (self.lambda_sup > 0 or self.lambda_cat > 0)
        _require(
            self.lambda_lm > 0 or self.lambda_kd > 0 or supervised,
            f"{path}.lambda_lm",
            "lambda_kd and the Supervisor's weights are all 0 (or use_supervisor is false): stage 2 would train nothing",
        )
        _require(self.kd_temperature > 0, f"{path}.kd_temperature", "must be > 0")
        _require(self.kd_topk >= 0, f"{path}.kd_topk", "must be >= 0")
        _require(len(set(self.emotions)) >= 2, f"{path}.emotions", "must name at least 2 different emotions")


@dataclass
class EvalConfig:
    """ArtEmoBench scoring."""

    actors: int = 2
    """Ray actors, each holding one model replica (one GPU each on a cluster)."""
    batch_items: int = 16
    """Benchmark items per scoring batch."""
    deaf_check: bool = True
    """Also score the audio items with soundtracks shuffled between clips."""
    max_items: int = 0
    """Score only the first N items (0: all); for smoke runs."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Precision of each replica: auto is bf16 on a GPU that has bf16 arithmetic, else fp32."""
    cpus_per_actor: float = 1.0
    """CPUs Ray reserves per actor."""
    gpus_per_actor: Optional[float] = None
    """GPUs Ray reserves per actor; unset: one when the cluster has a GPU when scoring starts, or when it
    starts GPU nodes on demand (scaling.use_gpu and scaling.autoscaling: the pool then waits for them),
    else none."""


@dataclass
class Config:
    """One run of vaemo: data, model, optimisation, scaling, and the per-stage method settings."""

    seed: int = 0
    """Seed for model init, data order and every random choice; same seed, same losses on CPU."""
    stage: int = 0
    """The stage this resolved config runs (set by jobs/stageN.py)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Clips and decoding."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The optimisation loop."""
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    """Ray Train workers."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """DeepSpeed engine."""
    stage0: Stage0Config = field(default_factory=Stage0Config)
    """Stage 0 settings."""
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    """What the stages ask about a clip."""
    stage1: Stage1Config = field(default_factory=Stage1Config)
    """Stage 1 settings."""
    stage2: Stage2Config = field(default_factory=Stage2Config)
    """Stage 2 settings."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation settings."""
    synth: SynthConfig = field(default_factory=SynthConfig)
    """Synthetic world generation."""

    def check(self, path: str) -> None:
        _require(self.stage in STAGES, "stage", "must be 0, 1 or 2")


# ----------------------------------------------------------------------------------------------
# Loading, overrides, validation
# ----------------------------------------------------------------------------------------------


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config field '{name}' {message}")


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), stage: int | None = None) -> Config:
    """Load a preset, merge `stages.stageN` for the given stage, apply `key=value` overrides, validate."""
    tree: dict[str, Any] = {}
    if path is not None:
        tree = _read_preset(Path(path))
    stage_blocks = tree.pop("stages", None) or {}
    if not isinstance(stage_blocks, dict):
        raise ConfigError("config field 'stages' must be a mapping of stage0/stage1/stage2 blocks")
    unknown = set(stage_blocks) - {f"stage{s}" for s in STAGES}
    if unknown:
        raise ConfigError(f"unknown config key 'stages.{sorted(unknown)[0]}' (expected stage0, stage1 or stage2)")
    if stage is not None:
        tree = _deep_merge(tree, stage_blocks.get(f"stage{stage}") or {})
        tree["stage"] = stage
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(tree, key, value)
    cfg = _build(Config, tree, "")
    _check_all(cfg, "")
    _make_paths_absolute(cfg)
    return cfg


# Fields naming local files or folders. A relative one means "from where the command runs"; Ray workers
# and actors run in other working directories, so they receive it made absolute.
PATH_FIELDS = (
    "data.train_shards",
    "data.val_shards",
    "data.bench_dir",
    "model.init_from",
    "model.vlm",
    "model.audio_encoder",
    "stage1.teacher.cache_dir",
)


def local_path(value: str | None) -> str | None:
    """A `file:` URL (file:/data/x.tar, file:///data/x.tar, file:shards/*.tar) as the local path it names;
    anything else unchanged. Local paths are checked, globbed and made absolute; other URLs are passed on."""
    if not value or not value.startswith("file:"):
        return value
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    return url2pathname(urlparse(value).path) if value.startswith("file://") else url2pathname(value[len("file:") :])


def _make_paths_absolute(cfg: "Config") -> None:
    for dotted in PATH_FIELDS:
        *parents, name = dotted.split(".")
        owner = cfg
        for parent in parents:
            owner = getattr(owner, parent)
        value = local_path(getattr(owner, name))
        as_given = not value or value == "tiny" or "://" in value or value.startswith(("pipe:", "{"))
        if not as_given:
            setattr(owner, name, os.path.abspath(os.path.expanduser(value)))


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def differing_fields(before: dict, now: dict, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """{dotted field: (now's value, before's value)} where two config mappings differ (fields `now` has)."""
    out = {}
    for key, value in now.items():
        other = before.get(key)
        if isinstance(value, dict) and isinstance(other, dict):
            out.update(differing_fields(other, value, f"{prefix}{key}."))
        elif value != other:
            out[f"{prefix}{key}"] = (value, other)
    return out


def config_from_dict(data: dict[str, Any]) -> Config:
    """The inverse of config_to_dict (how workers and Tune trials receive a resolved config)."""
    cfg = _build(Config, data, "")
    _check_all(cfg, "")
    return cfg


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, each field preceded by its documentation."""
    Path(path).write_text(render_config(cfg))


def render_config(cfg: Config) -> str:
    lines: list[str] = [f"# Resolved vaemo config (stage {cfg.stage}). Every field is documented above it."]
    _render(cfg, 0, lines)
    return "\n".join(lines) + "\n"


def _render(obj: Any, indent: int, lines: list[str]) -> None:
    docs = field_docs(type(obj))
    pad = "  " * indent
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if docs.get(f.name):
            lines.append(f"{pad}# {docs[f.name]}")
        if dataclasses.is_dataclass(value):
            lines.append(f"{pad}{f.name}:")
            _render(value, indent + 1, lines)
        else:
            dumped = yaml.safe_dump({f.name: value}, default_flow_style=True, width=1000).strip()
            lines.append(f"{pad}{dumped[1:-1] if dumped.startswith('{') else dumped}")


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each dataclass field (torchtitan style), by field name."""
    return dict(_parsed_field_docs(cls))


@functools.cache
def _parsed_field_docs(cls: type) -> dict[str, str]:
    # Parsing a class's source takes ~40 ms; every checkpoint writes the documented config, so parse once.
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                if isinstance(nxt.value.value, str):
                    docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _read_yaml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise ConfigError(f"config file '{path}' is a folder; give a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(read_user_text(path, "config file", ConfigError)) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file '{path}' is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping at its top level")
    return data


def _read_preset(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A preset's tree, merged over the tree of the preset its `base` names (recursively)."""
    tree = _read_yaml(path)
    base = tree.pop("base", None)
    if base is None:
        return tree
    if not isinstance(base, str) or not base:
        raise ConfigError(f"config field 'base' in '{path}' must be the path of another preset, got {base!r}")
    seen = (*seen, path.resolve())
    base_path = (path.parent / base).resolve()
    if base_path in seen:
        raise ConfigError(f"config field 'base' in '{path}': presets starting from each other ({base_path})")
    return _deep_merge(_read_preset(base_path, seen), tree)


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item or item.startswith("="):
        raise ConfigError(f"override '{item}' must look like key=value (e.g. train.max_steps=10)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override '{key}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def build_dataclass(cls: type, data: Any, path: str = "") -> Any:
    """A typed config dataclass from a mapping; unknown keys and wrong types raise ConfigError."""
    return _build(cls, data, path)


def check_tree(obj: Any, path: str = "") -> None:
    """Run every `check` method of a config tree (range and consistency checks)."""
    _check_all(obj, path)


def _build(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config field '{path.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{path}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{path}{key}'{hint}")
        kwargs[key] = _coerce(hints[key], value, f"{path}{key}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path + ".")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, path)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config field '{path}' must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config field '{path}' must be a mapping, got {value!r}")
        return dict(value)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config field '{path}' must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config field '{path}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config field '{path}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config field '{path}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config field '{path}' must be a string, got {value!r}")
    if tp is Any:
        return value
    raise TypeError(f"unsupported config type {tp!r} at {path}")  # a bug in this module, not user input


def _check_all(obj: Any, path: str) -> None:
    check = getattr(obj, "check", None)
    if callable(check):
        check(path.rstrip(".") or "config")
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_all(value, f"{path}{f.name}.")


def project_root() -> Path:
    """The repository root (holds ds_configs/, configs/); also what Ray ships to workers."""
    return Path(__file__).resolve().parent.parent


def resolve_path(path: str | Path) -> Path:
    """Resolve a config path: absolute as is, else against the current directory, else the project root."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p.resolve() if p.exists() else p
    rooted = project_root() / p
    return rooted if rooted.exists() else p.resolve()


__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "ScalingConfig",
    "SynthConfig",
    "MODALITIES",
    "load_config",
    "dump_config",
    "render_config",
    "field_docs",
    "config_to_dict",
    "project_root",
    "resolve_path",
]
