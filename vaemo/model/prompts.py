"""Prompts for the three modalities, in Qwen's chat template, batched into model inputs.

A checkpoint's tokenizer brings its chat template, which renders the prompt (Qwen2.5-VL's adds its
default system turn when no system prompt is set); a tokenizer without one (the tiny world's) gets the
same layout built by hand:

    <|im_start|>system\\n{system}<|im_end|>\\n            (when a system prompt is set)
    <|im_start|>user\\n[VIDEO][AUDIO]{instruction}<|im_end|>\\n<|im_start|>assistant\\n{response}<|im_end|>

[VIDEO] is <|vision_start|> + video_pad x N_v + <|vision_end|> (visual, audio_visual);
[AUDIO] is <|audio_start|> + audio_pad x N_a + <|audio_end|> (audio, audio_visual). Audio tokens are
text positions for M-RoPE; video tokens get 3-D positions from the VLM's own get_rope_index.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache, partial

import torch

from vaemo.config import MODALITIES
from vaemo.model.tokenizer import SpecialTokens

IGNORE = -100
AUDIO_PLACEHOLDER = "<|audio_start|><|audio_pad|><|audio_end|>"
INSTRUCTION_SLOT = "\x00instruction\x00"  # where the chat template puts the question, tokenised apart as plain text


@dataclass
class PromptItem:
    """One sequence: a clip (row `clip` of the batch's clips) seen through `modality`, asked, answered."""

    modality: str
    instruction: str
    response: str | None  # None: prompt only, for generation
    clip: int


@dataclass
class ModelInputs:
    """A padded batch of sequences plus the clips their modality tokens come from."""

    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    mm_token_type_ids: torch.Tensor  # (B, L): 2 on video placeholders, 0 elsewhere
    targets: torch.Tensor  # (B, L): the token at response positions, IGNORE elsewhere
    modalities: list[str]
    clips: list[int]  # per sequence, the row in `video` / `audio`
    video: torch.Tensor | None  # (C, F, 3, H, W) uint8: the batch's clips
    audio: torch.Tensor | None  # (C, S) float32 16 kHz
    duration: list[float]  # (C,) seconds, for the temporal positions of video tokens

    @property
    def pred_mask(self) -> torch.Tensor:
        """(B, L) True where the next token is a response token (the positions whose logits matter)."""
        mask = torch.zeros_like(self.targets, dtype=torch.bool)
        mask[:, :-1] = self.targets[:, 1:] != IGNORE
        return mask

    @property
    def response_targets(self) -> torch.Tensor:
        """(N,) the response tokens, in the row-major order of pred_mask."""
        return self.targets[:, 1:][self.targets[:, 1:] != IGNORE]

    def response_lengths(self) -> list[int]:
        return (self.targets != IGNORE).sum(1).tolist()


class PromptBuilder:
    def __init__(
        self,
        tokenizer,
        tokens: SpecialTokens,
        video_tokens: int,
        audio_tokens: int,
        system_prompt: str = "",
        max_response_tokens: int = 64,
    ):
        self.tokenizer = tokenizer
        self.tokens = tokens
        self.video_tokens = video_tokens
        self.audio_tokens = audio_tokens
        self.system_prompt = system_prompt
        self.max_response_tokens = max_response_tokens

    @lru_cache(maxsize=4096)  # noqa: B019 (a builder lives as long as its model: the cache may hold it)
    def text(self, text: str) -> tuple[int, ...]:
        """Text a user or a data set wrote, as plain text: `<|video_pad|>` in a question is not a placeholder
        (it broke the count of video tokens) and `<|im_end|>` in a caption does not end the turn."""
        return tuple(self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))

    def sequence(self, item: PromptItem) -> tuple[list[int], int]:
        """Token ids of one item and the index where its response starts."""
        if item.modality not in MODALITIES:
            raise ValueError(f"unknown modality {item.modality!r}")
        if getattr(self.tokenizer, "chat_template", None):
            ids = list(self.templated(item.modality, item.instruction))
        else:
            ids = self.hand_built(item.modality, item.instruction)
        start = len(ids)
        if item.response is not None:
            ids += [*self.text(item.response)[: self.max_response_tokens], self.tokens.im_end]
        return ids, start

    def conversation(self, modality: str, instruction: str) -> list[dict]:
        """The chat a prompt renders: the user turn holds the video (Qwen's own content type), the audio
        placeholder (text, as Qwen2-Audio writes it: the template passes it through) and the question."""
        content: list[dict] = []
        if modality in ("visual", "audio_visual"):
            content.append({"type": "video"})
        if modality in ("audio", "audio_visual"):
            content.append({"type": "text", "text": AUDIO_PLACEHOLDER})
        content.append({"type": "text", "text": instruction})
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*system, {"role": "user", "content": content}]

    @lru_cache(maxsize=4096)  # noqa: B019 (as above)
    def templated(self, modality: str, instruction: str) -> tuple[int, ...]:
        """The checkpoint's own chat template, with its one video/audio placeholder expanded to the
        number of modality tokens (as Qwen2.5-VL's processor expands <|video_pad|>)."""
        text = self.tokenizer.apply_chat_template(
            self.conversation(modality, INSTRUCTION_SLOT), tokenize=False, add_generation_prompt=True
        )
        before, after = text.split(INSTRUCTION_SLOT)  # the template's own special tokens, around the user's text
        encode = partial(self.tokenizer.encode, add_special_tokens=False)
        ids = [*encode(before), *self.text(instruction), *encode(after)]
        expanded: list[int] = []
        for token in ids:
            if token == self.tokens.video_pad:
                expanded += [token] * self.video_tokens
            elif token == self.tokens.audio_pad:
                expanded += [token] * self.audio_tokens
            else:
                expanded.append(token)
        wants = {"video": modality != "audio", "audio": modality != "visual"}
        found = {"video": ids.count(self.tokens.video_pad), "audio": ids.count(self.tokens.audio_pad)}
        if any(found[k] != int(wants[k]) for k in wants):
            raise ValueError(f"the tokenizer's chat template rendered {found} placeholders for a {modality} prompt")
        return tuple(expanded)

    def hand_built(self, modality: str, instruction: str) -> list[int]:
        """Qwen's chat format for a tokenizer without a chat template (the tiny world's)."""
        t = self.tokens
        ids: list[int] = []
        if self.system_prompt:
            ids += [t.im_start, *self.text(f"system\n{self.system_prompt}"), t.im_end, *self.text("\n")]
        ids += [t.im_start, *self.text("user\n")]
        if modality in ("visual", "audio_visual"):
            ids += [t.vision_start] + [t.video_pad] * self.video_tokens + [t.vision_end]
        if modality in ("audio", "audio_visual"):
            ids += [t.audio_start] + [t.audio_pad] * self.audio_tokens + [t.audio_end]
        ids += [*self.text(instruction), t.im_end, *self.text("\n"), t.im_start, *self.text("assistant\n")]
        return ids

    def batch(
        self,
        items: list[PromptItem],
        video: torch.Tensor | None,
        audio: torch.Tensor | None,
        duration: list[float],
        left_pad: bool = False,
    ) -> ModelInputs:
        """Pad to the longest sequence (right by default; left for generation)."""
        encoded = [self.sequence(item) for item in items]
        length = max(len(ids) for ids, _ in encoded)
        shape = (len(items), length)
        input_ids = torch.full(shape, self.tokens.pad, dtype=torch.long)
        attention = torch.zeros(shape, dtype=torch.long)
        targets = torch.full(shape, IGNORE, dtype=torch.long)
        for row, (ids, start) in enumerate(encoded):
            offset = length - len(ids) if left_pad else 0
            input_ids[row, offset : offset + len(ids)] = torch.tensor(ids)
            attention[row, offset : offset + len(ids)] = 1
            targets[row, offset + start : offset + len(ids)] = torch.tensor(ids[start:], dtype=torch.long)
        types = (input_ids == self.tokens.video_pad).long() * 2
        return ModelInputs(
            input_ids=input_ids,
            attention_mask=attention,
            mm_token_type_ids=types,
            targets=targets,
            modalities=[i.modality for i in items],
            clips=[i.clip for i in items],
            video=video,
            audio=audio,
            duration=list(duration),
        )
