"""The VAEmotionLLM model. Imports neither Ray nor DeepSpeed, so it runs wherever torch + transformers do."""

from transformers.utils import logging as _hf_logging

_hf_logging.disable_progress_bar()  # per-file loading/saving bars flood job logs

from vaemo.model.build import build_model, choose_attention, choose_dtype
from vaemo.model.freezing import set_trainable
from vaemo.model.prompts import IGNORE, ModelInputs, PromptBuilder, PromptItem
from vaemo.model.vaemo_llm import ModelSpec, VAEmotionLLM

__all__ = [
    "VAEmotionLLM",
    "ModelSpec",
    "ModelInputs",
    "PromptBuilder",
    "PromptItem",
    "IGNORE",
    "build_model",
    "choose_attention",
    "choose_dtype",
    "set_trainable",
]
