"""What writing one ArtEmo-Synth clip costs, by part, and what FFmpeg's fast AAC coder saves.

Renders clips of a preset's world (its `synth` ranges) in one process and times: drawing the frames,
synthesising the soundtrack, and encoding whole clips (16 to an FFmpeg process, as `vaemo data synth` does).
Then encodes the AAC soundtracks alone with FFmpeg's default coder (twoloop, what vaemo uses:
`synth.Codec.aac_coder`) and its fast one, alternating, and prints both times, their ratio (fast / twoloop:
below 1 is faster) and each coder's signal-to-noise ratio against the rendered soundtrack.

    .venv/bin/python bench/synth_cost.py
    .venv/bin/python bench/synth_cost.py --config configs/tiny.yaml --clips 64 --rounds 3
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def decoded_snr(media, coder: str) -> float:
    """dB of the rendered soundtrack over the error of its AAC encoding (mono, as vaemo writes and decodes it)."""
    from torchcodec.decoders import AudioDecoder

    from vaemo.data import synth

    raw = synth.encode_clip(None, media.audio, media.fps, media.sample_rate, synth.Codec("mp4", aac_coder=coder))
    out = AudioDecoder(raw, sample_rate=media.sample_rate, num_channels=1).get_all_samples().data[0].numpy()
    n = min(len(out), len(media.audio))
    error = out[:n] - media.audio[:n]
    return float(10 * np.log10(np.sum(media.audio[:n] ** 2) / max(np.sum(error**2), 1e-12)))


def main() -> None:
    from vaemo.config import load_config
    from vaemo.data import synth

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs/tiny.yaml"), help="the preset whose synth ranges to draw")
    p.add_argument("--clips", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="timed encodings of the soundtracks per coder")
    args = p.parse_args()
    ranges = synth.Ranges.of(load_config(args.config).synth)

    frames_s = audio_s = 0.0
    clips = []
    for index in range(args.clips):
        rng = np.random.default_rng([0, synth.SPLIT_CODES["train"], index])
        spec = synth.sample_clip(rng, ranges)
        start = time.perf_counter()
        synth.render_frames(spec)
        frames_s += time.perf_counter() - start
        start = time.perf_counter()
        synth.render_audio(spec, rng)
        audio_s += time.perf_counter() - start
        clips.append(synth.render_clip(0, "train", index, ranges)[0])
    start = time.perf_counter()
    for first in range(0, len(clips), synth.ENCODE_BATCH):
        synth.encode_clips(clips[first : first + synth.ENCODE_BATCH])
    encode_s = time.perf_counter() - start
    n = len(clips)
    print(
        f"{n} clips of {args.config}: per clip, frames {frames_s / n * 1000:.0f} ms, soundtrack {audio_s / n * 1000:.0f} ms, "
        f"encoding {encode_s / n * 1000:.0f} ms"
    )

    soundtracks = [dataclasses.replace(m, frames=None) for m in clips if m.audio is not None and m.codec.audio == "aac"]
    seconds: dict[str, list[float]] = {"twoloop": [], "fast": []}
    for _ in range(args.rounds):
        for coder in seconds:
            coded = [dataclasses.replace(m, codec=dataclasses.replace(m.codec, aac_coder=coder)) for m in soundtracks]
            start = time.perf_counter()
            for first in range(0, len(coded), synth.ENCODE_BATCH):
                synth.encode_clips(coded[first : first + synth.ENCODE_BATCH])
            seconds[coder].append((time.perf_counter() - start) / len(coded))
    twoloop, fast = (statistics.median(seconds[c]) for c in seconds)
    snr = {c: [decoded_snr(m, c) for m in soundtracks[:8]] for c in seconds}
    mean_seconds = np.mean([len(m.audio) / m.sample_rate for m in soundtracks])
    print(
        f"{len(soundtracks)} AAC soundtracks ({mean_seconds:.1f} s on average): twoloop {twoloop * 1000:.0f} ms, "
        f"fast {fast * 1000:.0f} ms each, ratio fast/twoloop {fast / twoloop:.2f}; SNR of the first 8, twoloop "
        f"{min(snr['twoloop']):.0f}-{max(snr['twoloop']):.0f} dB, fast {min(snr['fast']):.0f}-{max(snr['fast']):.0f} dB "
        f"(vaemo writes with {synth.Codec().aac_coder})"
    )


if __name__ == "__main__":
    main()
