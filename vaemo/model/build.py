"""Build a VAEmotionLLM from the run config: tiny (small configs of the real classes) or local checkpoints.

Both ways run the same code: Qwen2_5_VLForConditionalGeneration and the WhisperEncoder of transformers,
only their configs differ. Nothing is ever fetched from a hub.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from vaemo.config import DataConfig, ModelConfig
from vaemo.data import vocab
from vaemo.errors import UserError
from vaemo.model.audio import ENCODER_FRAMES_PER_SECOND, HOP, N_FFT, AudioProjector, audio_tokens
from vaemo.model.tokenizer import SpecialTokens, build_tiny_tokenizer, load_tokenizer
from vaemo.model.vaemo_llm import ModelSpec, VAEmotionLLM, check_loading, device_map, sized_as_configured
from vaemo.model.vision import CLIP_MEAN, CLIP_STD, VisualSpec


def choose_attention(requested: str, dtype: torch.dtype) -> str:
    """The attention kernel for this process's device and the model's dtype: decided here only."""
    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    return attention_for(requested, dtype, flash_attention_importable(), capability)


def attention_for(requested: str, dtype: torch.dtype, flash_importable: bool, capability: tuple[int, int] | None) -> str:
    """`auto`: FlashAttention-2 where it runs (flash-attn installed, a CUDA GPU of compute capability 8.0 or
    newer, weights in bf16 or fp16), else PyTorch SDPA. Asked for by name where it cannot run: one line
    saying why. `capability`: the GPU's, None without one."""
    blocker = None
    if capability is None:
        blocker = "a CUDA GPU"
    elif not flash_importable:
        blocker = "the flash-attn package (pip install 'vaemo[gpu]')"
    elif capability < (8, 0):
        blocker = f"a GPU of compute capability 8.0 or newer (this one: {capability[0]}.{capability[1]})"
    elif dtype not in (torch.bfloat16, torch.float16):
        blocker = f"bf16 weights (model.dtype gives {str(dtype).removeprefix('torch.')})"
    if requested == "auto":
        return "sdpa" if blocker else "flash_attention_2"
    if requested == "flash_attention_2" and blocker:
        raise UserError(f"model.attn_implementation=flash_attention_2 needs {blocker}; use auto or sdpa")
    return requested


def flash_attention_importable() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def choose_dtype(requested: str = "auto") -> torch.dtype:
    """`auto`: bf16 on a GPU with bf16 arithmetic (compute capability 8.0 on), else fp32: a V100 or T4
    would emulate bf16, slowly. CPU bf16 runs, slowly: the tests use it to run GPU precision."""
    if requested == "auto":
        native_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if native_bf16 else torch.float32
    if requested not in DTYPES:
        raise UserError(f"dtype '{requested}' is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[requested]


def tiny_vlm(cfg: ModelConfig, tokens: SpecialTokens, vocab_size: int, attn: str, dtype: torch.dtype):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    t = cfg.tiny_vlm
    head_dim = t.hidden_size // t.num_heads
    third = head_dim // 2 // 3
    mrope = [head_dim // 2 - 2 * third, third, third]  # sums to head_dim / 2
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_layers,
            num_attention_heads=t.num_heads,
            num_key_value_heads=t.num_kv_heads,
            max_position_embeddings=4096,
            bos_token_id=tokens.im_start,
            eos_token_id=tokens.im_end,
            pad_token_id=tokens.pad,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
        ),
        vision_config=dict(
            depth=t.vision_depth,
            hidden_size=t.vision_hidden_size,
            intermediate_size=t.vision_intermediate_size,
            num_heads=t.vision_heads,
            out_hidden_size=t.hidden_size,
            patch_size=t.patch_size,
            spatial_merge_size=t.spatial_merge_size,
            temporal_patch_size=t.temporal_patch_size,
            window_size=t.patch_size * t.spatial_merge_size * 4,
            fullatt_block_indexes=list(range(t.vision_depth)),
        ),
        vision_start_token_id=tokens.vision_start,
        vision_end_token_id=tokens.vision_end,
        image_token_id=tokens.image_pad,
        video_token_id=tokens.video_pad,
        tie_word_embeddings=False,
    )
    return Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation=attn, dtype=dtype)


def tiny_audio_encoder(cfg: ModelConfig, audio_seconds: float, attn: str, dtype: torch.dtype):
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    a = cfg.tiny_audio
    positions = int(audio_seconds * ENCODER_FRAMES_PER_SECOND) + 1
    config = WhisperConfig(
        vocab_size=64,
        num_mel_bins=a.num_mel_bins,
        d_model=a.d_model,
        encoder_layers=a.num_layers,
        encoder_attention_heads=a.num_heads,
        encoder_ffn_dim=a.ffn_dim,
        decoder_layers=1,
        decoder_attention_heads=a.num_heads,
        decoder_ffn_dim=a.ffn_dim,
        max_source_positions=positions,
        max_target_positions=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    config._attn_implementation = attn
    return WhisperEncoder(config).to(dtype)


# The kind of checkpoint each field's loader reads (config.json's model_type).
CHECKPOINT_TYPES = {"model.vlm": "qwen2_5_vl", "model.audio_encoder": "whisper"}
# A VLM folder needs one of these: transformers builds an empty tokenizer from a folder with none of them.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")


def check_checkpoint_folders(model_cfg: ModelConfig, audio_seconds: float = 0.0) -> None:
    """Fail with one line before any weight loads (in a worker, after Ray retries, a failure costs minutes
    and its cause drowns in tracebacks) when a folder cannot serve: not there or unreadable, another kind of
    model, weight or tokenizer files missing, or an encoder window shorter than `audio_seconds`. A stage
    that starts from an export reads only the export."""
    if model_cfg.init_from:
        export = Path(model_cfg.init_from)
        if not (export / "vaemo_config.json").is_file():
            raise UserError(f"model.init_from '{export}' is not a vaemo export (no vaemo_config.json)")
        configs = {part: read_checkpoint_config(export / part, "model.init_from") for part in ("vlm", "audio_encoder")}
        for part in configs:
            weight_files(export / part, "model.init_from")
        check_encoder_window(configs["audio_encoder"], export / "audio_encoder", "model.init_from", audio_seconds)
        return
    for field, value in (("model.vlm", model_cfg.vlm), ("model.audio_encoder", model_cfg.audio_encoder)):
        if value == "tiny":
            continue
        folder = Path(value)
        config = read_checkpoint_config(folder, field)
        kind = config.get("model_type")
        if kind != CHECKPOINT_TYPES[field]:
            raise UserError(
                f"{field} '{value}' is a {kind or 'untyped'} checkpoint (config.json's model_type); {field} reads "
                f"{CHECKPOINT_TYPES[field]}"
            )
        weight_files(folder, field, pytorch_bin=field == "model.vlm")
        if field == "model.vlm" and not any((folder / name).is_file() for name in TOKENIZER_FILES):
            raise UserError(f"model.vlm '{value}' has no tokenizer files (one of {', '.join(TOKENIZER_FILES)})")
        if field == "model.audio_encoder":
            check_encoder_window(config, folder, field, audio_seconds)


def read_checkpoint_config(folder: Path, field: str) -> dict:
    config = folder / "config.json"
    if not config.is_file():
        hint = "a vaemo export holds vlm/ and audio_encoder/" if field == "model.init_from" else "use `tiny` or a local path"
        raise UserError(f"{field} '{folder}' is not a checkpoint folder (no config.json); {hint}")
    try:
        return json.loads(config.read_text())
    except OSError as err:
        raise UserError(f"{field} '{folder}' is not readable ({err.strerror})") from None
    except ValueError:
        raise UserError(f"{field} '{config}' is not valid JSON") from None


def check_encoder_window(config: dict, folder: Path, field: str, audio_seconds: float) -> None:
    """Whisper's encoder (its config.json: `config`) takes at most max_source_positions / 50 seconds (30 for
    every released one)."""
    positions = config.get("max_source_positions", 1500)
    if audio_seconds > positions / ENCODER_FRAMES_PER_SECOND:
        raise UserError(
            f"data.audio_seconds={audio_seconds:g} is longer than the {positions / ENCODER_FRAMES_PER_SECOND:g} s "
            f"window of {field} '{folder}' (max_source_positions={positions})"
        )


def load_vlm(path: Path, attn: str, dtype: torch.dtype, device: torch.device | None = None):
    """A Qwen2.5-VL checkpoint in the hub's layout (transformers maps its v4 names) or saved by transformers 5;
    a weight that is missing, unexpected or mis-sized is an error, never a silent random init. `device`:
    load the shards straight onto it (see `build_model`)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    with sized_as_configured(path):
        vlm, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            path, attn_implementation=attn, dtype=dtype, output_loading_info=True, **device_map(device)
        )
    check_loading(path, info)
    return vlm


def add_token_rows(vlm: nn.Module, vocab_size: int) -> None:
    """Embedding (and untied output) rows for tokens the checkpoint lacks (vaemo's audio markers), each the
    mean of the checkpoint's rows: transformers' `mean_resizing` draws them from N(mean, 1e-9 cov), a draw
    from the RNG of whichever device holds the weights, so a model read onto a GPU would differ from the
    same model read on the host."""
    old = vlm.get_input_embeddings().num_embeddings
    if vocab_size <= old:
        return
    vlm.resize_token_embeddings(vocab_size, mean_resizing=False)
    with torch.no_grad():
        for matrix in {id(m.weight): m.weight for m in (vlm.get_input_embeddings(), vlm.get_output_embeddings())}.values():
            matrix[old:] = matrix[:old].float().mean(0).to(matrix.dtype)


def load_whisper_encoder(path: Path, attn: str, dtype: torch.dtype, device: torch.device | None = None):
    """The encoder of a Whisper checkpoint (WhisperForConditionalGeneration or WhisperModel layout).

    Only the encoder's tensors are read, once: the decoder is never built, and of a folder that holds
    the weights twice (whisper-large-v3 ships fp16 `model.safetensors` and fp32 shards) one copy is read.
    """
    from safetensors import safe_open
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    check_feature_extractor(path)
    config = WhisperConfig.from_pretrained(path)
    config._attn_implementation = attn
    with torch.device("meta"):
        encoder = WhisperEncoder(config)
    expected = encoder.state_dict()
    state = {}
    for file in weight_files(path, "model.audio_encoder"):
        with safe_open(str(file), framework="pt", device=str(device or "cpu")) as f:
            for key in f.keys():
                # A WhisperForConditionalGeneration or WhisperModel checkpoint, or a bare encoder (a vaemo export's)
                name = key.removeprefix("model.encoder.").removeprefix("encoder.")
                if name in expected and name not in state:
                    state[name] = f.get_tensor(key).to(dtype)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise UserError(f"model.audio_encoder '{path}' lacks encoder weights, e.g. {missing[:3]}")
    wrong = sorted(k for k in expected if tuple(state[k].shape) != tuple(expected[k].shape))
    if wrong:
        raise UserError(f"model.audio_encoder '{path}': weights do not match config.json, e.g. {wrong[:3]}")
    encoder.load_state_dict({k: state[k] for k in expected}, assign=True)
    return encoder


def weight_files(path: Path, field: str, pytorch_bin: bool = False) -> list[Path]:
    """The safetensors files of one copy of a checkpoint's weights: the index's shards, else model.safetensors,
    else every *.safetensors file; with `pytorch_bin`, else pytorch_model.bin or its shards (transformers reads
    them). Each must be there and readable (a torn download lacks a shard)."""
    files = indexed_or_single(path, field, "model.safetensors") or sorted(path.glob("*.safetensors"))
    if not files and pytorch_bin:
        files = indexed_or_single(path, field, "pytorch_model.bin")
    if not files:
        raise UserError(f"{field} '{path}' holds no " + ("weights" if pytorch_bin else ".safetensors weights"))
    for file in files:
        if not file.is_file():
            raise UserError(f"{field} '{path}' lacks {file.name}, which its weight index names (an unfinished download?)")
        if not os.access(file, os.R_OK):
            raise UserError(f"{field} '{path}': {file.name} is not readable")
    return files


def indexed_or_single(path: Path, field: str, single: str) -> list[Path]:
    """The shards `single`.index.json names, else `single` itself; [] when neither is there."""
    index = path / f"{single}.index.json"
    if index.is_file():
        try:
            return sorted({path / name for name in json.loads(index.read_text())["weight_map"].values()})
        except (OSError, ValueError, KeyError, AttributeError):
            raise UserError(f"{field} '{path}': {index.name} is not a readable weight index") from None
    return [path / single] if (path / single).is_file() else []


def check_feature_extractor(path: Path) -> None:
    """vaemo computes Whisper's log-mel itself (vaemo/model/audio.py); a checkpoint whose feature extractor
    differs would be fed features it was not trained on."""
    config = path / "preprocessor_config.json"
    if not config.is_file():
        return
    data = json.loads(config.read_text())
    expected = {"sampling_rate": 16000, "hop_length": HOP, "n_fft": N_FFT}
    for key, value in expected.items():
        if key in data and data[key] != value:
            raise UserError(
                f"model.audio_encoder '{path}': preprocessor_config.json has {key}={data[key]}, vaemo's log-mel needs {value}"
            )


def preprocessor_stats(path: Path) -> tuple[tuple, tuple]:
    config = path / "preprocessor_config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        return tuple(data.get("image_mean", CLIP_MEAN)), tuple(data.get("image_std", CLIP_STD))
    return CLIP_MEAN, CLIP_STD


def build_model(model_cfg: ModelConfig, data_cfg: DataConfig, seed: int = 0, device: torch.device | None = None) -> VAEmotionLLM:
    """The starting model of a stage: the previous stage's export, or fresh from the base checkpoints.

    `device` (a training rank's GPU): checkpoint weights are read from their safetensors files straight
    onto it, so the ranks of a node share the files' page cache instead of each holding a host copy of
    the model (8 x 16 GB at 7B); the rest is small and is moved after. The tiny model is built on the host.
    """
    model = _build_model(model_cfg, data_cfg, seed, device)
    model.pack_prefixes = model_cfg.pack_prefixes
    return model


def _build_model(model_cfg: ModelConfig, data_cfg: DataConfig, seed: int, device: torch.device | None) -> VAEmotionLLM:
    check_checkpoint_folders(model_cfg, data_cfg.audio_seconds)
    dtype = choose_dtype(model_cfg.dtype)
    attn = choose_attention(model_cfg.attn_implementation, dtype)
    if model_cfg.init_from:
        path = Path(model_cfg.init_from)
        model = VAEmotionLLM.from_pretrained(path, attn_implementation=attn, dtype=dtype, device=device)
        check_matches_export(model.spec, model_cfg, data_cfg, path)
        # What a stage asks and how long an answer may be are the stage's to choose; its export records them.
        model.spec.system_prompt = model.prompts.system_prompt = model_cfg.system_prompt
        model.spec.max_response_tokens = model.prompts.max_response_tokens = model_cfg.max_response_tokens
        # Not checked: a stage may change how short soundtracks are filled; its export then records its own.
        model.spec.audio_fill = data_cfg.audio_fill
        return model

    torch.manual_seed(seed)
    if model_cfg.vlm == "tiny":
        tokenizer = build_tiny_tokenizer(vocab.corpus())
        tokens = SpecialTokens.of(tokenizer)
        vocab_size = -(-len(tokenizer) // 64) * 64
        vlm = tiny_vlm(model_cfg, tokens, vocab_size, attn, dtype)
        mean, std = CLIP_MEAN, CLIP_STD
    else:
        vlm_path = Path(model_cfg.vlm)
        tokenizer = load_tokenizer(vlm_path)
        tokens = SpecialTokens.of(tokenizer)
        # Reading weights leaves the host RNG, which seeds the new parts (the projector), where it was:
        # onto a GPU (device_map) or not, the same seed gives the same model.
        with torch.random.fork_rng(devices=[]):
            vlm = load_vlm(vlm_path, attn, dtype, device)
            add_token_rows(vlm, len(tokenizer))
        mean, std = preprocessor_stats(vlm_path)
    if model_cfg.audio_encoder == "tiny":
        audio_encoder = tiny_audio_encoder(model_cfg, data_cfg.audio_seconds, attn, dtype)
    else:
        with torch.random.fork_rng(devices=[]):
            audio_encoder = load_whisper_encoder(Path(model_cfg.audio_encoder), attn, dtype, device)
    return assemble_model(vlm, audio_encoder, tokenizer, tokens, (mean, std), model_cfg, data_cfg, dtype)


def assemble_model(
    vlm: nn.Module,
    audio_encoder: nn.Module,
    tokenizer,
    tokens: SpecialTokens,
    image_stats: tuple[tuple[float, ...], tuple[float, ...]],
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    dtype: torch.dtype,
) -> VAEmotionLLM:
    """A VAEmotionLLM around a built VLM and audio encoder: the new audio projector and the specs the data
    must match. (bench/comm_bytes.py assembles the 7B preset's model here on the meta device.)"""
    mean, std = image_stats
    vision = vlm.config.vision_config
    visual = VisualSpec(
        num_frames=data_cfg.num_frames,
        height=data_cfg.frame_height,
        width=data_cfg.frame_width,
        patch_size=vision.patch_size,
        temporal_patch_size=vision.temporal_patch_size,
        merge_size=vision.spatial_merge_size,
        image_mean=mean,
        image_std=std,
        frame_sampling=data_cfg.frame_sampling,
        pair_seconds=data_cfg.pair_seconds,
        frame_fit=data_cfg.frame_fit,
    )
    check_inputs_fit(visual, data_cfg.audio_seconds, model_cfg.projector.pool_stride)
    hidden = vlm.config.text_config.hidden_size
    projector_hidden = model_cfg.projector.hidden_size or 2 * hidden
    projector = AudioProjector(audio_encoder.config.d_model, hidden, projector_hidden, model_cfg.projector.pool_stride).to(dtype)
    spec = ModelSpec(
        visual=visual,
        audio_seconds=data_cfg.audio_seconds,
        n_mels=audio_encoder.config.num_mel_bins,
        projector_stride=model_cfg.projector.pool_stride,
        projector_hidden=projector_hidden,
        tokens=tokens.to_dict(),
        system_prompt=model_cfg.system_prompt,
        max_response_tokens=model_cfg.max_response_tokens,
        audio_window=resolve_audio_window(model_cfg),
        audio_fill=data_cfg.audio_fill,
    )
    return VAEmotionLLM(vlm, audio_encoder, projector, tokenizer, spec)


def resolve_audio_window(model_cfg: ModelConfig) -> str:
    if model_cfg.audio_window != "auto":
        return model_cfg.audio_window
    return "clip" if model_cfg.audio_encoder == "tiny" else "full"


def check_inputs_fit(visual: VisualSpec, audio_seconds: float, pool_stride: int) -> None:
    """Frames that the vision tower's patches tile, and a soundtrack window that makes at least one audio token."""
    try:
        visual.check()
    except ValueError as err:
        raise UserError(str(err)) from None
    if audio_tokens(audio_seconds, pool_stride) < 1:
        raise UserError(
            f"model.projector.pool_stride={pool_stride} leaves no audio token in data.audio_seconds={audio_seconds} s "
            f"({audio_tokens(audio_seconds, 1)} encoder frames); lower the stride or lengthen the window"
        )


def check_shapes(model_cfg: ModelConfig, data_cfg: DataConfig) -> None:
    """The preflight's `check_inputs_fit`, before any model is built: the vision tower's patch sizes come
    from the tiny sizes or the checkpoint's config.json. A stage started from an export is fed as the export
    was (`check_matches_export`)."""
    if model_cfg.init_from:
        return
    if model_cfg.vlm == "tiny":
        t = model_cfg.tiny_vlm
        patch, temporal, merge = t.patch_size, t.temporal_patch_size, t.spatial_merge_size
    else:
        vision = read_checkpoint_config(Path(model_cfg.vlm), "model.vlm").get("vision_config", {})
        # Qwen2.5-VL's own defaults, for a config.json that leaves them out
        defaults = (("patch_size", 14), ("temporal_patch_size", 2), ("spatial_merge_size", 2))
        patch, temporal, merge = (vision.get(name, value) for name, value in defaults)
    visual = VisualSpec(
        num_frames=data_cfg.num_frames,
        height=data_cfg.frame_height,
        width=data_cfg.frame_width,
        patch_size=patch,
        temporal_patch_size=temporal,
        merge_size=merge,
    )
    check_inputs_fit(visual, data_cfg.audio_seconds, model_cfg.projector.pool_stride)


def check_encoder_layers(model_cfg: ModelConfig, top_layers: int) -> None:
    """stage1.audio_encoder_top_layers asks for no more layers than the audio encoder has, from its config
    (the tiny sizes, the checkpoint's or the export's config.json), before any model is built."""
    if not top_layers:
        return
    if model_cfg.init_from:
        layers = read_checkpoint_config(Path(model_cfg.init_from) / "audio_encoder", "model.init_from").get("encoder_layers")
    elif model_cfg.audio_encoder == "tiny":
        layers = model_cfg.tiny_audio.num_layers
    else:
        layers = read_checkpoint_config(Path(model_cfg.audio_encoder), "model.audio_encoder").get("encoder_layers")
    if isinstance(layers, int) and top_layers > layers:
        raise UserError(f"stage1.audio_encoder_top_layers={top_layers}, but the audio encoder has {layers} layers")


def check_matches_export(spec: ModelSpec, model_cfg: ModelConfig, data_cfg: DataConfig, path: Path) -> None:
    """A stage started from an export feeds it clips decoded the way it was trained on, and keeps its audio
    projector's shape."""
    if model_cfg.projector.pool_stride != spec.projector_stride:
        raise UserError(
            f"model.projector.pool_stride={model_cfg.projector.pool_stride} differs from the model in '{path}' "
            f"({spec.projector_stride}); set model.projector.pool_stride={spec.projector_stride}"
        )
    if model_cfg.projector.hidden_size and model_cfg.projector.hidden_size != spec.projector_hidden:
        raise UserError(
            f"model.projector.hidden_size={model_cfg.projector.hidden_size} differs from the model in '{path}' "
            f"({spec.projector_hidden}); set model.projector.hidden_size=0 (the export's)"
        )
    pairs = [
        ("num_frames", spec.visual.num_frames),
        ("frame_height", spec.visual.height),
        ("frame_width", spec.visual.width),
        ("frame_sampling", spec.visual.frame_sampling),
        ("pair_seconds", spec.visual.pair_seconds),
        ("frame_fit", spec.visual.frame_fit),
        ("audio_seconds", spec.audio_seconds),
    ]
    for name, value in pairs:
        if getattr(data_cfg, name) != value:
            raise UserError(
                f"data.{name}={getattr(data_cfg, name)} differs from the model in '{path}' ({value}); set data.{name}={value}"
            )
