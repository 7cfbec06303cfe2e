"""Tokenizers: the real model's own (plus vaemo's audio markers), or an offline BPE for the tiny world."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from vaemo.errors import UserError

# Qwen2.5-VL's chat and vision tokens, and the audio markers vaemo adds.
CHAT_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
AUDIO_TOKENS = ["<|audio_start|>", "<|audio_end|>", "<|audio_pad|>"]


@dataclass
class SpecialTokens:
    """Ids of the tokens that structure a prompt."""

    pad: int
    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    image_pad: int
    video_pad: int
    audio_start: int
    audio_end: int
    audio_pad: int

    @classmethod
    def of(cls, tokenizer) -> "SpecialTokens":
        ids = {}
        for name, text in [
            ("im_start", "<|im_start|>"),
            ("im_end", "<|im_end|>"),
            ("vision_start", "<|vision_start|>"),
            ("vision_end", "<|vision_end|>"),
            ("image_pad", "<|image_pad|>"),
            ("video_pad", "<|video_pad|>"),
            ("audio_start", "<|audio_start|>"),
            ("audio_end", "<|audio_end|>"),
            ("audio_pad", "<|audio_pad|>"),
        ]:
            token_id = tokenizer.convert_tokens_to_ids(text)
            if token_id is None or token_id == tokenizer.unk_token_id:
                raise UserError(f"the tokenizer lacks the special token {text}")
            ids[name] = token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(pad=pad, **ids)

    def to_dict(self) -> dict:
        return asdict(self)


def build_tiny_tokenizer(corpus: list[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the synthetic world's text; deterministic for a given corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=CHAT_TOKENS + VISION_TOKENS + AUDIO_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def load_tokenizer(path: str | Path):
    """The tokenizer saved with a checkpoint; vaemo's audio markers are added when missing."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load a tokenizer from '{path}': {str(err).splitlines()[0]}") from None
    missing = [t for t in AUDIO_TOKENS if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    return tokenizer
