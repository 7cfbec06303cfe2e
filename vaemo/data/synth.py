"""ArtEmo-Synth: render animated abstract artworks with a synchronized soundtrack (spec/artemo-synth.md).

Rendering is vectorised over frames (numpy), the plucked string is an IIR filter (scipy), and FFmpeg
muxes the streams. Each clip's randomness comes from its own generator seeded by (seed, split, index),
so output does not depend on how clips are spread over processes.

Every clip draws what the spec leaves open from `Ranges`: frame size and aspect ratio, frame rate,
duration, sample rate, channels, container and codecs. With `Ranges.jitter` it also draws the rendering
choices the spec does not fix (edge softness, outlines, the star's inner radius, background noise, the
band limit of square and sawtooth waves, the pluck's filter and loss, small envelope and onset jitter
within the spec's numbers), so a model learns the cues the spec defines rather than one renderer.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.signal import lfilter, resample_poly

from vaemo.data import vocab
from vaemo.data.tars import ShardWriter
from vaemo.errors import UserError

if TYPE_CHECKING:
    from vaemo.config import SynthConfig

SPLIT_CODES = {"train": 1, "val": 2, "bench": 3}
PULSE_SECONDS = 0.15
PULSE_GROWTH = 0.3
ATTACK_SECONDS = 0.010
PLUCK_LOSS = 0.996
STRING_RATE = 48000  # Hz at which the plucked string is simulated
SAMPLE_RATES: tuple[int, ...] = (16000, 22050, 24000, 32000, 44100, 48000)


@dataclass(frozen=True)
class Codec:
    """Container and codecs of an encoded clip; any FFmpeg can write (tests use several)."""

    container: str = "mp4"
    video: str = "libx264"
    audio: str = "aac"
    channels: int = 1
    aac_coder: str = "twoloop"
    """FFmpeg's AAC coder (with `audio="aac"`): its default, twoloop. The fast coder encodes a soundtrack in 0.4
    of the time and decodes at least as close to the source (bench/synth_cost.py), but a `make science` run
    with it saved 0.7 min of 60 and scored val audio emotion 0.01 lower (README, "FFmpeg's AAC coder")."""


# The containers a world draws from, each with codecs users' files commonly carry in it.
FORMATS: dict[str, Codec] = {
    "mp4": Codec("mp4", "libx264", "aac"),
    "mov": Codec("mov", "libx264", "aac"),
    "mkv": Codec("mkv", "mpeg4", "libvorbis"),
    "webm": Codec("webm", "libvpx-vp9", "libopus"),
}


@dataclass(frozen=True)
class Ranges:
    """What each clip draws its open choices from (spec: shorter side >= 64 px, 10-60 fps, 2-8 s,
    16-48 kHz, mono or stereo). Degenerate ranges pin a choice, e.g. `Ranges.corner()`."""

    short_side: tuple[int, int] = (64, 224)
    aspect_ratio: tuple[float, float] = (0.5625, 1.7778)  # width / height, drawn log-uniformly
    fps: tuple[int, int] = (10, 60)
    duration: tuple[float, float] = (2.0, 8.0)
    sample_rates: tuple[int, ...] = SAMPLE_RATES
    channels: tuple[int, ...] = (1, 2)
    formats: tuple[str, ...] = tuple(FORMATS)
    jitter: bool = True  # domain randomisation of the rendering choices the spec leaves open

    @classmethod
    def corner(
        cls, size: int = 128, fps: int = 12, duration: tuple[float, float] = (2.0, 3.0), sample_rate: int = 16000
    ) -> "Ranges":
        """One point of the spec: square frames, one rate, mono mp4, no rendering jitter."""
        return cls((size, size), (1.0, 1.0), (fps, fps), duration, (sample_rate,), (1,), ("mp4",), False)

    @classmethod
    def of(cls, synth: "SynthConfig") -> "Ranges":
        return cls(
            tuple(synth.short_side),
            tuple(synth.aspect_ratio),
            tuple(synth.fps),
            (synth.min_duration, synth.max_duration),
            tuple(synth.sample_rates),
            tuple(synth.channels),
            tuple(synth.formats),
            synth.domain_randomization,
        )


@dataclass
class Look:
    """Rendering choices the spec leaves open (fixed defaults without jitter)."""

    edge_blur: float = 0.0  # Gaussian sigma of the object's edge, in pixels
    outline: float = 0.0  # outline width in pixels (0: none)
    outline_value: float = 0.3  # outline brightness (HSV value), same hue as the object
    star_inner: float = 0.42  # inner radius of the star relative to its outer radius
    background_noise: float = 0.0  # std of a static per-pixel noise on the background, in [0, 1] units
    band_limit: float = 1.0  # highest partial of square/sawtooth as a fraction of Nyquist
    pluck_pole: float = 0.5  # the pluck's excitation low-pass pole
    pluck_loss: float = PLUCK_LOSS
    attack: float = ATTACK_SECONDS
    decay_scale: float = 1.0  # multiplies the spec's decay time constant
    onset_jitter: float = 0.0  # max seconds each onset moves
    grain_seed: int = 0  # seeds the background noise, static over the clip

    @classmethod
    def draw(cls, rng: np.random.Generator) -> "Look":
        return cls(
            edge_blur=float(rng.uniform(0.0, 1.2)),
            outline=float(rng.choice([0.0, 0.0, 1.0, 2.0])),
            outline_value=float(rng.uniform(0.1, 0.5)),
            star_inner=float(rng.uniform(0.36, 0.5)),
            background_noise=float(rng.uniform(0.0, 0.02)),
            band_limit=float(rng.uniform(0.35, 1.0)),
            pluck_pole=float(rng.uniform(0.25, 0.5)),
            pluck_loss=float(rng.uniform(0.994, 0.998)),
            attack=float(rng.uniform(0.008, 0.012)),
            decay_scale=float(rng.uniform(0.93, 1.07)),
            onset_jitter=float(rng.uniform(0.0, 0.006)),
            grain_seed=int(rng.integers(2**31)),
        )


@dataclass
class ClipSpec:
    """Every latent factor and free choice of one clip; stored in the clip's JSON for checking."""

    emotion: str
    valence: float
    arousal: float
    object: str
    count: int
    duration: float
    fps: int
    width: int
    height: int
    sample_rate: int
    channels: int
    container: str
    hue: float
    saturation: float
    value_top: float
    root_midi: int
    mode: str
    notes: list[int]
    tempo_bpm: float
    onsets: list[float]
    noise_amplitude: float
    peak_amplitude: float
    sizes: list[float]
    starts: list[list[float]]
    directions: list[float]
    look: Look = field(default_factory=Look)
    caption: str = ""

    @property
    def arousal01(self) -> float:
        return (self.arousal + 1.0) / 2.0

    @property
    def short_side(self) -> int:
        return min(self.width, self.height)

    @property
    def n_frames(self) -> int:
        return max(2, int(round(self.duration * self.fps)))


def _even(x: float) -> int:
    return max(2, 2 * int(round(x / 2)))  # yuv420p needs even sides


def frame_shape(rng: np.random.Generator, ranges: Ranges) -> tuple[int, int]:
    """(width, height): the shorter side in range, the aspect ratio log-uniform in range."""
    short = int(rng.integers(ranges.short_side[0], ranges.short_side[1] + 1))
    low, high = ranges.aspect_ratio
    aspect = float(math.exp(rng.uniform(math.log(low), math.log(high)))) if high > low else low
    if aspect >= 1:
        return _even(short * aspect), _even(short)
    return _even(short), _even(short / aspect)


def sample_clip(rng: np.random.Generator, ranges: Ranges, emotion: str | None = None, obj: str | None = None) -> ClipSpec:
    """Draw one clip's factors following the spec's numbers; everything the spec leaves open is random."""
    emotion = emotion or vocab.EMOTIONS[int(rng.integers(4))]
    obj = obj or vocab.OBJECTS[int(rng.integers(4))]
    sv, sa = vocab.EMOTION_SIGNS[emotion]
    valence = sv * float(rng.uniform(0.3, 1.0))
    arousal = sa * float(rng.uniform(0.3, 1.0))
    s = (arousal + 1.0) / 2.0
    count = int(rng.integers(1, 3))
    duration = float(rng.uniform(*ranges.duration))

    hue = float(rng.uniform(15, 60) if valence > 0 else rng.uniform(190, 260))
    value_top = 0.55 + 0.4 * valence + float(rng.uniform(-0.05, 0.05))
    root = int(rng.integers(67, 75) if valence > 0 else rng.integers(50, 58))
    mode = "major" if valence > 0 else "minor"
    triad = [0, 4, 7] if valence > 0 else [0, 3, 7]
    notes = [root + step + 12 * int(rng.random() < 0.5) for step in triad]
    notes = [notes[i] for i in rng.permutation(3)]  # arpeggio order, random per clip
    tempo_bpm = 50.0 + 150.0 * s
    period = 60.0 / tempo_bpm
    onsets = [float(t) for t in np.arange(0.1, duration, period)]

    # Drawn after the spec's factors, so a world at another point of the spec keeps the same latents.
    width, height = frame_shape(rng, ranges)
    fps = int(rng.integers(ranges.fps[0], ranges.fps[1] + 1))
    sample_rate = int(rng.choice(ranges.sample_rates))
    channels = int(rng.choice(ranges.channels))
    container = str(rng.choice(ranges.formats))
    look = Look.draw(rng) if ranges.jitter else Look()
    if look.onset_jitter:
        onsets = [max(0.0, t + float(rng.uniform(-look.onset_jitter, look.onset_jitter))) for t in onsets]

    short = min(width, height)
    sizes = [0.3 * short * float(rng.uniform(0.85, 1.15)) for _ in range(count)]
    starts = [[float(rng.uniform(r / 2, width - r / 2)), float(rng.uniform(r / 2, height - r / 2))] for r in sizes]
    directions = [float(rng.uniform(0, 2 * math.pi)) for _ in range(count)]
    spec = ClipSpec(
        emotion=emotion,
        valence=valence,
        arousal=arousal,
        object=obj,
        count=count,
        duration=duration,
        fps=fps,
        width=width,
        height=height,
        sample_rate=sample_rate,
        channels=channels,
        container=container,
        hue=hue,
        saturation=0.35 + 0.3 * abs(arousal),
        value_top=value_top,
        root_midi=root,
        mode=mode,
        notes=notes,
        tempo_bpm=tempo_bpm,
        onsets=onsets,
        noise_amplitude=float(rng.uniform(0.005, 0.02)),
        peak_amplitude=0.25 + 0.5 * s,
        sizes=sizes,
        starts=starts,
        directions=directions,
        look=look,
    )
    spec.caption = vocab.caption(vocab.Cues(obj, count, emotion, valence, arousal), rng)
    return spec


# ----------------------------------------------------------------------------------------------
# Sight
# ----------------------------------------------------------------------------------------------


def hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV (hue in degrees, s and v in [0, 1]) to RGB in [0, 1], stacked on the last axis."""
    h = (np.asarray(h, dtype=np.float64) % 360.0) / 60.0
    s, v = np.asarray(s, dtype=np.float64), np.asarray(v, dtype=np.float64)
    c = v * s
    x = c * (1 - np.abs(h % 2 - 1))
    m = v - c
    zeros = np.zeros_like(h)
    sector = np.floor(h).astype(int) % 6
    r = np.choose(sector, [c, x, zeros, zeros, x, c])
    g = np.choose(sector, [x, c, c, x, zeros, zeros])
    b = np.choose(sector, [zeros, zeros, x, c, c, x])
    return np.stack([r + m, g + m, b + m], axis=-1)


def pulse_scale(times: np.ndarray, onsets: list[float]) -> np.ndarray:
    """1.3x at each onset, shrinking back linearly over 150 ms."""
    scale = np.ones_like(times)
    for onset in onsets:
        since = times - onset
        active = (since >= 0) & (since < PULSE_SECONDS)
        scale = np.where(active, np.maximum(scale, 1 + PULSE_GROWTH * (1 - since / PULSE_SECONDS)), scale)
    return scale


def _reflect(p: np.ndarray, low: float, high: float) -> np.ndarray:
    span = max(high - low, 1e-6)
    u = np.mod(p - low, 2 * span)
    return low + np.where(u <= span, u, 2 * span - u)


def shape_mask(kind: str, dx: np.ndarray, dy: np.ndarray, half: np.ndarray, star_inner: float = 0.42) -> np.ndarray:
    """Inside-test of an upright shape of width about 2*half centred at the origin (dy grows downwards)."""
    x, y = np.broadcast_arrays(dx / half, dy / half)
    if kind == "circle":
        return x * x + y * y <= 1.0
    if kind == "square":
        return np.maximum(np.abs(x), np.abs(y)) <= 0.89  # same area as the unit circle, roughly
    if kind == "triangle":
        r = 2 / math.sqrt(3)  # circumradius giving a base width of 2
        inside = y <= r / 2
        for angle in (math.radians(30), math.radians(150)):  # the two slanted edges
            nx, ny = math.cos(angle), -math.sin(angle)
            inside &= (x * nx + y * ny) <= r / 2
        return inside
    if kind == "star":
        rho = np.hypot(x, y)
        theta = np.mod(np.arctan2(x, -y), 2 * math.pi / 5)  # 0 at a point; the star points up
        phi = np.abs(theta - math.pi / 5)  # 0 at an inner vertex, pi/5 at an outer point
        # edge from inner vertex (inner, 0) to outer point (cos pi/5, sin pi/5), in the folded frame
        ax, ay = star_inner, 0.0
        bx, by = math.cos(math.pi / 5), math.sin(math.pi / 5)
        px, py = rho * np.cos(phi), rho * np.sin(phi)
        cross = (bx - ax) * (py - ay) - (by - ay) * (px - ax)
        return cross >= 0
    raise ValueError(f"unknown object {kind}")


def _to_uint8(rgb: np.ndarray) -> np.ndarray:
    return (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)


def background(spec: ClipSpec) -> np.ndarray:
    """(H, W, 3) uint8: the vertical gradient, plus the look's static noise."""
    value = spec.value_top - 0.15 * np.linspace(0.0, 1.0, spec.height)
    rgb = hsv_to_rgb(np.full(spec.height, spec.hue), np.full(spec.height, spec.saturation), np.clip(value, 0, 1))
    rgb = np.broadcast_to(rgb[:, None, :], (spec.height, spec.width, 3))
    if spec.look.background_noise:
        grain = np.random.default_rng(spec.look.grain_seed)
        rgb = rgb + grain.normal(0.0, spec.look.background_noise, size=(spec.height, spec.width, 1))
    return _to_uint8(rgb)


def _coverage(mask: np.ndarray, blur: float) -> np.ndarray:
    """(T, h, w) float coverage of a boolean mask, its edge softened by a Gaussian of `blur` px."""
    cover = mask.astype(np.float32)
    return gaussian_filter(cover, sigma=(0, blur, blur), truncate=2.5) if blur > 0 else cover


def render_frames(spec: ClipSpec) -> np.ndarray:
    """(T, H, W, 3) uint8 frames following the spec's sight rules."""
    width, height, short, look = spec.width, spec.height, spec.short_side, spec.look
    times = np.arange(spec.n_frames) / spec.fps
    frames = np.broadcast_to(background(spec)[None], (spec.n_frames, height, width, 3)).copy()
    fill = hsv_to_rgb(spec.hue + 180.0, 0.8, 0.9 if spec.valence > 0 else 0.7).astype(np.float32) * 255
    edge = hsv_to_rgb(spec.hue + 180.0, 0.8, look.outline_value).astype(np.float32) * 255
    speed = (0.1 + 0.9 * spec.arousal01) * short  # px per second
    scale = pulse_scale(times, spec.onsets)
    for size, start, direction in zip(spec.sizes, spec.starts, spec.directions):
        half = size / 2
        cx = _reflect(start[0] + speed * math.cos(direction) * times, half, width - half)
        cy = _reflect(start[1] + speed * math.sin(direction) * times, half, height - half)
        # Only a window around each instance can be inside it: test those pixels, not the whole frame.
        reach = int(math.ceil(half * (1 + PULSE_GROWTH) * 1.2 + look.outline + 3 * look.edge_blur)) + 1
        x0 = np.round(cx).astype(int) - reach
        y0 = np.round(cy).astype(int) - reach
        offsets = np.arange(2 * reach + 1, dtype=np.float32)
        dx = (x0[:, None] + offsets[None, :] - cx[:, None]).astype(np.float32)[:, None, :]
        dy = (y0[:, None] + offsets[None, :] - cy[:, None]).astype(np.float32)[:, :, None]
        radius = (half * scale).astype(np.float32)[:, None, None]
        inner = _coverage(shape_mask(spec.object, dx, dy, radius, look.star_inner), look.edge_blur)
        layers = [(inner, fill)]
        if look.outline:  # drawn first, the fill over it: a ring of `outline` px around the shape
            grown = radius * (1 + look.outline / np.maximum(radius, 1.0))
            layers.insert(0, (_coverage(shape_mask(spec.object, dx, dy, grown, look.star_inner), look.edge_blur), edge))
        for t in range(spec.n_frames):
            ya, xa = max(y0[t], 0), max(x0[t], 0)
            yb, xb = min(y0[t] + 2 * reach + 1, height), min(x0[t] + 2 * reach + 1, width)
            if ya >= yb or xa >= xb:
                continue
            window = frames[t, ya:yb, xa:xb].astype(np.float32)
            for cover, colour in layers:
                alpha = cover[t, ya - y0[t] : yb - y0[t], xa - x0[t] : xb - x0[t], None]
                window = window * (1 - alpha) + colour * alpha
            frames[t, ya:yb, xa:xb] = (window + 0.5).astype(np.uint8)
    return frames


# ----------------------------------------------------------------------------------------------
# Sound
# ----------------------------------------------------------------------------------------------


def midi_to_hz(note: float) -> float:
    return 440.0 * 2.0 ** ((note - 69) / 12.0)


def _peak_one(wave: np.ndarray) -> np.ndarray:
    """The wave scaled to peak 1; all zeros stay zeros (a note cut to one sample at a clip's end is sin 0)."""
    return wave / max(np.max(np.abs(wave)), 1e-9)


# Samples per period of a tabulated band-limited wave: a linearly interpolated partial k is off by about
# (pi k / N)^2 / 8 of its amplitude, under 1e-3 for the highest partial this world draws (~250 at 48 kHz).
WAVE_TABLE = 16384


def _periodic_wave(ks: np.ndarray, amps: np.ndarray, freq: float, t: np.ndarray) -> np.ndarray:
    """sum_k amps[k] sin(2 pi k freq t), read off one period built by an inverse FFT: the direct sum costs a
    sine per partial and sample (half of a clip's rendering time)."""
    spectrum = np.zeros(WAVE_TABLE // 2 + 1, dtype=complex)
    spectrum[ks] = -0.5j * WAVE_TABLE * amps  # the inverse FFT of -i N a / 2 at bin k is a sin(2 pi k n / N)
    period = np.fft.irfft(spectrum, WAVE_TABLE)
    phase = (freq * t) % 1.0 * WAVE_TABLE
    return np.interp(phase, np.arange(WAVE_TABLE + 1), np.append(period, period[0]))


def _oscillator(kind: str, freq: float, t: np.ndarray, sample_rate: int, rng: np.random.Generator, look: Look) -> np.ndarray:
    """One note's waveform with peak 1: band-limited additive synthesis, or a Karplus-Strong string."""
    nyquist = sample_rate / 2
    if kind == "circle":
        return np.sin(2 * np.pi * freq * t)
    if kind in ("square", "triangle"):
        # Partials up to the look's band limit, never fewer than the first four (they define the timbre).
        highest = max(int(look.band_limit * nyquist // freq), 4)
        ks = np.arange(1, min(highest, int(nyquist // freq)) + 1)
        if kind == "square":
            ks, amps = ks[ks % 2 == 1], 1.0 / ks[ks % 2 == 1]
        else:  # triangle's voice is the sawtooth
            amps = ((-1.0) ** (ks + 1)) / ks
        return _peak_one(_periodic_wave(ks, amps, freq, t))
    if kind == "star":
        # The string runs at 48 kHz whatever the clip's rate: its loop filter acts per sample, so at 16 kHz
        # a high note would lose its harmonics within a few loop passes and sound like a sine.
        rate = max(sample_rate, STRING_RATE)
        period = rate / freq
        lag = int(period)
        frac = period - lag
        n = int(math.ceil(len(t) * rate / sample_rate))
        burst = np.zeros(n)
        noise = lfilter([1 - look.pluck_pole], [1.0, -look.pluck_pole], rng.uniform(-1, 1, size=min(lag + 1, n)))
        burst[: len(noise)] = noise - noise.mean()  # the loop passes DC: an offset would ring for seconds
        feedback = np.zeros(lag + 2)
        feedback[0] = 1.0
        feedback[lag] -= look.pluck_loss * (1 - frac)  # a two-tap loop: low-pass and fractional delay in one
        feedback[lag + 1] -= look.pluck_loss * frac
        wave = lfilter([1.0], feedback, burst)
        if rate != sample_rate:
            wave = resample_poly(wave, sample_rate, rate)[: len(t)]
            wave = np.pad(wave, (0, len(t) - len(wave)))
        return _peak_one(wave)
    raise ValueError(f"unknown object {kind}")


def render_audio(spec: ClipSpec, rng: np.random.Generator) -> np.ndarray:
    """Mono float32 soundtrack in [-1, 1] following the spec's sound rules, as long as the picture."""
    sr, look = spec.sample_rate, spec.look
    n = int(round(spec.n_frames / spec.fps * sr))
    out = np.zeros(n)
    decay = (0.5 - 0.42 * spec.arousal01) * look.decay_scale
    note_len = int((look.attack + 6 * decay) * sr)
    for i, onset in enumerate(spec.onsets):
        start = int(round(onset * sr))
        length = min(note_len, n - start)
        if length <= 0:
            continue
        t = np.arange(length) / sr
        env = np.where(t < look.attack, t / look.attack, np.exp(-(t - look.attack) / decay))
        freq = midi_to_hz(spec.notes[i % 3])
        out[start : start + length] += env * _oscillator(spec.object, freq, t, sr, rng, look)
    out *= spec.peak_amplitude / max(np.max(np.abs(out)), 1e-9)
    out += rng.uniform(-spec.noise_amplitude, spec.noise_amplitude, size=n)
    return np.clip(out, -1, 1).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Encoding and writing
# ----------------------------------------------------------------------------------------------


@dataclass
class Media:
    """One clip's streams to encode: frames (T, H, W, 3) uint8 and mono float audio; None leaves a stream
    out (tests use that to check skipping)."""

    frames: np.ndarray | None
    audio: np.ndarray | None
    fps: int
    sample_rate: int
    codec: Codec = Codec()


def _codec_args(codec: Codec, fps: int, video: bool, audio: bool) -> list[str]:
    args: list[str] = []
    if video:
        args += ["-c:v", codec.video, "-pix_fmt", "yuv420p", "-g", str(fps)]
        if codec.video == "libx264":
            args += ["-preset", "ultrafast", "-crf", "18"]
        elif codec.video.startswith("libvpx"):
            args += ["-deadline", "realtime", "-cpu-used", "8", "-b:v", "0", "-crf", "30"]
        elif codec.video == "mpeg4":
            args += ["-q:v", "3"]
    if audio:
        args += ["-c:a", codec.audio, "-ac", str(codec.channels)]
        if codec.audio == "aac":
            args += ["-aac_coder", codec.aac_coder]
        if codec.audio == "libopus":
            args += ["-ar", "48000"]  # Opus runs at 48 kHz whatever the source's rate
    args += ["-map_metadata", "-1", "-fflags", "+bitexact", "-flags:v", "+bitexact", "-flags:a", "+bitexact"]
    if codec.container in ("mp4", "mov"):
        args += ["-movflags", "+faststart"]
    return args


def encode_clips(clips: list[Media]) -> list[bytes]:
    """Mux many clips with ONE FFmpeg process; returns each clip's file bytes.

    Starting FFmpeg costs ~50 ms (it links ~200 libraries), more than encoding a short clip, so clips are
    encoded in batches: each clip is two inputs and one output of the same command.
    """
    with tempfile.TemporaryDirectory(prefix="vaemo-enc-") as tmp:
        cmd = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-threads", "1"]
        outputs: list[tuple[list[str], Path]] = []
        n_inputs = 0
        for i, clip in enumerate(clips):
            maps: list[str] = []
            if clip.frames is not None:
                t, h, w, _ = clip.frames.shape
                raw = Path(tmp) / f"{i}.rgb"
                raw.write_bytes(np.ascontiguousarray(clip.frames).tobytes())
                cmd += ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", str(clip.fps), "-i", str(raw)]
                maps += ["-map", f"{n_inputs}:v"]
                n_inputs += 1
            if clip.audio is not None:
                raw = Path(tmp) / f"{i}.f32"
                raw.write_bytes(np.ascontiguousarray(clip.audio, dtype=np.float32).tobytes())
                cmd += ["-f", "f32le", "-ar", str(clip.sample_rate), "-ac", "1", "-i", str(raw)]
                maps += ["-map", f"{n_inputs}:a"]
                n_inputs += 1
            outputs.append((maps, Path(tmp) / f"out{i}.{clip.codec.container}"))
        for (maps, out), clip in zip(outputs, clips):
            cmd += maps + _codec_args(clip.codec, clip.fps, clip.frames is not None, clip.audio is not None)
            cmd += [str(out)]
        proc = subprocess.run(cmd, capture_output=True)
        if proc.returncode != 0:
            raise RuntimeError(f"ffmpeg failed: {proc.stderr.decode(errors='replace').strip()[-400:]}")
        return [out.read_bytes() for _, out in outputs]


def encode_clip(frames: np.ndarray | None, audio: np.ndarray | None, fps: int, sample_rate: int, codec: Codec = Codec()) -> bytes:
    return encode_clips([Media(frames, audio, fps, sample_rate, codec)])[0]


def render_clip(
    seed: int, split: str, index: int, ranges: Ranges, emotion: str | None = None, obj: str | None = None
) -> tuple[Media, dict]:
    """Render one clip (not yet encoded); returns its streams and its JSON labels."""
    rng = np.random.default_rng([seed, SPLIT_CODES[split], index])
    spec = sample_clip(rng, ranges, emotion=emotion, obj=obj)
    meta = {
        "caption": spec.caption,
        "emotion": spec.emotion,
        "valence": round(spec.valence, 4),
        "arousal": round(spec.arousal, 4),
        "object": spec.object,
        "count": spec.count,
        "split": split,
        "source": "artemo-synth",
        "synth": {k: v for k, v in asdict(spec).items() if k != "caption"},
    }
    codec = replace(FORMATS[spec.container], channels=spec.channels)
    return Media(render_frames(spec), render_audio(spec, rng), spec.fps, spec.sample_rate, codec), meta


def balanced_labels(index: int) -> tuple[str, str]:
    """Emotion x object for balanced splits: every 16 consecutive clips cover all combinations."""
    return vocab.EMOTIONS[index % 4], vocab.OBJECTS[(index // 4) % 4]


@dataclass
class SynthJob:
    """One unit of parallel work: a shard of a split, or a range of bench clips."""

    split: str
    first: int
    count: int
    out: str
    seed: int
    ranges: Ranges


ENCODE_BATCH = 16


def _run_job(job: SynthJob) -> int:
    with ExitStack() as stack:
        # bench clips are files in a folder; train and val clips go into a shard
        shard = None if job.split == "bench" else stack.enter_context(ShardWriter(job.out))
        _render_job(job, shard)
    return job.count


def _render_job(job: SynthJob, shard: ShardWriter | None) -> None:
    balanced = job.split != "train"
    indices = list(range(job.first, job.first + job.count))
    for first in range(0, len(indices), ENCODE_BATCH):
        batch = indices[first : first + ENCODE_BATCH]
        rendered = []
        for index in batch:
            emotion, obj = balanced_labels(index) if balanced else (None, None)
            rendered.append(render_clip(job.seed, job.split, index, job.ranges, emotion=emotion, obj=obj))
        encoded = encode_clips([media for media, _ in rendered])
        for index, clip, (media, meta) in zip(batch, encoded, rendered):
            container = media.codec.container
            if shard is None:
                (Path(job.out) / f"clip-{index:05d}.{container}").write_bytes(clip)
                (Path(job.out) / f"clip-{index:05d}.json").write_text(json.dumps(meta))
            else:
                shard.write(f"{job.split}-{index:06d}", {container: clip, "json": json.dumps(meta).encode()})


def write_bench_items(bench_dir: Path, clips: int, seed: int) -> int:
    """items.jsonl: each bench clip asked about content and emotion under all three modalities."""
    rng = np.random.default_rng([seed, SPLIT_CODES["bench"], 10**9])
    items = []
    for index in range(clips):
        meta = json.loads((bench_dir / "media" / f"clip-{index:05d}.json").read_text())
        media = f"media/clip-{index:05d}.{meta['synth']['container']}"
        for modality in ("audio", "visual", "audio_visual"):
            for task in vocab.TASKS:
                options = vocab.shuffled_options(task, rng)
                truth = meta["object"] if task == "content" else meta["emotion"]
                items.append(
                    {
                        "id": f"q-{len(items) + 1:06d}",
                        "media": media,
                        "modality": modality,
                        "task": task,
                        "question": vocab.QUESTIONS[task],
                        "options": options,
                        "answer": options.index(truth),
                        "valence": meta["valence"],
                        "arousal": meta["arousal"],
                    }
                )
    with open(bench_dir / "items.jsonl", "w") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")
    return len(items)


def bench_from_shards(shards: list[Path], out: Path, seed: int) -> int:
    """An ArtEmoBench folder asking about the clips of some shards (e.g. the val split, so that settings
    are chosen on val and the bench split is only reported); returns the number of items."""
    import tarfile

    media = out / "media"
    media.mkdir(parents=True, exist_ok=True)
    count = 0
    for shard in sorted(shards):
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            for name in sorted(n for n in members if n.endswith(".json")):
                meta = json.loads(tar.extractfile(members[name]).read())
                clip = f"{name[: -len('.json')]}.{meta['synth']['container']}"
                (media / f"clip-{count:05d}.{meta['synth']['container']}").write_bytes(tar.extractfile(members[clip]).read())
                (media / f"clip-{count:05d}.json").write_text(json.dumps(meta))
                count += 1
    return write_bench_items(out, count, seed)


def synthesize(
    out: str | Path,
    *,
    train_clips: int,
    val_clips: int,
    bench_clips: int,
    seed: int = 0,
    clips_per_shard: int = 100,
    ranges: Ranges = Ranges(),
    workers: int = 0,
    progress=None,
) -> dict[str, int]:
    """Write OUT/train/*.tar, OUT/val/*.tar and OUT/bench/ (items.jsonl + media/). Deterministic per seed: a
    clip is the same bytes whichever splits one call writes. A split of 0 clips is not written."""
    out = Path(out)
    jobs: list[SynthJob] = []
    for split, total in (("train", train_clips), ("val", val_clips)):
        (out / split).mkdir(parents=True, exist_ok=True)
        for shard, first in enumerate(range(0, total, clips_per_shard)):
            path = out / split / f"{split}-{shard:06d}.tar"
            jobs.append(SynthJob(split, first, min(clips_per_shard, total - first), str(path), seed, ranges))
    media = out / "bench" / "media"
    if bench_clips:
        media.mkdir(parents=True, exist_ok=True)
    step = max(1, min(clips_per_shard, math.ceil(bench_clips / max(1, workers or os.cpu_count() or 1))))
    for first in range(0, bench_clips, step):
        jobs.append(SynthJob("bench", first, min(step, bench_clips - first), str(media), seed, ranges))

    workers = workers or os.cpu_count() or 1
    done = 0
    ctx = get_context("spawn")  # rendering children must not inherit a parent's threads (Ray, torch)
    try:
        with ctx.Pool(workers) as pool:
            for n in pool.imap_unordered(_run_job, jobs):
                done += n
                if progress:
                    progress(done)
    except FileNotFoundError as err:
        raise UserError(f"ffmpeg is not installed or not on PATH ({err}); run `make setup`") from None
    items = write_bench_items(out / "bench", bench_clips, seed) if bench_clips else 0
    return {"train": train_clips, "val": val_clips, "bench_clips": bench_clips, "bench_items": items}


def write_world(
    out: str | Path,
    synth: "SynthConfig",
    seed: int = 0,
    train: int | None = None,
    val: int | None = None,
    bench: int | None = None,
    shard_size: int | None = None,
    workers: int | None = None,
    splits: tuple[str, ...] = ("train", "val", "bench"),
) -> dict[str, int]:
    """`vaemo data synth`: the world a preset's `synth` section describes, with progress; explicit counts
    win, and with only `train` given val and bench are derived from it (balanced blocks of 16). `splits`:
    which of them to write now (a clip is the same bytes whether its split is written alone or not)."""
    from vaemo import progress

    train_clips = train or synth.train_clips
    derived = max(16, math.ceil(train_clips / 12 / 16) * 16)
    val_clips = val or (synth.val_clips if train is None else derived)
    bench_clips = bench or (synth.bench_clips if train is None else derived)
    train_clips, val_clips, bench_clips = (
        count if split in splits else 0 for count, split in zip((train_clips, val_clips, bench_clips), SPLIT_CODES)
    )
    with progress.task("synthesizing clips", train_clips + val_clips + bench_clips) as update:
        counts = synthesize(
            out,
            train_clips=train_clips,
            val_clips=val_clips,
            bench_clips=bench_clips,
            seed=seed,
            clips_per_shard=shard_size or synth.clips_per_shard,
            ranges=Ranges.of(synth),
            workers=synth.workers if workers is None else workers,
            progress=update,
        )
    progress.log(f"wrote {out}: {', '.join(f'{n} {what}' for what, n in counts.items() if n)}")
    return counts
