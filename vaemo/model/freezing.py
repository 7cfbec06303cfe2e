"""What trains in each stage, expressed once.

Stage 0 ("see", a VLM from scratch): the whole VLM (vision tower, merger, LLM) on captioned clips.
Stage 1 (VG-Align): only the audio projector (and its marker embeddings); the VLM and encoder are frozen
(the encoder trains too with stage1.train_audio_encoder, for a randomly initialised tiny one, or its last
layers with stage1.audio_encoder_top_layers).
Stage 2 (EmoAdapter): the Emotion Enhancer and Supervisor, and LoRA adapters when model.lora.rank > 0.
"""

from __future__ import annotations

import torch
import torch.nn as nn

TRAINABLE_PREFIXES: dict[int, tuple[str, ...]] = {
    0: ("vlm.",),
    1: ("projector.",),
    2: ("enhancer.", "supervisor."),
}
LORA_MARKERS = (".lora_a.", ".lora_b.")


def is_trainable(stage: int, name: str, also: tuple[str, ...] = ()) -> bool:
    if stage == 2 and any(marker in name for marker in LORA_MARKERS):
        return True
    if any(marker in name for marker in LORA_MARKERS):
        return False
    return name.startswith(TRAINABLE_PREFIXES[stage] + also)


def set_trainable(model: nn.Module, stage: int, extra: nn.Module | None = None, also: tuple[str, ...] = ()) -> list[str]:
    """Freeze everything the stage does not train; returns the trainable parameter names.

    `extra` holds a stage's own modules beside the model (stage 0's auxiliary heads): all trainable.
    `also` adds parameter-name prefixes the run's config opts into (e.g. "audio_encoder.").
    """
    names = []
    for name, param in model.named_parameters():
        param.requires_grad_(is_trainable(stage, name, also))
        if param.requires_grad:
            names.append(name)
    if extra is not None:
        for name, param in extra.named_parameters():
            param.requires_grad_(True)
            names.append(f"extra.{name}")
    return names


def replicate_frozen(model: nn.Module, above_numel: int) -> dict[str, torch.Tensor]:
    """Turn the frozen parameters of more than `above_numel` elements into buffers that are not saved with the
    module, and return them by their state-dict names (an export writes them back).

    ZeRO-3 partitions and all-gathers parameters only: these stay whole on every rank and cost no
    communication, while the trainable parameters and the small frozen ones stay ZeRO-3's (pass its
    persistence threshold: it keeps tensors up to that size whole anyway). The small frozen tensors also
    keep every transformers submodule's `dtype`/`device` properties working: those look at parameters.
    Tied weights become separate copies on the device (they are frozen, so they stay equal).
    """
    taken: dict[str, torch.Tensor] = {}
    for module_name, module in model.named_modules():
        for name, param in list(module._parameters.items()):
            if param is None or param.requires_grad or param.numel() <= above_numel:
                continue
            del module._parameters[name]
            module.register_buffer(name, param.detach(), persistent=False)
            taken[f"{module_name}.{name}" if module_name else name] = module._buffers[name]
    return taken
