"""How close the Whisper encoder's short window (`model.audio_window=clip`) comes to its trained 30 s window.

Both runs feed the same clip; `full` pads it with silence to 30 s (as WhisperFeatureExtractor does) and keeps
the frames covering the clip, `clip` runs only those positions. Prints, per clip length, the mean cosine
similarity of the encoder frames and their relative L2 error (full = reference).

The encoder is the whisper-large-v3-shaped test fixture (tests/hf_checkpoints.py): the real layout, 128 mel
bins and 1,500 positions, but tiny width and *random* weights. A trained whisper-large-v3 attends to the
padding in its own way, so on real weights the figure will differ: measure it there with --whisper.

    .venv/bin/python bench/audio_window.py
    .venv/bin/python bench/audio_window.py --whisper /shared/checkpoints/whisper-large-v3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from vaemo.model.audio import LogMel, encode  # noqa: E402
from vaemo.model.build import load_whisper_encoder  # noqa: E402


def clip_audio(seconds: float, rng: np.random.Generator) -> torch.Tensor:
    """A tone with harmonics and an envelope, plus a little noise: speech-like energy over time."""
    t = np.arange(int(seconds * 16000)) / 16000
    pitch = rng.uniform(120, 600)
    tone = sum(np.sin(2 * np.pi * pitch * k * t) / k for k in range(1, 5))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.5, 3) * t)
    audio = 0.2 * tone * envelope + 0.01 * rng.standard_normal(t.shape)
    return torch.from_numpy(audio.astype(np.float32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--whisper", help="a Whisper checkpoint folder (default: the test fixture, random weights)")
    parser.add_argument("--clips", type=int, default=8, help="clips per length")
    args = parser.parse_args()
    if args.whisper:
        folder = Path(args.whisper)
    else:
        from hf_checkpoints import write_whisper

        folder = write_whisper(Path(tempfile.mkdtemp(prefix="vaemo-whisper-")) / "whisper-large-v3")
    encoder = load_whisper_encoder(folder, "sdpa", torch.float32).eval()
    log_mel = LogMel(encoder.config.num_mel_bins)
    rng = np.random.default_rng(0)
    print(f"encoder: {folder} ({encoder.config.encoder_layers} layers, d_model {encoder.config.d_model})")
    print("seconds  cosine(full, clip)  relative L2 error")
    overall = []
    for seconds in (2.0, 4.0, 8.0):
        cosines, errors = [], []
        for _ in range(args.clips):
            audio = clip_audio(seconds, rng)[None]
            with torch.no_grad():
                full = encode(encoder, log_mel, audio, "full")[0]
                short = encode(encoder, log_mel, audio, "clip")[0]
            cosines.append(float(torch.nn.functional.cosine_similarity(full, short, dim=-1).mean()))
            errors.append(float((full - short).norm() / full.norm()))
        overall += cosines
        print(f"{seconds:7.1f}  {np.mean(cosines):18.4f}  {np.mean(errors):17.4f}")
    print(f"summary: mean cosine similarity of encoder frames, clip vs full window: {np.mean(overall):.4f}")


if __name__ == "__main__":
    main()
