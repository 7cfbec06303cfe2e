"""Shared-prefix packing (vaemo/model/packing.py): the layout, and that a packed forward equals the unpacked one."""

from __future__ import annotations

import pytest
import torch
from conftest import ROOT

from vaemo.config import load_config
from vaemo.model import PromptItem, build_model
from vaemo.model.packing import plan_packing

MCQ = "Which emotion does this artwork convey? Options: joy, calm, anger, sadness."


@pytest.fixture(scope="module")
def model():
    # A system prompt and the Emotion Enhancer: every part a prefix can hold.
    cfg = load_config(ROOT / "configs/tiny.yaml", ["model.system_prompt=You are a helpful assistant."], stage=2)
    model = build_model(cfg.model, cfg.data, seed=0).eval()
    model.add_enhancer(cfg.model.enhancer.width, gate_init=0.5)
    return model


@pytest.fixture(scope="module")
def clips(model):
    g = torch.Generator().manual_seed(0)
    video = torch.randint(0, 256, (3, 8, 3, 112, 112), dtype=torch.uint8, generator=g)
    return video, torch.randn(3, model.audio_samples, generator=g) * 0.1, [2.5, 2.0, 3.0]


def mixed_items() -> list[PromptItem]:
    """Every modality; a description and two questions per clip (stage 1), one question once per option
    (scoring), and a clip seen once (nothing to share)."""
    items = []
    for clip, modality in ((0, "visual"), (0, "audio"), (1, "audio_visual"), (1, "audio")):
        items.append(PromptItem(modality, "Describe this artwork.", "A calm boat on a dark sea.", clip))
        items += [PromptItem(modality, MCQ, option, clip) for option in ("joy", "calm", "anger", "sadness")]
    items.append(PromptItem("visual", MCQ, "joy", 2))
    return items


def test_each_packed_query_sees_exactly_its_sequence_so_far():
    g = torch.Generator().manual_seed(1)
    shared = torch.randint(5, 50, (16,), generator=g)
    rows = [torch.cat([shared, torch.randint(50, 99, (n,), generator=g)]) for n in (3, 5, 2, 4)]
    rows.append(torch.randint(5, 99, (7,), generator=g))  # a group of its own
    length = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], attention[i, : len(r)] = r, 1
    packing = plan_packing(ids, attention, ["a", "a", "b", "a", "c"])
    assert packing is not None and packing.packed_shape[0] == 3
    groups, width = packing.packed_shape
    sources = packing.gather.reshape(groups, width)  # the unpacked position each packed one reads
    for r, row in enumerate(rows):
        for p in range(len(row)):
            group, query = divmod(int(packing.scatter[r * length + p]), width)
            keys = sources[group][packing.mask[group, 0, query]]
            assert ids.reshape(-1)[keys].tolist() == row[: p + 1].tolist(), (r, p)


def test_nothing_shared_or_left_padded_stays_unpacked():
    ids = torch.arange(1, 13).reshape(3, 4)
    attention = torch.ones_like(ids)
    assert plan_packing(ids, attention, [0, 0, 0]) is None  # no common prefix
    same = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]] * 3)
    left = torch.ones_like(same)
    left[1, :2] = 0
    assert plan_packing(same, left, [0, 0, 0]) is None  # generation's left padding
    assert plan_packing(same, torch.ones_like(same), [0, 1, 2]) is None  # shared tokens, different clips


def test_packed_forward_equals_unpacked(model, clips):
    video, audio, duration = clips
    inputs = model.prompts.batch(mixed_items(), video, audio, duration)
    packing = model.packing_for(inputs)  # what the forward will run
    assert packing is not None
    assert packing.packed_shape[0] * packing.packed_shape[1] < 0.5 * inputs.input_ids.numel()

    valid = inputs.attention_mask.bool()
    results = {}
    for packed in (False, True):
        model.pack_prefixes = packed
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            hidden = model(inputs).hidden
            hidden[inputs.pred_mask].square().sum().backward()
        grads = {
            name: p.grad.clone()
            for name, p in model.named_parameters()
            if p.grad is not None and name.startswith(("projector.", "enhancer.", "vlm.model.visual.merger"))
        }
        results[packed] = hidden.detach()[valid], grads
    model.pack_prefixes = True
    (plain, plain_grads), (packed, packed_grads) = results[False], results[True]
    assert torch.allclose(packed, plain, atol=1e-5, rtol=1e-5), (packed - plain).abs().max()
    assert plain_grads.keys() == packed_grads.keys() and len(plain_grads) > 3
    for name, grad in plain_grads.items():
        assert torch.allclose(packed_grads[name], grad, atol=1e-4, rtol=1e-4), name


def test_option_scores_are_the_same_packed(model, clips):
    video, audio, duration = clips
    items = [("audio_visual", MCQ, ["joy", "calm", "anger", "sadness"], 0), ("visual", MCQ, ["joy", "calm"], 1)]
    scores = {}
    for packed in (False, True):
        model.pack_prefixes = packed
        scores[packed], _ = model.score_options(items, video, audio, duration)
    model.pack_prefixes = True
    assert torch.allclose(torch.tensor(scores[True][0]), torch.tensor(scores[False][0]), atol=1e-5)
    assert torch.allclose(torch.tensor(scores[True][1]), torch.tensor(scores[False][1]), atol=1e-5)
