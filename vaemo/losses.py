"""Losses: forward KL between teacher and student next-token distributions, language-model CE, and
valence/arousal supervision. Each is tested against a plain reference (tests/test_losses.py).

The token losses take hidden states and the lm_head *module*, never logits: logits are computed
`chunk_size` positions at a time inside activation checkpoints, so a [positions, vocab] fp32 tensor
exists for one chunk only, in the forward and again in the backward (vocab is ~152k for real models).
Calling lm_head as a module also lets ZeRO-3 gather its weight. The functions return sums and counts;
the trainer normalises by the global count of response tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

TAIL_FLOOR = -30.0  # log-probability floor for a tail bucket that holds (almost) nothing


@dataclass
class TopKTargets:
    """A teacher's distribution over its top-k tokens plus one tail bucket, per response position."""

    ids: torch.Tensor  # (N, k) long
    logprobs: torch.Tensor  # (N, k) float: log p_T(token) at the distillation temperature
    tail: torch.Tensor  # (N,) float: log of the probability mass outside the top k

    def __len__(self) -> int:
        return self.ids.shape[0]

    def slice(self, start: int, stop: int) -> "TopKTargets":
        return TopKTargets(self.ids[start:stop], self.logprobs[start:stop], self.tail[start:stop])

    @classmethod
    def joined(cls, records) -> "TopKTargets":
        """The targets of cached teacher records (vaemo/data/teacher_records.py), one after another."""
        parts = {
            name: torch.from_numpy(np.concatenate([getattr(r, name) for r in records])) for name in ("ids", "logprobs", "tail")
        }
        return cls(parts["ids"].long(), parts["logprobs"], parts["tail"])


@dataclass
class KDResult:
    kl_sum: torch.Tensor  # sum over positions of tau^2 * KL(teacher || student)
    count: int  # positions summed
    agree: int  # positions where teacher and student agree on the top-1 token


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def chunk_count(n: int, size: int) -> int:
    return -(-n // size)


def _chunks(n: int, size: int, at_least: int = 0):
    """(start, stop) slices of `size`; at least `at_least` of them, the extra ones empty.

    Under ZeRO-3 every rank must call lm_head the same number of times (each call gathers its
    weight), so the trainer passes the chunk count of the rank with the most positions.
    """
    for i in range(max(chunk_count(n, size), at_least)):
        yield min(n, i * size), min(n, (i + 1) * size)


def _full_kl(lm_head: Callable, tau: float, student: torch.Tensor, teacher: torch.Tensor):
    # KL(T || S) = CE(S, p_T) - H(p_T): the fused soft-target cross-entropy keeps fewer vocab-sized
    # tensors alive than spelling the KL out, and H(p_T) needs no gradient.
    student_logits = lm_head(student).float()
    if tau != 1.0:
        student_logits = student_logits / tau
    with torch.no_grad():
        teacher_logp = F.log_softmax(lm_head(teacher).float().div_(tau), -1)
        teacher_p = teacher_logp.exp()
        neg_entropy = (teacher_p * teacher_logp).sum()
        agree = (student_logits.argmax(-1) == teacher_logp.argmax(-1)).sum()
        del teacher_logp
    kl = F.cross_entropy(student_logits, teacher_p, reduction="sum") + neg_entropy
    return kl * tau * tau, agree


def _topk_kl(
    lm_head: Callable,
    tau: float,
    student: torch.Tensor,
    ids: torch.Tensor,
    teacher_logp: torch.Tensor,
    teacher_tail: torch.Tensor,
):
    student_logp = F.log_softmax(lm_head(student).float() / tau, -1)
    top = student_logp.gather(-1, ids)
    tail = log1mexp(torch.logsumexp(top, -1)).clamp(min=TAIL_FLOOR)
    t = torch.cat([teacher_logp.float(), teacher_tail.float().clamp(min=TAIL_FLOOR)[:, None]], -1)
    s = torch.cat([top, tail[:, None]], -1)
    with torch.no_grad():
        agree = (student_logp.argmax(-1) == ids[:, 0]).sum()
    return (t.exp() * (t - s)).sum() * tau * tau, agree


def distill(
    student_hidden: torch.Tensor,
    lm_head: Callable,
    teacher: torch.Tensor | TopKTargets,
    temperature: float = 1.0,
    chunk_size: int = 256,
    min_chunks: int = 0,
) -> KDResult:
    """tau^2 * KL(softmax(z_T / tau) || softmax(z_S / tau)), summed over response positions.

    `teacher` is either the teacher's hidden states at the same positions (full-vocabulary KL) or
    TopKTargets (KL over the top-k tokens plus a tail bucket; from `teacher_topk` or an offline cache).
    """
    n = student_hidden.shape[0]
    total = student_hidden.new_zeros((), dtype=torch.float32)
    agree = 0
    for start, stop in _chunks(n, chunk_size, min_chunks):
        if isinstance(teacher, TopKTargets):
            part = teacher.slice(start, stop)
            kl, hits = checkpoint(
                _topk_kl,
                lm_head,
                temperature,
                student_hidden[start:stop],
                part.ids.to(student_hidden.device),
                part.logprobs.to(student_hidden.device),
                part.tail.to(student_hidden.device),
                use_reentrant=False,
            )
        else:
            kl, hits = checkpoint(
                _full_kl, lm_head, temperature, student_hidden[start:stop], teacher[start:stop].detach(), use_reentrant=False
            )
        total = total + kl
        agree += int(hits)
    return KDResult(total, n, agree)


@torch.no_grad()
def teacher_topk(
    teacher_hidden: torch.Tensor, lm_head: Callable, k: int, temperature: float = 1.0, chunk_size: int = 256, min_chunks: int = 0
) -> TopKTargets:
    """The teacher's top-k log-probabilities (at the distillation temperature) and tail mass, chunked."""
    ids, logps, tails = [], [], []
    for start, stop in _chunks(teacher_hidden.shape[0], chunk_size, min_chunks):
        logp = F.log_softmax(lm_head(teacher_hidden[start:stop]).float() / temperature, -1)
        top, index = logp.topk(k, -1)
        ids.append(index)
        logps.append(top)
        tails.append(log1mexp(torch.logsumexp(top, -1)))
    if not ids:
        empty = teacher_hidden.new_zeros((0, k))
        return TopKTargets(empty.long(), empty.float(), empty.new_zeros(0).float())
    return TopKTargets(torch.cat(ids), torch.cat(logps), torch.cat(tails))


def _ce(lm_head: Callable, hidden: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None):
    losses = F.cross_entropy(lm_head(hidden).float(), targets, reduction="none")
    return (losses * weights).sum() if weights is not None else losses.sum()


@torch.no_grad()
def sequence_logprobs(
    hidden: torch.Tensor, lm_head: Callable, targets: torch.Tensor, lengths: list[int], chunk_size: int = 256, min_chunks: int = 0
) -> list[float]:
    """Mean log-probability of each sequence's response tokens (hidden/targets concatenated in order)."""
    parts = [
        F.log_softmax(lm_head(hidden[a:b]).float(), -1).gather(-1, targets[a:b, None].to(hidden.device))[:, 0]
        for a, b in _chunks(hidden.shape[0], chunk_size, min_chunks)
    ]
    token_logp = torch.cat(parts) if parts else hidden.new_zeros(0)
    return [float(s.mean()) if len(s) else float("-inf") for s in torch.split(token_logp, lengths)]


def language_loss(
    hidden: torch.Tensor,
    lm_head: Callable,
    targets: torch.Tensor,
    chunk_size: int = 256,
    min_chunks: int = 0,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed next-token cross-entropy at response positions (optionally weighted per position),
    chunked like `distill`."""
    total = hidden.new_zeros((), dtype=torch.float32)
    for start, stop in _chunks(hidden.shape[0], chunk_size, min_chunks):
        part = weights[start:stop].to(hidden.device) if weights is not None else None
        total = total + checkpoint(
            _ce, lm_head, hidden[start:stop], targets[start:stop].to(hidden.device), part, use_reentrant=False
        )
    return total


def per_sequence_weights(lengths: list[int]) -> torch.Tensor:
    """Per-position weights 1/len(sequence): a weighted sum is the sum of per-sequence mean losses."""
    return torch.cat([torch.full((n,), 1.0 / n) for n in lengths if n > 0]) if any(lengths) else torch.zeros(0)


def va_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "mse", world_size: int = 1) -> torch.Tensor:
    """Valence/arousal loss over rows whose targets are known (NaN marks a missing label).

    `mse`: mean squared error of this rank's rows; `ccc`: 1 - Lin's concordance, averaged over valence and
    arousal, of every rank's rows together (concordance_over_ranks); with fewer than two rows in all, this
    rank's mean squared error.
    """
    known = torch.isfinite(target).all(-1)
    if kind == "ccc":
        loss = concordance_over_ranks(pred, target, known, world_size)
        if loss is not None:
            return loss
    if not bool(known.any()):
        return pred.sum() * 0.0
    return F.mse_loss(pred[known].float(), target[known].float())


def concordance_over_ranks(pred: torch.Tensor, target: torch.Tensor, known: torch.Tensor, world_size: int) -> torch.Tensor | None:
    """1 - concordance of the labelled rows of every rank's batch, or None when they are fewer than two.

    A correlation is a statistic of the whole batch, and a rank's share of it may be a handful of clips. Each
    rank sums its rows' moments, the sums are added over ranks (a collective: every rank calls this every
    step), and every rank computes the same value from them, that of the whole batch. Gradients flow through
    this rank's own rows; the loss is scaled so that its value stays the batch's while its gradient is
    `world_size` times this rank's part, and DeepSpeed's mean over ranks gives the whole batch's gradient.
    """
    import torch.distributed as dist

    rows = known[:, None]
    p = torch.where(rows, pred.double(), 0.0)
    t = torch.where(rows, target.double(), 0.0)
    count = rows.double().sum(0).expand(p.shape[1])
    local = torch.stack([count, p.sum(0), t.sum(0), (p * p).sum(0), (t * t).sum(0), (p * t).sum(0)])
    moments = local
    spread = world_size > 1 and dist.is_available() and dist.is_initialized()
    if spread:
        everyone = local.detach().clone()
        dist.all_reduce(everyone)
        moments = local + (everyone - local.detach())
    n, sum_p, sum_t, sum_pp, sum_tt, sum_pt = moments
    if float(n[0]) < 2:
        return None
    mean_p, mean_t = sum_p / n, sum_t / n
    covariance = sum_pt / n - mean_p * mean_t
    variances = sum_pp / n - mean_p**2 + sum_tt / n - mean_t**2
    loss = (1.0 - (2 * covariance / (variances + (mean_p - mean_t) ** 2 + 1e-8)).mean()).float()
    return loss * world_size - loss.detach() * (world_size - 1) if spread else loss
