"""Qwen2.5-VL's vision attention with its windows batched under SDPA.

transformers runs SDPA (and eager attention, left as it is here) once per window: it splits the queries at `cu_seqlens` and
loops in Python, so a clip of 8 frames costs 4 calls per block and a batch of 8 clips 32, each with its
own backward. FlashAttention takes `cu_seqlens` in one varlen kernel and is left alone. Here every window
of one length goes into one batched SDPA call. The weights, their names and the arithmetic per window are
transformers' own (tests/test_model.py checks the outputs and gradients against its forward);
bench/vision_windows.py times the two.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionAttention, apply_rotary_pos_emb_vision


def attention_in_windows(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float
) -> torch.Tensor:
    """(S, H, D) queries, keys and values -> (S, H, D): each token attends within its window
    [cu_seqlens[i], cu_seqlens[i+1]), with one SDPA call per distinct window length."""
    starts, lengths = cu_seqlens[:-1].tolist(), (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    if len(set(lengths)) == 1:  # one frame size, no edge windows: the windows are a reshape away
        return _attend(q, k, v, len(lengths), lengths[0], scale)
    outputs, rows = [], []
    for length in sorted(set(lengths) - {0}):
        first = torch.tensor([start for start, n in zip(starts, lengths) if n == length], device=q.device)
        index = (first[:, None] + torch.arange(length, device=q.device)).flatten()
        outputs.append(_attend(q[index], k[index], v[index], len(first), length, scale))
        rows.append(index)
    return torch.cat(outputs)[torch.argsort(torch.cat(rows))]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, windows: int, length: int, scale: float) -> torch.Tensor:
    """Consecutive windows of `length` rows each, as one batch of `windows` attention problems."""
    qb, kb, vb = (t.reshape(windows, length, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qb, kb, vb, scale=scale)
    return out.transpose(1, 2).reshape(windows * length, *q.shape[1:])


class BatchedWindowAttention(Qwen2_5_VLVisionAttention):
    """Qwen2_5_VLVisionAttention whose SDPA path batches its windows (module docstring)."""

    def forward(self, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None, **kwargs):
        if self.config._attn_implementation != "sdpa" or (self.training and self.attention_dropout):
            return super().forward(hidden_states, cu_seqlens, position_embeddings, max_seqlen, **kwargs)
        seq_length = hidden_states.shape[0]
        q, k, v = self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, *position_embeddings)
        return self.proj(attention_in_windows(q, k, v, cu_seqlens, self.scaling).reshape(seq_length, -1))


def use_batched_window_attention(vlm: nn.Module) -> None:
    """Swap the class of every Qwen2.5-VL vision attention module: the parameters (and their ZeRO-3
    partitions), the state-dict keys and the exports stay as they were."""
    for module in vlm.modules():
        if type(module) is Qwen2_5_VLVisionAttention:
            module.__class__ = BatchedWindowAttention
