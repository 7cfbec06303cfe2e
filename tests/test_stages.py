"""Each stage's recipe in-process on the tiny model: prepare -> loss -> gradients, with the first loss pinned.

The pinned values are this machine's (2-core x86 CPU, torch 2.13 CPU wheel); another CPU may round
differently at ~1e-6, which the tolerance (1e-5, relative or absolute, whichever is larger) absorbs. A change that moves
a stage's loss (prompts, normalisation, the losses themselves) must update GOLDEN on purpose.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ROOT

from vaemo.config import load_config
from vaemo.data.stream import Batch
from vaemo.train.recipes import build_stage_model, recipe_for
from vaemo.train.worker import synchronize

CLIPS = 2
# The first loss of each stage on `labelled_batch` (tiny preset, seed 0), measured on this machine.
GOLDEN = {0: 9.1644287109375, 1: 0.03291682153940201, 2: 7.64296293258667}


def labelled_batch(cfg) -> Batch:
    g = torch.Generator().manual_seed(0)
    d = cfg.data
    video = torch.randint(0, 256, (CLIPS, d.num_frames, 3, d.frame_height, d.frame_width), dtype=torch.uint8, generator=g)
    audio = torch.randn(CLIPS, int(d.audio_seconds * 16000), generator=g) * 0.1
    metas = [{"caption": "A calm blue circle drifts.", "object": "circle", "emotion": "calm", "valence": 0.4,
              "arousal": -0.5},
             {"caption": "An angry red star spins.", "object": "star", "emotion": "anger", "valence": -0.6,
              "arousal": 0.7}]
    return Batch(keys=["a", "b"], video=video, audio=audio, audio_len=[audio.shape[1]] * CLIPS,
                 duration=[2.5, 3.0], meta=metas, has_audio=[True] * CLIPS)


def first_loss(stage: int, overrides: tuple[str, ...] = ()) -> tuple[float, list[str]]:
    return first_step(stage, overrides)[:2]


def first_step(stage: int, overrides: tuple[str, ...] = ()) -> tuple[float, list[str], dict[str, torch.Tensor], int]:
    """The first loss, the parameters that got a gradient, those gradients, and how many times the LLM's
    first block ran (forward and any recomputation)."""
    cfg = load_config(ROOT / "configs/tiny.yaml", list(overrides), stage=stage)
    recipe = recipe_for(cfg)
    parts = build_stage_model(cfg, recipe)
    model, extra, trainable = parts.model, parts.extra, parts.trainable
    block_runs = []
    mlp = model.vlm.model.language_model.layers[0].mlp  # inside the block: a recomputation runs it again
    mlp_forward = mlp.forward  # (module hooks do not fire during the recomputation: count the calls)
    mlp.forward = lambda *args, **kwargs: block_runs.append(1) or mlp_forward(*args, **kwargs)
    step = recipe.prepare(model, labelled_batch(cfg), np.random.default_rng([cfg.seed, 104729, 0, 1]))
    step.step = cfg.stage0.vision_warmup_steps + 1 if stage == 0 else 1  # stage 0: past the vision warm-up
    synchronize(step, 1, recipe.chunk)
    result = recipe.loss(model, extra, step)
    result.loss.backward()
    params = dict(model.named_parameters())
    if extra is not None:
        params.update({f"extra.{n}": p for n, p in extra.named_parameters()})
    with_grad = sorted(n for n, p in params.items() if p.grad is not None and p.grad.abs().sum() > 0)
    assert set(with_grad) <= set(trainable) | {n for n in params if n.startswith("extra.")}
    grads = {n: params[n].grad.detach().clone() for n in with_grad}
    return float(result.loss.detach()), with_grad, grads, len(block_runs)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_each_stage_prepares_computes_its_loss_and_trains_only_its_parts(stage):
    loss, with_grad = first_loss(stage)
    assert np.isfinite(loss) and loss > 0
    expected_parts = {0: ("vlm.", "extra."), 1: ("projector.", "audio_encoder."), 2: ("enhancer.", "supervisor.")}[stage]
    assert with_grad and all(n.startswith(expected_parts) for n in with_grad), with_grad[:5]
    assert any(n.startswith(expected_parts[0]) for n in with_grad)
    assert loss == pytest.approx(GOLDEN[stage], rel=1e-5, abs=1e-5)


def test_the_same_inputs_give_the_same_loss_twice():
    assert first_loss(1)[0] == first_loss(1)[0]


@pytest.mark.parametrize("stage", [1, 2])
def test_activation_checkpointing_recomputes_blocks_and_changes_no_number(stage):
    """model.activation_checkpointing: the LLM's blocks run again in the backward pass (that is the memory
    saving), and the loss and every gradient stay the same."""
    loss, names, grads, runs = first_step(stage)
    loss_ckpt, names_ckpt, grads_ckpt, runs_ckpt = first_step(stage, ("model.activation_checkpointing=true",))
    assert runs_ckpt > runs > 0
    assert loss_ckpt == pytest.approx(loss, rel=1e-6) and names_ckpt == names
    for name in names:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-7)
