"""VAEmotionLLM over the real transformers classes, built tiny from config (the same code path as 7B)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import ROOT

from vaemo.config import ConfigError, load_config
from vaemo.errors import UserError
from vaemo.losses import language_loss
from vaemo.model import PromptItem, VAEmotionLLM, build_model, choose_attention, set_trainable
from vaemo.model.audio import LogMel, encode_short
from vaemo.model.freezing import TRAINABLE_PREFIXES
from vaemo.model.vision import VisualSpec, patchify, video_inputs

CLIPS = 3
QUESTION = "Which emotion does this artwork convey? Options: joy, calm, anger, sadness."


def tiny_config(*overrides):
    return load_config(ROOT / "configs/tiny.yaml", list(overrides), stage=0)


@pytest.fixture(scope="module")
def model() -> VAEmotionLLM:
    cfg = tiny_config()
    return build_model(cfg.model, cfg.data, seed=0).eval()


@pytest.fixture(scope="module")
def clips(model):
    g = torch.Generator().manual_seed(0)
    video = torch.randint(0, 256, (CLIPS, 8, 3, 112, 112), dtype=torch.uint8, generator=g)
    audio = torch.randn(CLIPS, model.audio_samples, generator=g) * 0.1  # the preset's window
    return video, audio, [2.5, 2.0, 3.0]


def all_modalities(response="joy"):
    return [PromptItem(m, QUESTION, response, i) for i, m in enumerate(["visual", "audio", "audio_visual"])]


def test_patchify_matches_the_qwen_image_processor():
    from transformers import Qwen2VLImageProcessorPil

    processor = Qwen2VLImageProcessorPil(
        patch_size=14, temporal_patch_size=2, merge_size=2, min_pixels=56 * 56, max_pixels=112 * 112 * 4
    )
    image = (np.random.default_rng(0).random((112, 112, 3)) * 255).astype(np.uint8)
    expected = processor(images=[image], return_tensors="pt")
    spec = VisualSpec(num_frames=2, height=112, width=112, patch_size=14, temporal_patch_size=2, merge_size=2)
    frames = torch.from_numpy(image).permute(2, 0, 1)[None, None].expand(1, 2, 3, 112, 112)  # a still: 2 equal frames
    pixels, grid = video_inputs(frames, spec, torch.float32)
    assert grid.tolist() == expected["image_grid_thw"].tolist()
    assert torch.allclose(pixels, expected["pixel_values"], atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("clips, frames, height, width", [(3, 4, 56, 84), (2, 8, 112, 112), (0, 2, 28, 28)])
def test_video_inputs_equal_normalising_each_clip_then_patchifying_bit_for_bit(dtype, clips, frames, height, width):
    """video_inputs patchifies the bytes of every clip at once and normalises patch columns: it must give
    exactly what normalising each clip's frames and then patchifying it gives (the definition)."""
    spec = VisualSpec(num_frames=frames, height=height, width=width, patch_size=14, temporal_patch_size=2, merge_size=2)
    video = torch.randint(
        0, 256, (clips, frames, 3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    mean = torch.tensor(spec.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.image_std).view(1, 3, 1, 1)
    per_clip = [patchify((clip.float() / 255.0 - mean) / std, spec) for clip in video]
    expected = torch.cat(per_clip) if per_clip else torch.zeros(0, 3 * 2 * 14 * 14)
    pixels, grid = video_inputs(video, spec, dtype)
    assert pixels.dtype == dtype and pixels.shape == expected.shape
    assert torch.equal(pixels, expected.to(dtype))
    assert grid.tolist() == [[frames // 2, height // 14, width // 14]] * clips


def test_log_mel_matches_whispers_feature_extractor():
    from transformers import WhisperFeatureExtractor

    audio = np.zeros(48000, np.float32)
    audio[:35000] = np.random.default_rng(0).standard_normal(35000) * 0.1  # a 2.2 s clip padded to 3 s
    expected = WhisperFeatureExtractor(feature_size=80)(audio, sampling_rate=16000, return_tensors="pt").input_features
    ours = LogMel(80)(torch.from_numpy(audio)[None])
    assert ours.shape == (1, 80, 300)
    assert torch.allclose(ours, expected[..., :300], atol=1e-4)


def test_short_encoder_path_equals_whispers_forward_on_a_full_window(model):
    encoder = model.audio_encoder
    frames = 2 * encoder.config.max_source_positions
    mel = torch.randn(2, encoder.config.num_mel_bins, frames)
    with torch.no_grad():
        assert torch.allclose(encode_short(encoder, mel), encoder(mel).last_hidden_state, atol=1e-5)
        assert encode_short(encoder, mel[..., :100]).shape == (2, 50, encoder.config.d_model)  # shorter: cheaper


def test_prompts_place_each_modalitys_tokens(model):
    t = model.tokens
    for item in all_modalities():
        ids, start = model.prompts.sequence(item)
        video = ids.count(t.video_pad)
        audio = ids.count(t.audio_pad)
        assert video == (model.spec.visual.tokens_per_clip if "visual" in item.modality else 0)
        assert audio == (model.audio_tokens_per_clip if "audio" in item.modality else 0)
        assert ids[start:] == model.tokenizer.encode("joy", add_special_tokens=False) + [t.im_end]
        if item.modality == "audio_visual":  # video tokens, then audio tokens
            assert ids.index(t.vision_end) < ids.index(t.audio_start)


def test_forward_gives_response_position_logits_for_every_modality(model, clips):
    video, audio, duration = clips
    inputs = model.prompts.batch(all_modalities(), video, audio, duration)
    with torch.no_grad():
        out = model(inputs)
    hidden = out.hidden[inputs.pred_mask]
    assert hidden.shape == (len(inputs.response_targets), model.hidden_size)
    assert model.logits(hidden).shape[-1] == model.vlm.config.text_config.vocab_size
    assert torch.all(out.pooled.abs().sum(-1) > 0)  # each row saw modality tokens


@pytest.mark.parametrize("modality", ["visual", "audio"])
def test_a_pathway_the_batch_does_not_use_still_runs_when_asked(model, clips, modality):
    """ZeRO-3 lock step: with run_all_pathways the unused pathway runs on a dummy and adds exactly 0."""
    video, audio, duration = clips
    inputs = model.prompts.batch([PromptItem(modality, QUESTION, "joy", 0)], video, audio, duration)
    calls = {"visual": 0, "audio": 0}
    hooks = [
        model.vlm.model.visual.register_forward_hook(lambda *a: calls.__setitem__("visual", calls["visual"] + 1)),
        model.audio_encoder.conv1.register_forward_hook(lambda *a: calls.__setitem__("audio", calls["audio"] + 1)),
    ]
    try:
        with torch.no_grad():
            plain = model(inputs)
            padded = model(inputs, run_all_pathways=True)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == {"visual": 2 if modality == "visual" else 1, "audio": 2 if modality == "audio" else 1}
    assert torch.equal(plain.hidden, padded.hidden)  # the dummy adds exactly zero


def test_audio_placeholders_must_match_the_features(model, clips):
    video, audio, duration = clips
    broken = copy.copy(model.prompts)
    broken.audio_tokens = model.audio_tokens_per_clip + 1
    original, model.prompts = model.prompts, broken
    try:
        with pytest.raises(AssertionError, match="placeholders"):
            model(model.prompts.batch([PromptItem("audio", "q", "a", 0)], video, audio, duration))
    finally:
        model.prompts = original


def test_option_scores_are_length_normalised_log_likelihoods_from_one_pass(model, clips):
    video, audio, duration = clips
    options = ["joy", "calm", "sadness", "anger"]
    calls = []
    handle = model.vlm.model.language_model.register_forward_hook(lambda *a: calls.append(1))
    try:
        scores, pooled = model.score_options(
            [("audio_visual", QUESTION, options, 2), ("visual", QUESTION, options, 0)], video, audio, duration
        )
    finally:
        handle.remove()
    assert len(calls) == 1 and pooled.shape == (2, model.hidden_size)
    for option, score in zip(options, scores[0]):
        inputs = model.prompts.batch([PromptItem("audio_visual", QUESTION, option, 2)], video, audio, duration)
        with torch.no_grad():
            hidden = model(inputs).hidden[inputs.pred_mask]
            logp = torch.log_softmax(model.logits(hidden), -1).gather(-1, inputs.response_targets[:, None])
        assert abs(score - float(logp.mean())) < 1e-5


def test_generation_is_greedy_and_deterministic(model, clips):
    video, audio, duration = clips
    items = [PromptItem("visual", "Describe this artwork.", None, 0), PromptItem("audio", "Describe.", None, 1)]
    first = model.generate(items, video, audio, duration, max_new_tokens=6)
    assert first == model.generate(items, video, audio, duration, max_new_tokens=6)
    assert all(isinstance(text, str) for text in first)
    # The first generated token is the argmax of the scoring forward's next-token logits.
    inputs = model.prompts.batch([PromptItem("visual", "Describe this artwork.", "x", 0)], video, audio, duration)
    with torch.no_grad():
        out = model(inputs)
    first_position = inputs.pred_mask[0].nonzero()[0, 0]
    expected = int(model.logits(out.hidden[0, first_position]).argmax())
    if expected != model.tokens.im_end:
        assert model.tokenizer.encode(first[0], add_special_tokens=False)[0] == expected


def test_emo_adapter_with_gate_zero_changes_nothing(clips):
    cfg = tiny_config()
    base = build_model(cfg.model, cfg.data, seed=0).eval()
    video, audio, duration = clips
    inputs = base.prompts.batch(all_modalities(), video, audio, duration)
    with torch.no_grad():
        before = base(inputs).hidden
        base.add_enhancer(width=32, gate_init=0.0)
        base.add_supervisor(hidden=16, classes=["joy", "calm", "anger", "sadness"])
        after = base(inputs)
        assert torch.equal(before, after.hidden)
        base.enhancer.gate.fill_(0.5)
        assert not torch.allclose(before, base(inputs).hidden)
        va, logits = base.supervisor(after.pooled)
    assert va.shape == (3, 2) and bool((va.abs() <= 1).all()) and logits.shape == (3, 4)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_only_the_stages_parameters_get_gradients(stage, clips):
    cfg = tiny_config("model.lora.rank=4")
    model = build_model(cfg.model, cfg.data, seed=0)
    if stage == 2:
        model.add_enhancer(width=32, gate_init=0.1)
        model.add_supervisor(hidden=16, classes=["a", "b", "c", "d"])
        model.add_lora(4, 8.0, ["q_proj", "v_proj"])
    trainable = set(set_trainable(model, stage))
    video, audio, duration = clips
    inputs = model.prompts.batch(all_modalities(), video, audio, duration)
    out = model(inputs, run_all_pathways=True)
    loss = language_loss(out.hidden[inputs.pred_mask], model.vlm.lm_head, inputs.response_targets)
    if model.supervisor is not None:
        va, logits = model.supervisor(out.pooled)
        loss = loss + va.sum() + logits.sum()
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad, "nothing received a gradient"
    assert with_grad <= trainable
    untouched = {n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None}
    assert not untouched
    prefixes = TRAINABLE_PREFIXES[stage]
    assert all(n.startswith(prefixes) or ".lora_" in n for n in trainable)
    if stage == 1:
        assert any(n.startswith("projector.fc1") for n in with_grad)
    if stage == 2:
        assert any(".lora_" in n for n in with_grad) and any(n.startswith("supervisor.") for n in with_grad)


def test_stage2_without_the_emoadapter_trains_lora_alone_or_else_the_projector():
    """The no-adapter ablation changes only the adapter: the preset's LoRA still trains; without LoRA the
    projector does, so that the ablation trains something on the same data and losses."""
    from vaemo.train.objectives import EmoAdapterObjective

    no_adapter = ["stage2.use_enhancer=false", "stage2.use_supervisor=false"]
    for lora_rank, expected in ((0, "projector."), (8, ".lora_")):
        cfg = load_config(ROOT / "configs/tiny.yaml", [*no_adapter, f"model.lora.rank={lora_rank}"], stage=2)
        objective = EmoAdapterObjective(cfg)
        model = build_model(cfg.model, cfg.data, seed=0)
        objective.prepare_model(model)
        trainable = set_trainable(model, 2, None, objective.also_trainable(model))
        assert trainable and all(expected in n for n in trainable), (lora_rank, sorted(trainable)[:3])
    with_adapter = EmoAdapterObjective(load_config(ROOT / "configs/tiny.yaml", stage=2))
    assert with_adapter.also_trainable(model) == ()


def test_stage1_can_train_the_audio_encoders_top_layers_beside_the_projector(hf_checkpoints):
    """A pretrained Whisper's last layers and final norm train, the layers below stay frozen (and ZeRO-3 may
    fetch them whole); asking for more layers than the encoder has is one line."""
    from vaemo.model.build import check_encoder_layers
    from vaemo.train.objectives import build_stage_model, objective_for

    cfg = real_format_config(hf_checkpoints, "stage1.audio_encoder_top_layers=1")
    parts = build_stage_model(cfg, objective_for(cfg))
    layers = len(parts.model.audio_encoder.layers)
    encoder = {n.split(".")[2] if ".layers." in n else n.split(".")[1] for n in parts.trainable if n.startswith("audio_encoder.")}
    assert layers >= 2 and encoder == {str(layers - 1), "layer_norm"}, sorted(encoder)
    assert any(n.startswith("projector.") for n in parts.trainable)
    too_many = real_format_config(hf_checkpoints, f"stage1.audio_encoder_top_layers={layers + 1}")
    for check in (
        lambda: check_encoder_layers(too_many.model, layers + 1),
        lambda: build_stage_model(too_many, objective_for(too_many)),
    ):
        with pytest.raises(UserError, match=f"audio_encoder_top_layers={layers + 1}, but the audio encoder has {layers} layers"):
            check()  # the preflight's check from config.json, and the build's from the model
    with pytest.raises(ConfigError, match="audio_encoder_top_layers.*must be 0 with train_audio_encoder=true"):
        real_format_config(hf_checkpoints, "stage1.audio_encoder_top_layers=1", "stage1.train_audio_encoder=true")


def test_zero3_fetches_whole_only_the_blocks_that_hold_no_trainable_weights():
    """Stage 2 runs each decoder layer twice with gradients (LM and KD passes) and DeepSpeed reduces a leaf
    block's gradients once per backward pass of the block: LoRA-wrapped layers must keep per-module hooks
    (marking them crashed a 2-worker run in DeepSpeed's gradient bucket)."""
    from deepspeed.utils import z3_leaf_module

    from vaemo.train.ds_config import mark_leaf_modules
    from vaemo.train.objectives import build_stage_model, objective_for
    from vaemo.train.trainer import StageModule

    leaves = {}
    for name, overrides in (("stage 2", ["model.lora.rank=0"]), ("stage 2 + LoRA", ["model.lora.rank=2"])):
        cfg = load_config(ROOT / "configs/tiny.yaml", overrides, stage=2)
        objective = objective_for(cfg)
        parts = build_stage_model(cfg, objective)
        module = StageModule(parts.model, parts.extra, objective)
        leaves[name] = mark_leaf_modules(module, ["auto"])
        for block in module.modules():
            if z3_leaf_module(block):
                assert not any(p.requires_grad for p in block.parameters()), type(block).__name__
    blocks = ["Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock", "WhisperEncoderLayer"]
    assert leaves["stage 2"] == (blocks, [])
    assert leaves["stage 2 + LoRA"] == (["Qwen2_5_VLVisionBlock", "WhisperEncoderLayer"], ["Qwen2_5_VLDecoderLayer"])


def test_stage2s_kd_teacher_is_the_model_as_stage1_left_it(clips):
    """Inside as_stage1 neither the Enhancer nor LoRA acts: the teacher's targets do not move while stage 2
    trains them (and outside it they act again)."""
    cfg = tiny_config()
    model = build_model(cfg.model, cfg.data, seed=0).eval()
    video, audio, duration = clips
    inputs = model.prompts.batch(all_modalities(), video, audio, duration)
    with torch.no_grad():
        stage1 = model(inputs).hidden
        model.add_enhancer(width=32, gate_init=0.5)
        model.add_lora(4, 8.0, ["q_proj", "v_proj"])
        for name, p in model.named_parameters():
            if ".lora_b." in name:
                p.normal_(0, 0.5)  # as if trained
        adapted = model(inputs).hidden
        with model.as_stage1():
            teacher = model(inputs).hidden
        assert not torch.allclose(adapted, stage1, atol=1e-4)
        assert torch.allclose(teacher, stage1, atol=1e-5)
        assert torch.equal(model(inputs).hidden, adapted)


@pytest.mark.parametrize("checkpoint", ["tiny fp32", "hub layout bf16"])
def test_stage2s_kd_teacher_reads_the_vision_tokens_its_lm_pass_encoded(checkpoint, clips, request):
    """Inside sharing_video_tokens a pass over clips the last pass encoded runs no vision tower and gives what
    a fresh pass gives; a tower that trains (stage 0) is never shared."""
    if checkpoint == "tiny fp32":
        cfg, tolerance = tiny_config(), dict(rtol=1e-5, atol=1e-6)
    else:
        cfg = real_format_config(request.getfixturevalue("hf_checkpoints"), "model.dtype=bfloat16")
        tolerance = dict(rtol=2e-2, atol=2e-2)
    model = build_model(cfg.model, cfg.data, seed=0).eval()
    model.add_enhancer(width=32, gate_init=0.5)
    d = cfg.data
    video = clips[0][:, : d.num_frames, :, : d.frame_height, : d.frame_width].contiguous()
    audio = torch.randn(CLIPS, model.audio_samples, generator=torch.Generator().manual_seed(1)) * 0.1
    lm = model.prompts.batch(all_modalities(), video, audio, clips[2])  # frames of clips 0 and 2
    teacher = model.prompts.batch([PromptItem("visual", QUESTION, "joy", 2)], video, audio, clips[2])
    towers = []
    model.vlm.model.visual.register_forward_hook(lambda *_: towers.append(1))
    for stage, shared in ((2, True), (0, False)):
        set_trainable(model, stage)
        with torch.no_grad(), model.as_stage1():
            fresh = model(teacher).hidden
        towers.clear()
        with model.sharing_video_tokens():
            model(lm)
            with torch.no_grad(), model.as_stage1():
                reused = model(teacher).hidden
        assert len(towers) == (1 if shared else 2)
        torch.testing.assert_close(reused, fresh, **tolerance)
    towers.clear()
    model(teacher)  # outside the context nothing is kept
    assert len(towers) == 1 and model._shared_video is None


def test_stage2_validation_scores_emotion_and_content_under_every_modality(model, clips):
    from vaemo.data.stream import Batch
    from vaemo.train.objectives import EmoAdapterObjective

    video, audio, duration = clips
    metas = [
        {"emotion": "calm", "object": "star"},
        {"emotion": "joy", "object": "circle"},
        {"emotion": "anger"},
    ]  # the third clip has no object: only its emotion is scored
    batch = Batch(
        keys=["0", "1", "2"],
        video=video,
        audio=audio,
        audio_len=[audio.shape[1]] * CLIPS,
        duration=duration,
        meta=metas,
        has_audio=[True, True, False],
    )
    objective = EmoAdapterObjective(load_config(ROOT / "configs/tiny.yaml", stage=2))
    step = objective.prepare(model, batch, np.random.default_rng(0), score=True)
    assert [(t, m) for t, m, _, _ in step.scored] == [
        (t, m) for m in ("visual", "audio", "audio_visual") for t in ("emotion", "content")
    ] * 2 + [("emotion", "visual")]
    assert len(step.passes["lm"].modalities) == 4 * len(step.scored)
    sums = objective.score(model, step)
    assert sums["val_emotion_total"] == 7 and sums["val_content_total"] == 6 and sums["val_content_audio_total"] == 2
    metrics = objective.metrics(sums)
    assert metrics["val_objective"] == pytest.approx((metrics["val_emotion_acc"] + metrics["val_content_acc"]) / 2)


def test_stage2_kd_questions_distils_the_stage1_questions_too(model, clips):
    from vaemo.data import vocab
    from vaemo.data.stream import Batch
    from vaemo.train.objectives import EmoAdapterObjective

    video, audio, duration = clips
    metas = [{"caption": "A calm boat.", "emotion": "calm", "valence": 0.2, "arousal": -0.3, "object": "boat"}] * CLIPS
    batch = Batch(
        keys=[str(i) for i in range(CLIPS)],
        video=video,
        audio=audio,
        audio_len=[audio.shape[1]] * CLIPS,
        duration=duration,
        meta=metas,
        has_audio=[True] * CLIPS,
    )
    passes = {}
    for flag in (False, True):
        cfg = load_config(ROOT / "configs/tiny.yaml", [f"stage2.kd_questions={flag}"], stage=2)
        step = EmoAdapterObjective(cfg).prepare(model, batch, np.random.default_rng(0))
        passes[flag] = step.passes["student"]
    assert len(passes[False].modalities) == CLIPS  # a caption per clip
    assert len(passes[True].modalities) == CLIPS * (1 + len(vocab.TASKS))  # and one question per task
    assert passes[True].modalities == ["audio"] * len(passes[True].modalities)


def test_save_and_load_round_trip_gives_identical_logits(tmp_path, clips):
    cfg = tiny_config()
    model = build_model(cfg.model, cfg.data, seed=3).eval()
    model.add_enhancer(width=32, gate_init=0.2)
    model.add_supervisor(hidden=16, classes=["joy", "calm", "anger", "sadness"])
    model.add_lora(4, 8.0, ["q_proj", "v_proj"])
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_b." in name:
                param.normal_(0, 0.05)
    video, audio, duration = clips
    inputs = model.prompts.batch(all_modalities(), video, audio, duration)
    with torch.no_grad():
        before = model.logits(model(inputs).hidden)
    model.save_pretrained(tmp_path / "export")
    for part in (
        "vaemo_config.json",
        "audio_projector.safetensors",
        "emo_adapter.safetensors",
        "lora.safetensors",
        "vlm/model.safetensors",
        "audio_encoder/model.safetensors",
        "tokenizer/tokenizer.json",
    ):
        assert (tmp_path / "export" / part).is_file(), part
    loaded = VAEmotionLLM.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        after = loaded.logits(loaded(inputs).hidden)
    assert torch.allclose(before, after, atol=1e-5)  # LoRA merged into the weights: equal up to rounding

    plain = build_model(cfg.model, cfg.data, seed=4).eval()
    plain.save_pretrained(tmp_path / "plain")
    reloaded = VAEmotionLLM.from_pretrained(tmp_path / "plain").eval()
    with torch.no_grad():
        assert torch.equal(plain.logits(plain(inputs).hidden), reloaded.logits(reloaded(inputs).hidden))


def test_the_export_records_how_short_soundtracks_were_filled_and_evaluation_decodes_alike(tmp_path):
    from vaemo.eval.scoring import decode_spec

    cfg = tiny_config("data.audio_fill=silence")
    build_model(cfg.model, cfg.data, seed=0).save_pretrained(tmp_path / "silence")
    assert decode_spec(VAEmotionLLM.from_pretrained(tmp_path / "silence")).audio_fill == "silence"
    # A later stage from that export trains with its own config's fill, and its export says so.
    repeat = tiny_config(f"model.init_from={tmp_path / 'silence'}")
    assert repeat.data.audio_fill == "repeat"  # the default
    assert build_model(repeat.model, repeat.data, seed=0).spec.audio_fill == "repeat"
    # Exports written before the field existed were trained on silent tails.
    written = json.loads((tmp_path / "silence" / "vaemo_config.json").read_text())
    del written["audio_fill"]
    (tmp_path / "silence" / "vaemo_config.json").write_text(json.dumps(written))
    assert VAEmotionLLM.from_pretrained(tmp_path / "silence").spec.audio_fill == "silence"


def test_loading_fails_loudly_on_a_missing_or_mis_sized_weight(tmp_path):
    from safetensors.torch import load_file, save_file

    cfg = tiny_config()
    model = build_model(cfg.model, cfg.data, seed=0)
    model.save_pretrained(tmp_path / "a")
    vlm_file = tmp_path / "a" / "vlm" / "model.safetensors"
    state = load_file(str(vlm_file))
    state.pop(next(k for k in state if "layers.1.mlp" in k))
    save_file(state, str(vlm_file))
    with pytest.raises(UserError, match="missing keys"):
        VAEmotionLLM.from_pretrained(tmp_path / "a")

    model.save_pretrained(tmp_path / "b")
    projector_file = tmp_path / "b" / "audio_projector.safetensors"
    state = load_file(str(projector_file))
    state["fc2.bias"] = torch.zeros(3)
    save_file(state, str(projector_file))
    with pytest.raises(UserError, match="mis-sized"):
        VAEmotionLLM.from_pretrained(tmp_path / "b")

    with pytest.raises(RuntimeError, match="incomplete"):
        state = model.state_dict()
        state.pop("projector.fc1.weight")
        model.save_pretrained(tmp_path / "c", state_dict=state)


def test_building_from_local_checkpoint_folders(tmp_path):
    """The cluster path: model.vlm / model.audio_encoder name checkpoint folders (here, tiny ones)."""
    from transformers import WhisperForConditionalGeneration

    cfg = tiny_config()
    tiny = build_model(cfg.model, cfg.data, seed=0)
    tiny.vlm.save_pretrained(tmp_path / "qwen")
    tiny.tokenizer.save_pretrained(tmp_path / "qwen")
    (tmp_path / "qwen" / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.25] * 3}))
    whisper = WhisperForConditionalGeneration(tiny.audio_encoder.config)
    whisper.save_pretrained(tmp_path / "whisper")
    built = build_model(
        load_config(
            ROOT / "configs/tiny.yaml", [f"model.vlm={tmp_path / 'qwen'}", f"model.audio_encoder={tmp_path / 'whisper'}"]
        ).model,
        cfg.data,
    )
    assert built.spec.visual.image_mean == (0.5, 0.5, 0.5)
    for name, value in whisper.model.encoder.state_dict().items():
        assert torch.equal(built.audio_encoder.state_dict()[name], value), name
    assert torch.equal(built.vlm.lm_head.weight, tiny.vlm.lm_head.weight)
    with pytest.raises(UserError, match="model.vlm"):
        build_model(load_config(ROOT / "configs/tiny.yaml", [f"model.vlm={tmp_path / 'nope'}"]).model, cfg.data)


@pytest.mark.parametrize(
    "requested,dtype,flash,capability,chosen",
    [
        ("auto", torch.bfloat16, True, (9, 0), "flash_attention_2"),
        ("auto", torch.bfloat16, True, (8, 0), "flash_attention_2"),
        ("auto", torch.bfloat16, False, (9, 0), "sdpa"),
        ("auto", torch.bfloat16, True, (7, 0), "sdpa"),  # a V100: FlashAttention-2 needs Ampere or newer
        ("auto", torch.float32, True, (9, 0), "sdpa"),  # flash-attn takes bf16 and fp16 only
        ("auto", torch.float32, False, None, "sdpa"),
        ("eager", torch.float32, False, None, "eager"),
        ("sdpa", torch.bfloat16, True, (9, 0), "sdpa"),
        ("flash_attention_2", torch.bfloat16, True, (9, 0), "flash_attention_2"),
        ("flash_attention_2", torch.bfloat16, False, None, "needs a CUDA GPU"),
        ("flash_attention_2", torch.bfloat16, False, (9, 0), "needs the flash-attn package"),
        ("flash_attention_2", torch.bfloat16, True, (7, 5), r"compute capability 8\.0 or newer \(this one: 7\.5\)"),
        ("flash_attention_2", torch.float32, True, (9, 0), "needs bf16 weights"),
    ],
)
def test_attention_is_chosen_in_one_place_for_the_gpu_and_dtype(requested, dtype, flash, capability, chosen):
    from vaemo.model.build import attention_for

    if chosen in ("flash_attention_2", "sdpa", "eager"):
        assert attention_for(requested, dtype, flash, capability) == chosen
    else:
        with pytest.raises(UserError, match=chosen):
            attention_for(requested, dtype, flash, capability)
    if not torch.cuda.is_available() and requested == "auto":  # this machine's facts, as a worker gathers them
        assert choose_attention(requested, dtype) == "sdpa"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_flash_attention_2_and_sdpa_agree_on_gpu(clips):
    pytest.importorskip("flash_attn")
    video, audio, duration = clips
    outs = []
    for attn in ("sdpa", "flash_attention_2"):
        cfg = tiny_config(f"model.attn_implementation={attn}", "model.dtype=bfloat16")
        model = build_model(cfg.model, cfg.data, seed=0).cuda().eval()
        inputs = model.prompts.batch(all_modalities(), video, audio, duration)
        with torch.no_grad():
            outs.append(model.logits(model(inputs).hidden[inputs.pred_mask]).float())
    assert torch.allclose(outs[0], outs[1], atol=5e-2, rtol=5e-2)


# -- checkpoint folders in the hub's layout, and bf16 ------------------------------------------------


def real_format_config(hf_checkpoints, *overrides):
    """The 7B preset with only paths and sizes changed (tiny frames for a tiny vision tower)."""
    return load_config(
        ROOT / "configs/qwen2.5-vl-7b.yaml",
        [
            f"model.vlm={hf_checkpoints['vlm']}",
            f"model.audio_encoder={hf_checkpoints['audio']}",
            "data.num_frames=4",
            "data.frame_height=56",
            "data.frame_width=56",
            *overrides,
        ],
        stage=1,
    )


@pytest.fixture(scope="module")
def real_format(hf_checkpoints) -> VAEmotionLLM:
    cfg = real_format_config(hf_checkpoints, "model.dtype=bfloat16")
    return build_model(cfg.model, cfg.data, seed=0).eval()


def test_hub_layout_checkpoints_load_with_their_weights_and_vaemos_audio_tokens(hf_checkpoints, real_format):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    model = real_format
    base = AutoTokenizer.from_pretrained(hf_checkpoints["vlm"])
    assert "<|audio_pad|>" not in base.get_vocab()
    assert len(model.tokenizer) == len(base) + 3  # vaemo's audio markers, added
    assert model.vlm.get_input_embeddings().num_embeddings == len(model.tokenizer)  # and the embeddings resized
    assert model.vlm.lm_head.weight.shape[0] == len(model.tokenizer)
    hub = load_file(str(hf_checkpoints["vlm"] / "model.safetensors"))  # v4 names, mapped on load
    assert torch.equal(model.vlm.model.language_model.layers[1].mlp.up_proj.weight, hub["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(model.vlm.model.visual.blocks[0].attn.qkv.weight, hub["visual.blocks.0.attn.qkv.weight"])
    assert torch.equal(model.vlm.get_input_embeddings().weight[: len(base)], hub["model.embed_tokens.weight"])
    whisper = load_file(str(hf_checkpoints["audio"] / "model.safetensors"))
    for name, value in model.audio_encoder.state_dict().items():
        assert torch.equal(value, whisper[f"model.encoder.{name}"].to(torch.bfloat16)), name
    assert model.spec.audio_window == "full" and model.spec.n_mels == 128
    assert model.spec.visual.image_mean == (0.48145466, 0.4578275, 0.40821073)


def test_hub_layout_checkpoints_read_onto_a_device_give_the_same_model(hf_checkpoints, real_format):
    """A training rank reads checkpoint shards straight onto its device (device_map; here the CPU device, on a
    GPU the rank's own): the same weights as the default host load."""
    cfg = real_format_config(hf_checkpoints, "model.dtype=bfloat16")
    placed = build_model(cfg.model, cfg.data, seed=0, device=torch.device("cpu"))
    expected = real_format.state_dict()
    got = placed.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    assert all(t.dtype == torch.bfloat16 for t in placed.vlm.parameters())


def test_what_reading_weights_does_with_the_rng_changes_no_weight(hf_checkpoints, real_format, monkeypatch):
    """Read onto a GPU, checkpoint loading draws from that device's RNG, not the host's, which seeds the new
    parts (the projector): a GPU run then began from another model than the same seed on a CPU (seen on an
    H200). Here loading is made to draw from the host RNG instead: the model must not change."""
    import vaemo.model.build as build

    for name in ("load_vlm", "load_whisper_encoder"):
        original = getattr(build, name)
        monkeypatch.setattr(build, name, lambda *a, _load=original, **k: (torch.rand(1000), _load(*a, **k))[1])
    cfg = real_format_config(hf_checkpoints, "model.dtype=bfloat16")
    got, expected = build_model(cfg.model, cfg.data, seed=0).state_dict(), real_format.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    # vaemo's audio markers: new embedding and output rows, each exactly the mean of the checkpoint's rows
    n = real_format.vlm.get_input_embeddings().num_embeddings - 3
    for matrix in (real_format.vlm.get_input_embeddings().weight, real_format.vlm.lm_head.weight):
        assert torch.equal(matrix[n:], matrix[:n].float().mean(0).to(matrix.dtype).expand(3, -1))


def test_prompt_ids_equal_the_checkpoints_chat_template(real_format):
    """The Qwen2.5-VL template renders one <|video_pad|> (and passes the audio placeholder through as text);
    the processor then repeats each placeholder once per modality token. vaemo's prompt must equal that."""
    model = real_format
    t = model.tokens
    for system in ("", "You study art."):
        model.prompts.system_prompt = system
        model.prompts.templated.cache_clear()
        for modality in ("audio", "visual", "audio_visual"):
            audio_part = {"type": "text", "text": "<|audio_start|><|audio_pad|><|audio_end|>"}
            content = (
                ([{"type": "video"}] if modality != "audio" else [])
                + ([audio_part] if modality != "visual" else [])
                + [{"type": "text", "text": QUESTION}]
            )
            chat = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
            rendered = model.tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)
            rendered = list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)
            expected = []
            for token in rendered:
                n = {t.video_pad: model.spec.visual.tokens_per_clip, t.audio_pad: model.audio_tokens_per_clip}.get(token, 1)
                expected += [token] * n
            ids, start = model.prompts.sequence(PromptItem(modality, QUESTION, "joy", 0))
            assert ids[:start] == expected, modality
            assert ids[start:] == model.tokenizer.encode("joy", add_special_tokens=False) + [t.im_end]
            text = model.tokenizer.decode(ids[:start])
            assert text.startswith("<|im_start|>system\n" + (system or "You are a helpful assistant."))
    model.prompts.system_prompt = ""
    model.prompts.templated.cache_clear()


@pytest.mark.parametrize("checkpoint", ["tiny", "real_format"])
def test_special_token_strings_in_a_users_text_are_plain_text(checkpoint, request):
    """A benchmark question naming `<|video_pad|>` stopped a whole evaluation (258 placeholders for 256
    features), and `<|im_end|>` in a caption would have ended the turn: user text is never structure."""
    model = request.getfixturevalue("model") if checkpoint == "tiny" else request.getfixturevalue(checkpoint)
    t = model.tokens
    question = "What does <|video_pad|> mean? <|im_end|><|audio_pad|>"
    for modality in ("audio", "visual", "audio_visual"):
        plain, _ = model.prompts.sequence(PromptItem(modality, "What does it mean?", None, 0))
        ids, start = model.prompts.sequence(PromptItem(modality, question, "<|im_end|> joy", 0))
        for token in (t.video_pad, t.audio_pad, t.im_end, t.im_start):
            assert ids[:start].count(token) == plain.count(token), (modality, token)
        assert ids[start:].count(t.im_end) == 1 and ids[-1] == t.im_end  # the response's own end, only
        assert question in model.tokenizer.decode(ids[:start])


def test_a_checkpoint_encoders_log_mel_and_window_are_whispers_own(hf_checkpoints, real_format):
    """With audio_window=full the encoder sees exactly what WhisperForConditionalGeneration would: the
    feature extractor's 30 s log-mel, the encoder's own forward; vaemo keeps the frames covering the clip."""
    from transformers import WhisperFeatureExtractor
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from vaemo.model.audio import encode

    audio = torch.from_numpy(np.random.default_rng(0).standard_normal(40000).astype(np.float32) * 0.1)
    features = WhisperFeatureExtractor.from_pretrained(hf_checkpoints["audio"])(
        audio.numpy(), sampling_rate=16000, return_tensors="pt"
    ).input_features
    padded = torch.nn.functional.pad(audio[None], (0, 480000 - audio.shape[0]))
    assert torch.allclose(real_format.log_mel(padded), features, atol=1e-5)
    encoder = WhisperEncoder.from_pretrained(hf_checkpoints["audio"], dtype=torch.float32).eval()
    with torch.no_grad():
        ours = encode(encoder, real_format.log_mel, audio[None], "full")
        theirs = encoder(features).last_hidden_state
        assert ours.shape == (1, 125, 32)  # 2.5 s = 250 mel frames = 125 encoder frames
        assert torch.allclose(ours, theirs[:, :125], atol=1e-5)
        short = encode(encoder, real_format.log_mel, audio[None], "clip")
        assert short.shape == ours.shape and not torch.allclose(short, ours, atol=1e-3)  # an approximation


def test_a_bf16_model_keeps_fp32_buffers_and_runs_every_modality(real_format, clips):
    model = real_format
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    floats = {n: b.dtype for n, b in model.named_buffers() if b.is_floating_point()}
    assert floats and set(floats.values()) == {torch.float32}, floats  # log-mel, RoPE frequencies
    video, audio, duration = clips
    video = torch.nn.functional.interpolate(video.flatten(0, 1).float(), size=(56, 56)).to(torch.uint8)
    video = video.view(CLIPS, 8, 3, 56, 56)[:, :4]
    audio = torch.nn.functional.pad(audio, (0, model.audio_samples - audio.shape[1]))  # decoding pads to the window
    items = [(m, QUESTION, ["joy", "calm", "anger"], i) for i, m in enumerate(["visual", "audio", "audio_visual"])]
    scores, pooled = model.score_options(items, video, audio, duration)
    assert all(np.isfinite(s).all() and len(set(s)) == 3 for s in scores)
    hidden = model.forward(model.prompts.batch(all_modalities(), video, audio, duration)).hidden
    assert hidden.dtype == torch.bfloat16 and model.logits(hidden[:, -1]).dtype == torch.float32
    answers = model.generate(
        [PromptItem(m, QUESTION, None, i) for i, m in enumerate(["visual", "audio", "audio_visual"])],
        video,
        audio,
        duration,
        max_new_tokens=3,
    )
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)


@pytest.mark.parametrize("precision", ["fp32 tiny preset", "bf16 hub-layout checkpoint"])
def test_the_patch_embedding_is_one_matrix_product_equal_to_the_checkpoints_conv3d(precision, model, real_format, hf_checkpoints):
    from safetensors.torch import load_file

    from vaemo.model.vision import PatchProjection

    built = model if precision.startswith("fp32") else real_format
    embed = built.vlm.model.visual.patch_embed
    assert type(embed.proj) is PatchProjection
    if precision.startswith("bf16"):  # the checkpoint's 5-D weight, under its own name
        hub = load_file(str(hf_checkpoints["vlm"] / "model.safetensors"))
        assert torch.equal(built.state_dict()["vlm.model.visual.patch_embed.proj.weight"], hub["visual.patch_embed.proj.weight"])
    patch_volume = embed.in_channels * embed.temporal_patch_size * embed.patch_size**2
    patches = torch.randn(40, patch_volume, generator=torch.Generator().manual_seed(0))
    conv = copy.deepcopy(embed)
    conv.proj.__class__ = torch.nn.Conv3d
    exact = copy.deepcopy(conv).double()

    def output_and_weight_grad(module):
        module.proj.weight.grad = None
        with torch.enable_grad():
            out = module(patches.to(module.proj.weight.dtype))
            out.square().sum().backward()
        grad, module.proj.weight.grad = module.proj.weight.grad, None
        return out.detach().double(), grad.double()

    def error(got, want):
        return float((got - want).abs().max() / want.abs().max())

    reference = output_and_weight_grad(exact)
    matmul_errors = [error(g, w) for g, w in zip(output_and_weight_grad(embed), reference)]
    conv_errors = [error(g, w) for g, w in zip(output_and_weight_grad(conv), reference)]
    # Both round to the model's precision: the product is as close to the exact result as the Conv3d is.
    unit = 1e-6 if precision.startswith("fp32") else 1e-2
    assert all(m <= max(2 * c, unit) for m, c in zip(matmul_errors, conv_errors)), (matmul_errors, conv_errors)


def test_whisper_weights_are_read_once_from_the_index(hf_checkpoints, tmp_path):
    """whisper-large-v3 ships model.safetensors (fp16) beside fp32 shards with their own index."""
    import shutil

    from safetensors.torch import load_file, save_file

    from vaemo.model.build import load_whisper_encoder, weight_files

    folder = tmp_path / "whisper"
    shutil.copytree(hf_checkpoints["audio"], folder)
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").rename(folder / "model.fp32-00001-of-00001.safetensors")
    save_file({k: torch.zeros_like(v) for k, v in state.items()}, str(folder / "stale.safetensors"))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: "model.fp32-00001-of-00001.safetensors" for k in state}})
    )
    assert weight_files(folder, "x") == [folder / "model.fp32-00001-of-00001.safetensors"]
    encoder = load_whisper_encoder(folder, "sdpa", torch.float32)
    assert torch.equal(encoder.conv1.weight, state["model.encoder.conv1.weight"].float())


def test_checkpoint_folders_that_cannot_serve_are_refused_before_any_weight_loads(hf_checkpoints, tmp_path):
    """The preflight reads folders, never weights: in a worker each of these failed only after loading,
    Ray's retries and a hundred lines of tracebacks, with a message that named neither field nor path."""
    import shutil
    from pathlib import Path

    from vaemo.model.build import check_checkpoint_folders, load_vlm

    def copy(name: str, kind: str) -> Path:
        return Path(shutil.copytree(hf_checkpoints[kind], tmp_path / name))

    cfg = real_format_config(hf_checkpoints)
    check_checkpoint_folders(cfg.model, cfg.data.audio_seconds)  # the hub's layout passes
    untokenized = copy("no-tokenizer", "vlm")
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        (untokenized / name).unlink(missing_ok=True)
    torn = copy("torn", "vlm")
    weights = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (torn / "model.safetensors").rename(torn / "model-00001-of-00002.safetensors")
    (torn / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weights}))
    short = copy("whisper-1s", "audio")
    (short / "config.json").write_text(
        json.dumps({**json.loads((short / "config.json").read_text()), "max_source_positions": 50})
    )
    cases = [
        (["model.vlm=AUDIO"], "model.vlm 'AUDIO' is a whisper checkpoint (config.json's model_type); model.vlm reads qwen2_5_vl"),
        ([f"model.vlm={untokenized}"], f"model.vlm '{untokenized}' has no tokenizer files"),
        ([f"model.vlm={torn}"], "lacks model-00002-of-00002.safetensors, which its weight index names"),
        ([f"model.audio_encoder={short}"], "data.audio_seconds=8 is longer than the 1 s window of model.audio_encoder"),
    ]
    for overrides, message in cases:
        overrides = [o.replace("AUDIO", str(hf_checkpoints["audio"])) for o in overrides]
        cfg = real_format_config(hf_checkpoints, *overrides)
        with pytest.raises(UserError) as refused:
            check_checkpoint_folders(cfg.model, cfg.data.audio_seconds)
        assert message.replace("AUDIO", str(hf_checkpoints["audio"])) in str(refused.value)
    resized = copy("resized", "vlm")  # passes every folder check: only loading finds it
    (resized / "config.json").write_text(
        json.dumps({**json.loads((resized / "config.json").read_text()), "intermediate_size": 96})
    )
    with pytest.raises(UserError, match="does not match its config: weights of other sizes"):
        load_vlm(resized, "sdpa", torch.float32)


def test_files_another_user_cannot_read_or_write_are_one_line(hf_checkpoints):
    """The suite runs as root, for whom every file is readable: the permission checks run here as `nobody`
    (a shared cluster's checkpoint copied with a private mode; an output folder owned by another user)."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run a command as another user")
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable]
    if subprocess.run([*as_nobody, "-c", "import vaemo"], capture_output=True, cwd="/").returncode != 0:
        pytest.skip("`nobody` cannot read this checkout or its venv")
    shared = Path(tempfile.mkdtemp(prefix="vaemo-perm-"))
    try:
        shared.chmod(0o755)
        vlm = Path(shutil.copytree(hf_checkpoints["vlm"], shared / "vlm"))
        for path in [vlm, *vlm.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        (vlm / "model.safetensors").chmod(0o600)
        check = (
            f"from pathlib import Path; from vaemo.model.build import weight_files; weight_files(Path({str(vlm)!r}), 'model.vlm')"
        )
        read = subprocess.run([*as_nobody, "-c", check], capture_output=True, text=True, cwd="/")
        assert read.returncode != 0 and f"model.vlm '{vlm}': model.safetensors is not readable" in read.stderr, read.stderr
        (vlm / "model.safetensors").chmod(0o644)
        assert subprocess.run([*as_nobody, "-c", check], capture_output=True, cwd="/").returncode == 0
        exe = str(Path(sys.executable).parent / "vaemo")
        write = subprocess.run(
            [*as_nobody[:-1], exe, "data", "synth", "--out", str(shared / "world"), "--clips", "1"],
            capture_output=True,
            text=True,
            cwd="/",
        )
        assert write.returncode == 2 and f"--out '{shared / 'world'}' is not writable" in write.stderr, write.stderr
    finally:
        shutil.rmtree(shared)


def test_a_vaemo_exports_audio_encoder_is_a_whisper_encoder_folder(adapter_export):
    """model.audio_encoder may name an export's audio_encoder/ (a bare WhisperEncoder, keys without a prefix)."""
    from safetensors.torch import load_file

    from vaemo.model.build import load_whisper_encoder

    encoder = load_whisper_encoder(adapter_export / "audio_encoder", "sdpa", torch.float32)
    saved = load_file(str(adapter_export / "audio_encoder" / "model.safetensors"))
    assert set(encoder.state_dict()) == set(saved)
    assert all(torch.equal(encoder.state_dict()[k].float(), saved[k].float()) for k in saved)


def test_stage1_without_captions_distils_the_teachers_own_answer(model, clips):
    """responses=auto: a clip without a caption gets the frozen teacher's greedy answer from its frames as
    the response of both passes; a clip with one keeps its caption; responses=caption needs the field."""
    from vaemo.data.stream import Batch
    from vaemo.train.objectives import AlignObjective, align_sequences

    video, audio, duration = clips
    metas = [{}, {"caption": "A calm blue circle."}, {"caption": "   "}]
    batch = Batch(
        keys=["a", "b", "c"],
        video=video,
        audio=audio,
        audio_len=[audio.shape[1]] * CLIPS,
        duration=duration,
        meta=metas,
        has_audio=[True] * CLIPS,
    )
    cfg = load_config(ROOT / "configs/tiny.yaml", ["stage1.questions=false", "stage1.teacher_response_tokens=6"], stage=1)
    objective = AlignObjective(cfg)
    assert objective.decode_spec().need_fields == ()
    step = objective.prepare(model, batch, np.random.default_rng(0))
    teacher, student = step.passes["teacher"], step.passes["student"]
    assert teacher.modalities == ["visual"] * 3 and student.modalities == ["audio"] * 3
    assert torch.equal(teacher.response_targets, student.response_targets)  # the same response for both
    rng = np.random.default_rng(0)  # the draws prepare made: one description prompt per clip
    asked = [align_sequences(meta, rng, cfg.prompts, False, "auto")[0][0] for meta in metas]
    written = model.generate([PromptItem("visual", asked[i], None, i) for i in (0, 2)], video, None, duration, 6)
    responses = [model.tokenizer.decode(row[row != -100]) for row in teacher.targets]
    assert responses[1] == "A calm blue circle.<|im_end|>"
    assert [responses[0], responses[2]] == [w + "<|im_end|>" for w in written]
    captioned = AlignObjective(load_config(ROOT / "configs/tiny.yaml", ["stage1.responses=caption"], stage=1))
    assert captioned.decode_spec().need_fields == ("caption",)


def test_the_7b_preset_asks_nothing_of_the_synthetic_world():
    from vaemo.data import vocab

    synthetic = set(vocab.DESCRIBE_PROMPTS) | set(vocab.OBJECTS) | set(vocab.QUESTIONS.values())
    synthetic |= {q for variants in vocab.QUESTION_VARIANTS.values() for q in variants}
    for stage in (1, 2):
        cfg = load_config(ROOT / "configs/qwen2.5-vl-7b.yaml", stage=stage)
        asked = set(cfg.prompts.describe) | set(cfg.prompts.emotion_questions)
        for spec in cfg.prompts.questions.values():
            asked |= set(spec["ask"]) | set(spec["options"])
        assert asked and not asked & synthetic, asked & synthetic
        # emotion words are shared by any taxonomy; the categories are not the world's four
        assert sorted(cfg.stage2.emotions) != sorted(vocab.EMOTIONS) and len(cfg.stage2.emotions) == 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_windows_attend_as_transformers_loop_does(dtype, model, real_format):
    """Qwen2.5-VL's 7B layout (window blocks and full-attention blocks, windows of 112 px) on a frame whose
    edge windows are shorter, and two clips of other sizes: windows of several lengths in one batch."""
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VisionTransformerPretrainedModel,
        Qwen2_5_VLVisionAttention,
    )

    from vaemo.model.window_attention import BatchedWindowAttention

    built = model if dtype == torch.float32 else real_format  # the tiny preset; a bf16 hub-layout checkpoint
    assert all(type(block.attn) is BatchedWindowAttention for block in built.vlm.model.visual.blocks)
    vision = Qwen2_5_VLConfig(
        vision_config=dict(
            depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=48, fullatt_block_indexes=[1]
        )
    ).vision_config
    vision._attn_implementation = "sdpa"
    torch.manual_seed(0)
    tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(vision, dtype=dtype)
    grid = torch.tensor([[2, 10, 14], [1, 8, 8], [1, 4, 20]])  # 140 x 196 px (edge windows), 112 px, 56 x 280 px
    patches = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14, dtype=dtype)

    def output_and_grads():
        tower.zero_grad()
        out = tower(patches, grid_thw=grid).pooler_output
        out.float().square().sum().backward()
        return [out.detach().float()] + [p.grad.float().clone() for p in tower.parameters()]

    assert all(type(block.attn) is Qwen2_5_VLVisionAttention for block in tower.blocks)
    looped = output_and_grads()
    for block in tower.blocks:
        block.attn.__class__ = BatchedWindowAttention
    batched = output_and_grads()
    # Relative to each tensor's scale: a randomly initialised tower's outputs and gradients are small.
    errors = [float((got - want).abs().max() / want.abs().max()) for got, want in zip(batched, looped)]
    assert max(errors) <= (1e-5 if dtype == torch.float32 else 2e-2), errors
