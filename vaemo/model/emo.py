"""EmoAdapter: the Emotion Enhancer (residuals on modality tokens) and the Emotion Supervisor (V/A heads)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class EmotionEnhancer(nn.Module):
    """One shared, position-wise residual MLP for every modality token: x + g * MLP(LayerNorm(x)).

    The per-channel gate g starts at `gate_init` (0 by default), so with g = 0 the model is exactly
    the stage-1 model and stage 2 starts where stage 1 ended.
    """

    def __init__(self, dim: int, width: int, gate_init: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, width)
        self.fc2 = nn.Linear(width, dim)
        self.gate = nn.Parameter(torch.full((dim,), float(gate_init)))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        residual = self.fc2(F.gelu(self.fc1(self.norm(tokens.to(self.fc1.weight.dtype)))))
        return tokens + (self.gate * residual).to(tokens.dtype)


class EmotionSupervisor(nn.Module):
    """Valence/arousal in [-1, 1] (and optionally emotion-category logits) from pooled modality tokens."""

    def __init__(self, dim: int, hidden: int, classes: list[str] | None = None):
        super().__init__()
        self.classes = list(classes or [])
        self.va = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 2))
        self.category = (
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, len(self.classes)))
            if self.classes
            else None
        )

    def forward(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, dim) -> valence/arousal (B, 2) in [-1, 1], category logits (B, C) or None."""
        pooled = pooled.to(self.va[1].weight.dtype)
        va = torch.tanh(self.va(pooled))
        return va, (self.category(pooled) if self.category is not None else None)
