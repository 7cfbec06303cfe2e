"""The audio pathway: 16 kHz mono -> Whisper log-mel -> Whisper encoder -> AudioProjector -> LLM embeddings."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

N_FFT = 400
HOP = 160  # 100 mel frames per second at 16 kHz
ENCODER_FRAMES_PER_SECOND = 50  # Whisper's second conv has stride 2


class LogMel(nn.Module):
    """Whisper's log-mel spectrogram in torch (batched), for any length.

    On audio padded to 30 s it equals WhisperFeatureExtractor's features (tested against a checkpoint's
    own preprocessor_config.json); `encode` decides whether to pad.
    """

    def __init__(self, n_mels: int):
        super().__init__()
        from transformers import WhisperFeatureExtractor

        filters = WhisperFeatureExtractor(feature_size=n_mels).mel_filters  # (n_fft/2+1, n_mels)
        self.register_buffer("filters", torch.tensor(filters, dtype=torch.float32).T.contiguous(), persistent=False)
        self.register_buffer("window", torch.hann_window(N_FFT), persistent=False)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """(B, S) float -> (B, n_mels, S // 160)."""
        stft = torch.stft(audio.float(), N_FFT, HOP, window=self.window, return_complex=True)
        power = stft[..., :-1].abs() ** 2
        log_spec = torch.clamp(self.filters @ power, min=1e-10).log10()
        peak = log_spec.amax(dim=(1, 2), keepdim=True)
        return (torch.maximum(log_spec, peak - 8.0) + 4.0) / 4.0


def window_samples(encoder: nn.Module) -> int:
    """16 kHz samples of the window the encoder was trained on (30 s for every Whisper checkpoint)."""
    return encoder.config.max_source_positions * 2 * HOP


def encode(encoder: nn.Module, log_mel: nn.Module, audio: torch.Tensor, window: str) -> torch.Tensor:
    """(B, S) 16 kHz -> (B, T, d_model) encoder frames covering the S samples.

    `full` pads the audio with silence to the encoder's trained window, as WhisperFeatureExtractor
    does, runs every position, and keeps the first T; `clip` runs only the clip's T positions.
    """
    frames = (audio.shape[-1] // HOP + 1) // 2
    if window == "full":
        span = window_samples(encoder)
        if audio.shape[-1] > span:
            raise ValueError(f"audio of {audio.shape[-1] / 16000:.1f} s exceeds the encoder's {span / 16000:.0f} s window")
        audio = F.pad(audio, (0, span - audio.shape[-1]))
    elif window != "clip":
        raise ValueError(f"unknown audio window {window!r}")
    mel = log_mel(audio)
    return encode_short(encoder, mel)[:, :frames]


def encode_short(encoder: nn.Module, mel: torch.Tensor) -> torch.Tensor:
    """Run a transformers WhisperEncoder on a mel of up to its fixed 30 s window.

    WhisperEncoder.forward insists on exactly 3000 mel frames; the layers themselves do not. On a full
    window this is the encoder's own forward (tested); on a shorter mel it uses the first T positional
    embeddings, at a fraction of the cost (8 s of audio is 400 encoder positions instead of 1500).
    Every submodule is called as a module, so ZeRO-3 gathers its parameters.
    """
    x = F.gelu(encoder.conv1(mel.to(encoder.conv1.weight.dtype)))
    x = F.gelu(encoder.conv2(x)).permute(0, 2, 1)
    if x.shape[1] > encoder.embed_positions.num_embeddings:
        raise ValueError(
            f"audio of {x.shape[1] / ENCODER_FRAMES_PER_SECOND:.1f} s exceeds the encoder's "
            f"{encoder.embed_positions.num_embeddings / ENCODER_FRAMES_PER_SECOND:.0f} s window"
        )
    positions = torch.arange(x.shape[1], device=x.device)
    x = x + encoder.embed_positions(positions)
    for layer in encoder.layers:
        x = layer(x, None)
    return encoder.layer_norm(x)


class AudioProjector(nn.Module):
    """Encoder frames -> LLM input embeddings: stack `stride` frames, then a 2-layer MLP.

    Also holds learned embeddings for the <|audio_start|>/<|audio_end|> markers, so stage 1 trains
    nothing inside the frozen LLM.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: int, stride: int):
        super().__init__()
        self.stride = stride
        self.fc1 = nn.Linear(in_dim * stride, hidden)
        self.fc2 = nn.Linear(hidden, out_dim)
        # Row 0: <|audio_start|>, row 1: <|audio_end|>. An Embedding, so the vectors are read through a
        # module call, which is when ZeRO-3 gathers a partitioned parameter.
        self.markers = nn.Embedding(2, out_dim)
        nn.init.normal_(self.markers.weight, std=0.02)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, T, in_dim) -> (B, T // stride, out_dim)."""
        b, t, d = features.shape
        n = t // self.stride
        stacked = features[:, : n * self.stride].reshape(b, n, d * self.stride)
        return self.fc2(F.gelu(self.fc1(stacked)))


def audio_tokens(audio_seconds: float, stride: int) -> int:
    """Audio tokens per clip for a soundtrack cut/padded to `audio_seconds`."""
    mel_frames = int(round(audio_seconds * 16000)) // HOP
    return ((mel_frames + 1) // 2) // stride
