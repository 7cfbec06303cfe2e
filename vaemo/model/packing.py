"""Shared-prefix packing: the sequences of one clip share their prompt prefix, so the LLM runs it once.

Stage 1 asks every clip several questions, stage 0 too, and benchmark scoring asks one question once per
option: all sequences of a clip through one modality begin with the same tokens (system turn, the clip's
video or audio tokens, often the whole question). Under causal attention those positions have the same
hidden states in every such sequence. Packing lays a group's sequences out one after another in a single
row, the first whole and the others without the shared prefix, and a block mask lets each attend to the
prefix and to itself only. Positions are copied from the unpacked layout, so M-RoPE sees exactly what it
would have seen; hidden states equal the unpacked forward's (tests/test_packing.py).

It needs an attention that takes an arbitrary mask: PyTorch SDPA, vaemo's default off CUDA.
FlashAttention-2 takes none, so a model running it stays unpacked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Packing must save at least this share of the padded token grid to be worth a block mask.
MIN_SAVING = 0.1


@dataclass
class PrefixPacking:
    """Where every position goes. 'Flat' indexes a (rows * length) grid."""

    gather: torch.Tensor  # (G * Lp,) the flat unpacked position each packed position takes its input from
    scatter: torch.Tensor  # (B * L,) the flat packed position each unpacked position takes its output from
    mask: torch.Tensor  # (G, 1, Lp, Lp) bool: True where a packed query may attend a key
    unpacked_shape: tuple[int, int]  # (B, L)

    @property
    def packed_shape(self) -> tuple[int, int]:
        return self.mask.shape[0], self.mask.shape[-1]

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, ...) -> (G, Lp, ...)."""
        flat = x.reshape(-1, *x.shape[2:])
        return flat.index_select(0, self.gather.to(x.device)).reshape(*self.packed_shape, *x.shape[2:])

    def pack_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """(3, B, L) M-RoPE positions -> (3, G, Lp)."""
        return torch.stack([self.pack(p) for p in positions])

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(G, Lp, ...) -> (B, L, ...); padding positions get some packed position's value."""
        flat = x.reshape(-1, *x.shape[2:])
        return flat.index_select(0, self.scatter.to(x.device)).reshape(*self.unpacked_shape, *x.shape[2:])


def plan_packing(input_ids: torch.Tensor, attention_mask: torch.Tensor, groups: list) -> PrefixPacking | None:
    """A packing of right-padded sequences, or None when it would not pay.

    `groups[row]` names what a row's modality tokens are (e.g. its clip and modality): only rows of one
    group can share a prefix, because equal placeholder ids stand for equal features only within it.
    """
    rows, length = input_ids.shape
    lengths = attention_mask.sum(1).tolist()
    if any(n and not bool(attention_mask[r, 0]) for r, n in enumerate(lengths)):
        return None  # left padding (generation): prefixes would not line up
    members: dict = {}
    for row, key in enumerate(groups):
        members.setdefault(key, []).append(row)
    layouts = [_group_layout(input_ids, lengths, group) for group in members.values()]
    packed_length = max(sum(stop - start for _, start, stop in layout) for layout in layouts)
    if len(layouts) * packed_length > (1 - MIN_SAVING) * rows * length:
        return None

    gather = torch.zeros(len(layouts), packed_length, dtype=torch.long)
    scatter = torch.zeros(rows, length, dtype=torch.long)
    mask = torch.zeros(len(layouts), 1, packed_length, packed_length, dtype=torch.bool)
    for g, layout in enumerate(layouts):
        at = 0
        for row, start, stop in layout:
            size = stop - start
            gather[g, at : at + size] = row * length + torch.arange(start, stop)
            scatter[row, start:stop] = g * packed_length + torch.arange(at, at + size)
            # The row's shared prefix is the first row's; only the first row has it in its segment.
            scatter[row, :start] = g * packed_length + torch.arange(start)
            mask[g, 0, at : at + size, at : at + size] = torch.ones(size, size, dtype=torch.bool).tril()
            mask[g, 0, at : at + size, :start] = True
            at += size
        idle = torch.arange(at, packed_length)
        mask[g, 0, idle, idle] = True  # padding attends to itself: a query row with no key gives NaN
    return PrefixPacking(gather.reshape(-1), scatter.reshape(-1), mask, (rows, length))


def _group_layout(input_ids: torch.Tensor, lengths: list[int], group: list[int]) -> list[tuple[int, int, int]]:
    """(row, start, stop) per row: the row's segment is its positions [start, stop); the first row keeps
    all of its tokens, the others skip the prefix the whole group shares (which the first row holds at
    the start of the packed row)."""
    first = group[0]
    prefix = lengths[first]
    for row in group[1:]:
        n = min(prefix, lengths[row])
        differs = (input_ids[row, :n] != input_ids[first, :n]).nonzero()
        prefix = int(differs[0]) if len(differs) else n
    return [(row, 0 if row == first else prefix, lengths[row]) for row in group]
