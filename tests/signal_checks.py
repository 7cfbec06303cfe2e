"""Measurements on rendered clips that the spec-conformance tests compare with spec/artemo-synth.md."""

from __future__ import annotations

import numpy as np

from vaemo.data.synth import hsv_to_rgb  # noqa: F401  (re-exported for tests)


def rgb_to_hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """rgb in [0, 1] (..., 3) -> hue degrees, saturation, value."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = rgb.max(-1), rgb.min(-1)
    d = np.where(mx - mn == 0, 1e-9, mx - mn)
    h = np.where(mx == r, ((g - b) / d) % 6, np.where(mx == g, (b - r) / d + 2, (r - g) / d + 4)) * 60
    s = np.where(mx == 0, 0, (mx - mn) / np.where(mx == 0, 1, mx))
    return h, s, mx


def background_rows(frames: np.ndarray) -> np.ndarray:
    """Per-row background colour (H, 3) in [0, 1]: the median over frames and columns hides moving objects."""
    return np.median(frames.astype(np.float64) / 255.0, axis=(0, 2))


def onset_times(audio: np.ndarray, sr: int) -> np.ndarray:
    """Note onsets: sharp rises of a 5 ms RMS envelope, at least 120 ms apart."""
    hop = sr // 200
    n = len(audio) // hop
    env = np.sqrt((audio[: n * hop].reshape(n, hop) ** 2).mean(1))
    rise = np.zeros_like(env)
    rise[2:] = env[2:] - env[:-2]
    threshold = 0.25 * rise.max()
    onsets, last = [], -1e9
    for i in range(1, n - 1):
        if rise[i] > threshold and rise[i] >= rise[i - 1] and rise[i] >= rise[i + 1] and (i - last) * hop / sr > 0.12:
            onsets.append(i * hop / sr)
            last = i
    return np.array(onsets) - 0.005  # the envelope's rise peaks mid-attack


def spectrum(segment: np.ndarray, sr: int, pad: int = 1 << 17) -> tuple[np.ndarray, np.ndarray]:
    mag = np.abs(np.fft.rfft(segment * np.hanning(len(segment)), pad))
    return np.fft.rfftfreq(pad, 1 / sr), mag


def fundamental(segment: np.ndarray, sr: int) -> float:
    """f0 from the period: the first autocorrelation peak near the highest one (100-2000 Hz), refined."""
    x = segment - segment.mean()
    ac = np.fft.irfft(np.abs(np.fft.rfft(x, 2 * len(x))) ** 2)[: len(x)]
    lo, hi = int(sr / 2000), int(sr / 100)
    window = ac[lo:hi]
    best = window.max()
    for i in range(1, len(window) - 1):
        if window[i] >= 0.85 * best and window[i] >= window[i - 1] and window[i] >= window[i + 1]:
            a, b, c = window[i - 1], window[i], window[i + 1]
            shift = 0.5 * (a - c) / (a - 2 * b + c) if (a - 2 * b + c) != 0 else 0.0
            return sr / (lo + i + shift)
    return sr / (lo + int(np.argmax(window)))


def note_segments(audio: np.ndarray, sr: int, onsets: np.ndarray, length: float = 0.12) -> list[np.ndarray]:
    out = []
    for t in onsets:
        a = int((t + 0.015) * sr)
        b = a + int(length * sr)
        if b <= len(audio):
            out.append(audio[a:b])
    return out


def hz_to_midi(f: float) -> float:
    return 69 + 12 * np.log2(f / 440.0)


def triad_mode(midis: list[float]) -> str | None:
    """'major' or 'minor' if the distinct pitch classes form that triad over some root."""
    classes = sorted({int(round(m)) % 12 for m in midis})
    for root in classes:
        rel = sorted((c - root) % 12 for c in classes)
        if rel == [0, 4, 7]:
            return "major"
        if rel == [0, 3, 7]:
            return "minor"
    return None


def harmonic_profile(segment: np.ndarray, sr: int, f0: float, count: int = 4) -> np.ndarray:
    """Amplitudes of harmonics 1..count relative to the fundamental."""
    freqs, mag = spectrum(segment, sr)
    amps = []
    for k in range(1, count + 1):
        near = np.abs(freqs - k * f0) < 0.03 * f0
        amps.append(mag[near].max() if near.any() and k * f0 < sr / 2 else 0.0)
    amps = np.array(amps)
    return amps / amps[0]
