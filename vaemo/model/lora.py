"""Minimal LoRA for the LLM's linear layers (stage 2), mergeable into the base weights at export."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / rank) * B(A(x)); B starts at zero, so the wrapped layer starts unchanged."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_a = nn.Linear(base.in_features, rank, bias=False, dtype=base.weight.dtype)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False, dtype=base.weight.dtype)
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)
        self.active = True  # False: the base layer alone (VAEmotionLLM.as_stage1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return self.base(x)
        return self.base(x) + self.scale * self.lora_b(self.lora_a(x))


def add_lora(module: nn.Module, targets: list[str], rank: int, alpha: float) -> list[str]:
    """Wrap every nn.Linear whose attribute name is in `targets`; returns the wrapped modules' paths."""
    wrapped = []
    for path, parent in list(module.named_modules()):
        for name, child in list(parent.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(parent, name, LoRALinear(child, rank, alpha))
                wrapped.append(f"{path}.{name}" if path else name)
    return wrapped


def merge_lora_state(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A state dict with LoRA wrappers -> the plain layout (base + scale * B @ A), as if never wrapped."""
    merged = {}
    for key, value in state.items():
        if ".lora_a." in key or ".lora_b." in key:
            continue
        if ".base." in key:
            prefix = key.split(".base.")[0]
            plain = key.replace(".base.", ".")
            if key.endswith(".weight") and f"{prefix}.lora_a.weight" in state:
                a, b = state[f"{prefix}.lora_a.weight"], state[f"{prefix}.lora_b.weight"]
                value = value + scale * (b.float() @ a.float()).to(value.dtype)
            merged[plain] = value
        else:
            merged[key] = value
    return merged
