"""VAEmotionLLM: a Qwen2.5-VL whose shared LLM also takes audio tokens, plus the EmoAdapter.

The forward pass is assembled from the VLM's own modules (input embeddings, vision tower, M-RoPE
index, language model, lm_head) so that a) audio tokens can be placed where video tokens would go,
b) logits are only computed at the positions a loss needs (the vocabulary of real models is ~152k),
and c) every submodule is called as a module, which is what DeepSpeed ZeRO-3 needs to gather it.
This module imports neither Ray nor DeepSpeed: it runs anywhere torch + transformers do.
"""

from __future__ import annotations

import itertools
import json
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from vaemo.errors import UserError
from vaemo.losses import sequence_logprobs
from vaemo.model.audio import AudioProjector, LogMel, audio_tokens, encode
from vaemo.model.emo import EmotionEnhancer, EmotionSupervisor
from vaemo.model.lora import LoRALinear, add_lora, merge_lora_state
from vaemo.model.packing import PrefixPacking, plan_packing
from vaemo.model.prompts import IGNORE, ModelInputs, PromptBuilder, PromptItem
from vaemo.model.tokenizer import SpecialTokens, load_tokenizer
from vaemo.model.vision import VisualSpec, use_matmul_patch_embedding, video_inputs

# index_reduce("amax") pools the per-row maxima of modality tokens; PyTorch flags the op as beta on
# every call, once per worker and step. Its result is covered by the tests.
warnings.filterwarnings("ignore", message=r"index_reduce\(\) is in beta")

CONFIG_NAME = "vaemo_config.json"
PARTS = {"projector": "audio_projector.safetensors", "adapter": "emo_adapter.safetensors", "lora": "lora.safetensors"}


@dataclass
class ModelSpec:
    """Everything besides weights that a saved VAEmotionLLM needs to be rebuilt and fed alike."""

    visual: VisualSpec
    audio_seconds: float
    n_mels: int
    projector_stride: int
    projector_hidden: int
    tokens: dict
    system_prompt: str = ""
    max_response_tokens: int = 64
    enhancer: dict | None = None  # {"width", "gate_init"} once stage 2 adds it
    supervisor: dict | None = None  # {"hidden", "classes"}
    lora: dict | None = None  # {"rank", "alpha", "targets"}: recorded; weights are merged at export
    history: list = field(default_factory=list)  # which stages produced this model
    audio_window: str = "clip"  # "full" or "clip" (vaemo/model/audio.py `encode`); exports before it: clip
    audio_fill: str = "silence"  # data.audio_fill of the last stage that trained it; exports before it: silence

    @classmethod
    def from_dict(cls, data: dict) -> "ModelSpec":
        data = dict(data)
        data["visual"] = VisualSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in data["visual"].items()})
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def read(cls, export: Path) -> "ModelSpec":
        """The spec an export folder was saved with (its LoRA merged into the LLM's weights at export)."""
        raw = json.loads((Path(export) / CONFIG_NAME).read_text())
        raw.pop("lora_merged", None)
        spec = cls.from_dict(raw)
        spec.lora = None
        return spec


@dataclass
class Embedded:
    """A batch ready for the language model."""

    embeds: torch.Tensor  # (B, L, D)
    attention: torch.Tensor  # (B, L)
    positions: torch.Tensor  # (3, B, L) M-RoPE positions
    pooled: torch.Tensor  # (B, D) mean of each sequence's (enhanced) modality tokens
    pooled_max: torch.Tensor  # (B, D) their per-channel maximum (small objects survive it, not the mean)


class ModelOutput(NamedTuple):
    """A NamedTuple, not a dataclass: DeepSpeed ZeRO-3 must find the tensors a module returns."""

    hidden: torch.Tensor  # (B, L, D) last hidden states
    pooled: torch.Tensor  # (B, D) mean of the modality tokens
    pooled_max: torch.Tensor  # (B, D) per-channel max of the modality tokens


class FP32Logits(nn.Linear):
    """The LLM head computing in fp32 whatever the model's dtype.

    bf16 logits round a logit of 20 to steps of 0.125: the tail probabilities the KL compares and the
    option log-likelihoods the scorer ranks would be lost. The upcast happens inside the module's
    forward, where ZeRO-3 has gathered the weight; for an fp32 model it changes nothing.
    """

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return F.linear(hidden.float(), self.weight.float(), bias)


def option_starts(option_counts: list[int]) -> list[int]:
    """The row of each item's first option, when items' options are consecutive rows."""
    return [0, *itertools.accumulate(option_counts)][:-1]


def per_item(means: list[float], option_counts: list[int]) -> list[list[float]]:
    """Per-option scores, consecutive per item, split into one list per item."""
    return [means[start : start + count] for start, count in zip(option_starts(option_counts), option_counts)]


def best_option(scores: list[float]) -> int:
    """The option a multiple-choice scorer picks: the highest score (the first of equals)."""
    return int(np.argmax(scores))


def prompt_builder(tokenizer, spec: ModelSpec) -> PromptBuilder:
    """The prompts a model with this spec reads (also what `vaemo ask` measures a question by before loading)."""
    return PromptBuilder(
        tokenizer,
        SpecialTokens(**spec.tokens),
        spec.visual.tokens_per_clip,
        audio_tokens(spec.audio_seconds, spec.projector_stride),
        spec.system_prompt,
        spec.max_response_tokens,
    )


class VAEmotionLLM(nn.Module):
    def __init__(self, vlm: nn.Module, audio_encoder: nn.Module, projector: AudioProjector, tokenizer, spec: ModelSpec):
        super().__init__()
        self.vlm = vlm
        self.audio_encoder = audio_encoder
        self.projector = projector
        self.log_mel = LogMel(spec.n_mels)
        self.enhancer: EmotionEnhancer | None = None
        self.enhancing = True  # False inside `as_stage1`
        self._shared_video: dict | None = None  # the last clips' vision-tower output, inside `sharing_video_tokens`
        self.supervisor: EmotionSupervisor | None = None
        self.pack_prefixes = True  # see `forward`; model.pack_prefixes turns it off
        self.tokenizer = tokenizer
        self.spec = spec
        if type(vlm.lm_head) is nn.Linear:
            # Swapping the class keeps the parameter (and its ZeRO-3 partitioning) and the state-dict keys.
            vlm.lm_head.__class__ = FP32Logits
        use_matmul_patch_embedding(vlm)
        from vaemo.model.window_attention import use_batched_window_attention  # imports Qwen2.5-VL's modeling code

        use_batched_window_attention(vlm)
        self.tokens = SpecialTokens(**spec.tokens)
        self.prompts = prompt_builder(tokenizer, spec)
        if spec.enhancer is not None:
            self.add_enhancer(**spec.enhancer)
        if spec.supervisor is not None:
            self.add_supervisor(**spec.supervisor)

    # -- structure -------------------------------------------------------------------------------

    @property
    def hidden_size(self) -> int:
        return self.vlm.config.text_config.hidden_size

    @property
    def audio_tokens_per_clip(self) -> int:
        return audio_tokens(self.spec.audio_seconds, self.spec.projector_stride)

    @property
    def audio_samples(self) -> int:
        """Samples of 16 kHz audio per clip the audio pathway takes."""
        return int(round(self.spec.audio_seconds * 16000))

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the weights (buffers such as the log-mel filters stay fp32)."""
        return self.vlm.lm_head.weight.dtype

    def add_enhancer(self, width: int, gate_init: float) -> None:
        """(Re)build the Emotion Enhancer (stage 2)."""
        self.enhancer = EmotionEnhancer(self.hidden_size, width, gate_init).to(self.dtype)
        self.spec.enhancer = {"width": width, "gate_init": gate_init}

    def add_supervisor(self, hidden: int, classes: list[str]) -> None:
        """(Re)build the Emotion Supervisor (stage 2); `classes` empty: valence/arousal only."""
        self.supervisor = EmotionSupervisor(self.hidden_size, hidden, classes).to(self.dtype)
        self.spec.supervisor = {"hidden": hidden, "classes": list(classes)}

    def add_lora(self, rank: int, alpha: float, targets: list[str]) -> list[str]:
        wrapped = add_lora(self.vlm.model.language_model, targets, rank, alpha)
        if not wrapped:
            raise UserError(f"model.lora.targets {targets} match no linear layer of the LLM")
        self.spec.lora = {"rank": rank, "alpha": alpha, "targets": list(targets)}
        return wrapped

    @property
    def has_vision(self) -> bool:
        return getattr(self.vlm.model, "visual", None) is not None

    def checkpoint_activations(self) -> None:
        """Recompute each transformer block in the backward pass instead of keeping its intermediates
        (transformers' own block-level checkpointing; non-reentrant, so frozen blocks between trainable
        parts still pass gradients through)."""
        for module in (self.vlm, self.audio_encoder):
            module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    def detach_vision(self) -> dict[str, torch.Tensor]:
        """Remove the vision tower (stage 1 from a teacher cache never runs it) and return its weights,
        named as in this model's state dict, so an export can put them back unchanged."""
        held = {f"vlm.model.visual.{k}": v.detach().cpu().clone() for k, v in self.vlm.model.visual.state_dict().items()}
        self.vlm.model.visual = None
        return held

    # -- pathways --------------------------------------------------------------------------------

    def video_tokens(self, video: torch.Tensor) -> torch.Tensor:
        """(C, F, 3, H, W) uint8 -> (C, N_v, D): vision tower + merger."""
        if not self.has_vision:
            raise RuntimeError("this model's vision tower was detached (stage 1 from a teacher cache)")
        pixels, grid = video_inputs(video, self.spec.visual, self.dtype)
        pixels, grid = pixels.to(self.vlm.device), grid.to(self.vlm.device)
        merged = self.vlm.model.get_video_features(pixels, grid).pooler_output
        return torch.stack(list(merged))

    def clip_video_tokens(self, video: torch.Tensor, clips: list[int]) -> torch.Tensor:
        """`video_tokens(video[clips])`; inside `sharing_video_tokens`, rows of the last call on the same
        video tensor when that call covered these clips."""
        shared = self._shared_video
        if shared is not None and shared.get("video") is video and set(clips) <= set(shared["clips"]):
            return shared["tokens"][[shared["clips"].index(c) for c in clips]]
        tokens = self.video_tokens(video[clips])
        if shared is not None:
            shared.update(video=video, clips=list(clips), tokens=tokens)
        return tokens

    @contextmanager
    def sharing_video_tokens(self):
        """Passes over the same clips run the vision tower once: stage 2's KD teacher reads the frames its LM
        pass has just encoded (the Enhancer acts after the tower, so both views see the same tokens). Only a
        frozen tower qualifies, so the reused tokens carry no graph and equal a fresh pass; every rank decides
        alike, as ZeRO-3 needs."""
        frozen = self.has_vision and not any(p.requires_grad for p in self.vlm.model.visual.parameters())
        self._shared_video = {} if frozen else None
        try:
            yield self
        finally:
            self._shared_video = None

    def audio_tokens(self, audio: torch.Tensor) -> torch.Tensor:
        """(C, S) 16 kHz -> (C, N_a, D): log-mel, Whisper encoder (on spec.audio_window), projector."""
        audio = audio.to(self.log_mel.window.device)
        return self.projector(encode(self.audio_encoder, self.log_mel, audio, self.spec.audio_window))

    def _dummy_video(self) -> torch.Tensor:
        v = self.spec.visual
        unit = v.patch_size * v.merge_size
        return torch.zeros(1, v.temporal_patch_size, 3, unit, unit, dtype=torch.uint8)

    # -- forward ---------------------------------------------------------------------------------

    def embed(self, inputs: ModelInputs, run_all_pathways: bool = False) -> Embedded:
        """Token embeddings with video/audio tokens in their placeholders, and M-RoPE positions.

        With `run_all_pathways`, a pathway the batch does not use still runs on a tiny dummy input:
        under ZeRO-3 every rank must run every submodule every step, or the ranks wait on each other
        forever. Its output, times zero, is added to the embeddings rather than returned: ZeRO-3 also
        hooks each returned tensor that needs a gradient, so ranks must return alike.
        """
        device = self.vlm.device
        ids = inputs.input_ids.to(device)
        embeds = self.vlm.get_input_embeddings()(ids)
        batch, dim = ids.shape[0], embeds.shape[-1]
        pooled_sum = embeds.new_zeros(batch, dim)
        pooled_count = embeds.new_zeros(batch, 1)
        pooled_max = embeds.new_full((batch, dim), float("-inf"))
        zero = embeds.new_zeros(())

        def place(rows: list[int], tokens: torch.Tensor, placeholder: int) -> None:
            nonlocal embeds, pooled_sum, pooled_max
            clips = sorted({inputs.clips[i] for i in rows})
            per_row = tokens[[clips.index(inputs.clips[i]) for i in rows]].to(embeds.dtype)  # (R, N, D)
            mask = (ids == placeholder).unsqueeze(-1)
            if int(mask.sum()) != per_row.shape[0] * per_row.shape[1]:  # placeholders must match features
                raise AssertionError(f"{int(mask.sum())} placeholders for {per_row.shape[0] * per_row.shape[1]} features")
            embeds = embeds.masked_scatter(mask, per_row.reshape(-1, dim))
            index = torch.tensor(rows, device=device)
            pooled_sum = pooled_sum.index_add(0, index, per_row.sum(1))
            pooled_max = pooled_max.index_reduce(0, index, per_row.amax(1), "amax")
            pooled_count[rows] += per_row.shape[1]

        def enhance(tokens: torch.Tensor) -> torch.Tensor:
            return self.enhancer(tokens) if self.enhancer is not None and self.enhancing else tokens

        visual_rows = [i for i, m in enumerate(inputs.modalities) if m in ("visual", "audio_visual")]
        if visual_rows:
            clips = sorted({inputs.clips[i] for i in visual_rows})
            place(visual_rows, enhance(self.clip_video_tokens(inputs.video, clips)), self.tokens.video_pad)
        elif run_all_pathways and self.has_vision:
            zero = zero + 0.0 * enhance(self.video_tokens(self._dummy_video())).sum()

        audio_rows = [i for i, m in enumerate(inputs.modalities) if m in ("audio", "audio_visual")]
        if audio_rows:
            clips = sorted({inputs.clips[i] for i in audio_rows})
            place(audio_rows, enhance(self.audio_tokens(inputs.audio[clips])), self.tokens.audio_pad)
            markers = self.projector_markers().to(embeds.dtype)
            embeds = torch.where((ids == self.tokens.audio_start).unsqueeze(-1), markers[0], embeds)
            embeds = torch.where((ids == self.tokens.audio_end).unsqueeze(-1), markers[1], embeds)
        elif run_all_pathways:
            dummy = self.audio_tokens(torch.zeros(1, self.audio_samples))
            zero = zero + 0.0 * (enhance(dummy).sum() + self.projector_markers().sum())

        attention = inputs.attention_mask.to(device)
        if visual_rows:
            v = self.spec.visual
            grid = torch.tensor([v.grid] * len(visual_rows), dtype=torch.long, device=device)
            seconds_per_grid = torch.tensor(
                [v.temporal_patch_size * inputs.duration[inputs.clips[i]] / v.num_frames for i in visual_rows], device=device
            )
            positions, _ = self.vlm.model.get_rope_index(
                ids,
                inputs.mm_token_type_ids.to(device),
                video_grid_thw=grid,
                second_per_grid_ts=seconds_per_grid,
                attention_mask=attention,
            )
        else:  # text-like positions only; padding-aware for left-padded generation batches
            positions = (attention.cumsum(-1) - 1).clamp(min=0).unsqueeze(0).expand(3, -1, -1)
        embeds = embeds + zero.to(embeds.dtype)
        pooled_max = torch.where(pooled_count > 0, pooled_max, torch.zeros_like(pooled_max))
        return Embedded(embeds, attention, positions, pooled_sum / pooled_count.clamp(min=1), pooled_max)

    @contextmanager
    def as_stage1(self):
        """The model as stage 1 left it, while stage 2 trains: no Enhancer residual, no LoRA update. Stage 2's
        KD teacher runs in it, so its targets stay where stage 1 put them instead of moving with the adapter.
        (Every rank skips the same modules: ZeRO-3 ranks stay in step.)"""
        loras = [m for m in self.modules() if isinstance(m, LoRALinear)]
        self.enhancing = False
        for lora in loras:
            lora.active = False
        try:
            yield self
        finally:
            self.enhancing = True
            for lora in loras:
                lora.active = True

    def forward(self, inputs: ModelInputs, run_all_pathways: bool = False) -> ModelOutput:
        """Hidden states of every position (logits are left to the caller: see `logits`).

        Sequences of one clip and modality that share a prompt prefix run it once (vaemo/model/packing.py)
        when the attention takes a block mask; the hidden states are the same either way.
        """
        e = self.embed(inputs, run_all_pathways)
        lm = self.vlm.model.language_model
        packing = self.packing_for(inputs)
        if packing is None:
            hidden = lm(
                inputs_embeds=e.embeds, attention_mask=e.attention, position_ids=e.positions, use_cache=False
            ).last_hidden_state  # one pass, no generation: a KV cache is dead weight
        else:
            device = e.embeds.device
            hidden = packing.unpack(
                lm(
                    inputs_embeds=packing.pack(e.embeds),
                    attention_mask=packing.mask.to(device),
                    position_ids=packing.pack_positions(e.positions),
                    use_cache=False,
                ).last_hidden_state
            )
        return ModelOutput(hidden=hidden, pooled=e.pooled, pooled_max=e.pooled_max)

    def packing_for(self, inputs: ModelInputs) -> PrefixPacking | None:
        """How `forward` lays out these sequences: packed by shared prefix, or None (as they are)."""
        if not self.pack_prefixes or self.vlm.model.language_model.config._attn_implementation != "sdpa":
            return None
        return plan_packing(inputs.input_ids, inputs.attention_mask, list(zip(inputs.clips, inputs.modalities)))

    def projector_markers(self) -> torch.Tensor:
        """(2, D): the <|audio_start|>/<|audio_end|> embeddings, through a module call (ZeRO-3 safe)."""
        return self.projector.markers(torch.arange(2, device=self.vlm.device))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.vlm.lm_head(hidden)

    # -- inference -------------------------------------------------------------------------------

    @torch.no_grad()
    def score_options(
        self,
        items: list[tuple[str, str, list[str], int]],
        video: torch.Tensor | None,
        audio: torch.Tensor | None,
        duration: list[float],
        chunk: int = 256,
    ) -> tuple[list[list[float]], torch.Tensor]:
        """Length-normalised log-likelihood of every option, all options of all items in one batch.

        items: (modality, question text, options, clip row). Returns per-item option scores and the
        pooled modality tokens of each item (for the Emotion Supervisor).
        """
        prompts = [PromptItem(m, q, option, c) for m, q, options, c in items for option in options]
        inputs = self.prompts.batch(prompts, video, audio, duration)
        means, out = self.option_means(inputs, chunk)
        counts = [len(options) for _, _, options, _ in items]
        return per_item(means, counts), out.pooled[option_starts(counts)]

    def option_means(
        self, inputs: ModelInputs, chunk: int = 256, chunks: int = 0, run_all_pathways: bool = False
    ) -> tuple[list[float], ModelOutput]:
        """Each sequence's mean log-likelihood of its response (an option, when sequences ask a multiple-choice
        question once per option), and the forward's output. `chunks`/`run_all_pathways`: as under ZeRO-3,
        where every rank must run the same chunks and pathways (validation inside training)."""
        out = self.forward(inputs, run_all_pathways)
        hidden = out.hidden[inputs.pred_mask.to(out.hidden.device)]
        return sequence_logprobs(hidden, self.logits, inputs.response_targets, inputs.response_lengths(), chunk, chunks), out

    @torch.no_grad()
    def emotion(
        self, items: list[PromptItem], video: torch.Tensor | None, audio: torch.Tensor | None, duration: list[float]
    ) -> torch.Tensor | None:
        """(B, 2) valence/arousal the Emotion Supervisor reads from each prompt's modality tokens (None without one)."""
        if self.supervisor is None:
            return None
        prompts = [PromptItem(i.modality, i.instruction, None, i.clip) for i in items]
        pooled = self.embed(self.prompts.batch(prompts, video, audio, duration)).pooled
        return self.supervisor(pooled)[0].float().cpu()

    @torch.no_grad()
    def generate(
        self,
        items: list[PromptItem],
        video: torch.Tensor | None,
        audio: torch.Tensor | None,
        duration: list[float],
        max_new_tokens: int = 48,
        lockstep: bool = False,
    ) -> list[str]:
        """Greedy decoding with a KV cache, prompts left-padded. `lockstep` runs all `max_new_tokens` steps
        even when every sequence has ended (under ZeRO-3, ranks must make the same calls)."""
        from transformers import DynamicCache

        prompts = [PromptItem(i.modality, i.instruction, None, i.clip) for i in items]
        e = self.embed(self.prompts.batch(prompts, video, audio, duration, left_pad=True))
        lm = self.vlm.model.language_model
        cache = DynamicCache(config=lm.config)
        hidden = lm(
            inputs_embeds=e.embeds, attention_mask=e.attention, position_ids=e.positions, cache=cache, use_cache=True
        ).last_hidden_state
        attention, position = e.attention, e.positions[..., -1]  # (3, B): the last prompt token's position
        finished = [False] * len(items)
        generated: list[list[int]] = [[] for _ in items]
        for _ in range(max_new_tokens):
            token = self.logits(hidden[:, -1]).argmax(-1)
            for row, value in enumerate(token.tolist()):
                if not finished[row]:
                    finished[row] = value == self.tokens.im_end
                    if not finished[row]:
                        generated[row].append(value)
            if all(finished) and not lockstep:
                break
            attention = torch.cat([attention, attention.new_ones(len(items), 1)], 1)
            position = position + 1
            hidden = lm(
                inputs_embeds=self.vlm.get_input_embeddings()(token[:, None]),
                attention_mask=attention,
                position_ids=position[..., None],
                cache=cache,
                use_cache=True,
            ).last_hidden_state
        return [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in generated]

    # -- save / load -----------------------------------------------------------------------------

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every weight's full shape (under ZeRO-3 a partitioned parameter keeps it in `ds_shape`)."""
        return {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in self.named_parameters()}

    def save_pretrained(self, out_dir: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write a folder `from_pretrained` loads; refuses when a weight is missing or mis-sized.

        `state_dict` is the full, gathered state (ZeRO-3 export passes it); default: this module's.
        LoRA weights are merged into the LLM and also saved on their own.
        """
        from safetensors.torch import save_file

        state = {k: v.detach().cpu() for k, v in (state_dict if state_dict is not None else self.state_dict()).items()}
        expected = self.expected_shapes()
        missing = sorted(k for k in expected if k not in state)
        wrong = sorted(k for k in expected if k in state and tuple(state[k].shape) != expected[k])
        if not self.has_vision and not any(k.startswith("vlm.model.visual.") for k in state):
            missing.append("vlm.model.visual.* (the detached vision tower)")
        if missing or wrong:
            detail = (f"missing {missing[:3]}" if missing else "") + (f" mis-sized {wrong[:3]}" if wrong else "")
            raise RuntimeError(f"refusing to export an incomplete model: {detail}")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix) :]: v.contiguous() for k, v in state.items() if k.startswith(prefix)}

        vlm_state = part("vlm.")
        if self.spec.lora:
            save_file({k: v for k, v in vlm_state.items() if ".lora_" in k}, str(out / PARTS["lora"]))
            vlm_state = merge_lora_state(vlm_state, self.spec.lora["alpha"] / self.spec.lora["rank"])
        self.vlm.save_pretrained(out / "vlm", state_dict=vlm_state)
        self.audio_encoder.save_pretrained(out / "audio_encoder", state_dict=part("audio_encoder."))
        save_file(part("projector."), str(out / PARTS["projector"]))
        if self.enhancer is not None or self.supervisor is not None:
            save_file(
                {k: v.contiguous() for k, v in state.items() if k.startswith(("enhancer.", "supervisor."))},
                str(out / PARTS["adapter"]),
            )
        self.tokenizer.save_pretrained(out / "tokenizer")
        spec = self.spec.to_dict()
        spec["lora_merged"] = bool(self.spec.lora)
        (out / CONFIG_NAME).write_text(json.dumps(spec, indent=2))

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        attn_implementation: str = "sdpa",
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> "VAEmotionLLM":
        """Load a saved VAEmotionLLM; any missing, unexpected or mis-sized weight is an error. `device`: the
        VLM and the audio encoder are read straight onto it (the small parts are built on the host)."""
        from safetensors.torch import load_file
        from transformers import Qwen2_5_VLForConditionalGeneration
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        path = Path(path)
        if not (path / CONFIG_NAME).is_file():
            raise UserError(f"'{path}' is not a vaemo model folder (no {CONFIG_NAME})")
        spec = ModelSpec.read(path)
        with sized_as_configured(path / "vlm"):
            vlm, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                path / "vlm", attn_implementation=attn_implementation, dtype=dtype, output_loading_info=True, **device_map(device)
            )
        check_loading(path / "vlm", info)
        with sized_as_configured(path / "audio_encoder"):
            audio_encoder, info = WhisperEncoder.from_pretrained(
                path / "audio_encoder",
                attn_implementation=attn_implementation,
                dtype=dtype,
                output_loading_info=True,
                **device_map(device),
            )
        check_loading(path / "audio_encoder", info)
        tokenizer = load_tokenizer(path / "tokenizer")
        projector = AudioProjector(
            audio_encoder.config.d_model, vlm.config.text_config.hidden_size, spec.projector_hidden, spec.projector_stride
        ).to(dtype)
        model = cls(vlm, audio_encoder, projector, tokenizer, spec)
        _load_part(model.projector, load_file(str(path / PARTS["projector"])), path / PARTS["projector"])
        if spec.enhancer is not None or spec.supervisor is not None:
            adapter = load_file(str(path / PARTS["adapter"]))
            for name in ("enhancer", "supervisor"):
                part = {k[len(name) + 1 :]: v for k, v in adapter.items() if k.startswith(f"{name}.")}
                if getattr(model, name) is not None:
                    _load_part(getattr(model, name), part, path / PARTS["adapter"])
                elif part:
                    raise UserError(f"'{path / PARTS['adapter']}' holds {name} weights its config does not declare")
        # No model.to(dtype): that would also cast the buffers that must stay fp32 (the log-mel filters
        # and window, the RoPE frequencies); every part was built or loaded in `dtype` already.
        return model


def device_map(device: torch.device | None) -> dict:
    """from_pretrained's arguments that read the weights straight onto `device` (none: the host)."""
    return {"device_map": {"": device}} if device is not None else {}


@contextmanager
def sized_as_configured(where: Path) -> Iterator[None]:
    """transformers raises before `check_loading` can see mis-sized weights (its ignore_mismatched_sizes
    error, after a table of every key): the same one line as any other mismatch."""
    try:
        yield
    except RuntimeError as err:
        if "ignore_mismatched_sizes" not in str(err):
            raise
        raise UserError(f"'{where}' does not match its config: weights of other sizes than config.json gives") from None


def check_loading(where: Path, info: dict) -> None:
    problems = {k: info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)}
    if problems:
        kind, keys = next(iter(problems.items()))
        raise UserError(f"'{where}' does not match its config: {kind.replace('_', ' ')} {sorted(keys)[:3]}")


def _load_part(module: nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in expected if k in state and tuple(state[k].shape) != expected[k])
    if missing or unexpected or wrong:
        raise UserError(
            f"'{where}' does not match the model: missing {missing[:3]} unexpected {unexpected[:3]} mis-sized {wrong[:3]}"
        )
    module.load_state_dict(state)


__all__ = ["VAEmotionLLM", "ModelSpec", "ModelOutput", "IGNORE"]
