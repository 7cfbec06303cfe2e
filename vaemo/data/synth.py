"""ArtEmo-Synth: render animated abstract artworks with a synchronized soundtrack (spec/artemo-synth.md).

Rendering is vectorised over frames (numpy), the plucked string is an IIR filter (scipy), and FFmpeg
muxes H.264 + AAC. Each clip's randomness comes from its own generator seeded by (seed, split, index),
so output does not depend on how clips are spread over processes.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy.signal import lfilter

from vaemo.data import world
from vaemo.errors import UserError

if TYPE_CHECKING:
    from vaemo.config import SynthConfig

SPLIT_CODES = {"train": 1, "val": 2, "bench": 3}
PULSE_SECONDS = 0.15
PULSE_GROWTH = 0.3
ATTACK_SECONDS = 0.010
PLUCK_LOSS = 0.996


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
    size: int
    sample_rate: int
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
    caption: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def arousal01(self) -> float:
        return (self.arousal + 1.0) / 2.0


def sample_clip(rng: np.random.Generator, *, size: int, fps: int, min_duration: float, max_duration: float,
                sample_rate: int, emotion: str | None = None, obj: str | None = None) -> ClipSpec:
    """Draw one clip's factors following the spec's numbers; everything the spec leaves open is random."""
    emotion = emotion or world.EMOTIONS[int(rng.integers(4))]
    obj = obj or world.OBJECTS[int(rng.integers(4))]
    sv, sa = world.EMOTION_SIGNS[emotion]
    valence = sv * float(rng.uniform(0.3, 1.0))
    arousal = sa * float(rng.uniform(0.3, 1.0))
    s = (arousal + 1.0) / 2.0
    count = int(rng.integers(1, 3))
    duration = float(rng.uniform(min_duration, max_duration))

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

    sizes = [0.3 * size * float(rng.uniform(0.85, 1.15)) for _ in range(count)]
    starts = [[float(rng.uniform(r / 2, size - r / 2)) for _ in range(2)] for r in sizes]
    directions = [float(rng.uniform(0, 2 * math.pi)) for _ in range(count)]
    spec = ClipSpec(
        emotion=emotion, valence=valence, arousal=arousal, object=obj, count=count, duration=duration, fps=fps,
        size=size, sample_rate=sample_rate, hue=hue, saturation=0.35 + 0.3 * abs(arousal), value_top=value_top,
        root_midi=root, mode=mode, notes=notes, tempo_bpm=tempo_bpm, onsets=onsets,
        noise_amplitude=float(rng.uniform(0.005, 0.02)), peak_amplitude=0.25 + 0.5 * s,
        sizes=sizes, starts=starts, directions=directions,
    )
    spec.caption = world.caption(world.Cues(obj, count, emotion, valence, arousal), rng)
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


def shape_mask(kind: str, dx: np.ndarray, dy: np.ndarray, half: np.ndarray) -> np.ndarray:
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
        inner = 0.42
        # edge from inner vertex (inner, 0) to outer point (cos pi/5, sin pi/5), in the folded frame
        ax, ay = inner, 0.0
        bx, by = math.cos(math.pi / 5), math.sin(math.pi / 5)
        px, py = rho * np.cos(phi), rho * np.sin(phi)
        cross = (bx - ax) * (py - ay) - (by - ay) * (px - ax)
        return cross >= 0
    raise ValueError(f"unknown object {kind}")


def render_frames(spec: ClipSpec) -> np.ndarray:
    """(T, H, W, 3) uint8 frames following the spec's sight rules."""
    size, n_frames = spec.size, max(2, int(round(spec.duration * spec.fps)))
    times = np.arange(n_frames) / spec.fps
    rows = np.linspace(0.0, 1.0, size)
    value = spec.value_top - 0.15 * rows
    background = hsv_to_rgb(np.full(size, spec.hue), np.full(size, spec.saturation), np.clip(value, 0, 1))
    background = (np.clip(background, 0, 1) * 255 + 0.5).astype(np.uint8)
    frames = np.broadcast_to(background[None, :, None, :], (n_frames, size, size, 3)).copy()

    obj_rgb = hsv_to_rgb(spec.hue + 180.0, 0.8, 0.9 if spec.valence > 0 else 0.7)
    obj_rgb = (np.clip(obj_rgb, 0, 1) * 255 + 0.5).astype(np.uint8)
    speed = (0.1 + 0.9 * spec.arousal01) * size  # px per second
    scale = pulse_scale(times, spec.onsets)
    for width, start, direction in zip(spec.sizes, spec.starts, spec.directions):
        half = width / 2
        cx = _reflect(start[0] + speed * math.cos(direction) * times, half, size - half)
        cy = _reflect(start[1] + speed * math.sin(direction) * times, half, size - half)
        # Only a window around each instance can be inside it: test those pixels, not the whole frame.
        reach = int(math.ceil(half * (1 + PULSE_GROWTH) * 1.2)) + 1
        x0 = np.round(cx).astype(int) - reach
        y0 = np.round(cy).astype(int) - reach
        offsets = np.arange(2 * reach + 1, dtype=np.float32)
        dx = (x0[:, None] + offsets[None, :] - cx[:, None]).astype(np.float32)[:, None, :]
        dy = (y0[:, None] + offsets[None, :] - cy[:, None]).astype(np.float32)[:, :, None]
        mask = shape_mask(spec.object, dx, dy, (half * scale).astype(np.float32)[:, None, None])
        for t in range(n_frames):
            ya, xa = max(y0[t], 0), max(x0[t], 0)
            yb, xb = min(y0[t] + 2 * reach + 1, size), min(x0[t] + 2 * reach + 1, size)
            window = mask[t, ya - y0[t] : yb - y0[t], xa - x0[t] : xb - x0[t]]
            frames[t, ya:yb, xa:xb][window] = obj_rgb
    return frames


# ----------------------------------------------------------------------------------------------
# Sound
# ----------------------------------------------------------------------------------------------


def midi_to_hz(note: float) -> float:
    return 440.0 * 2.0 ** ((note - 69) / 12.0)


def _oscillator(kind: str, freq: float, t: np.ndarray, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """One note's waveform with peak 1: band-limited additive synthesis, or a Karplus-Strong string."""
    nyquist = sample_rate / 2
    if kind == "circle":
        return np.sin(2 * np.pi * freq * t)
    if kind in ("square", "triangle"):
        ks = np.arange(1, int(nyquist // freq) + 1)
        if kind == "square":
            ks, amps = ks[ks % 2 == 1], 1.0 / ks[ks % 2 == 1]
        else:  # triangle's voice is the sawtooth
            amps = ((-1.0) ** (ks + 1)) / ks
        wave = amps @ np.sin(2 * np.pi * freq * np.outer(ks, t))
        return wave / np.max(np.abs(wave))
    if kind == "star":
        period = sample_rate / freq
        lag = int(period)
        frac = period - lag
        burst = np.zeros(len(t))
        noise = lfilter([0.5], [1.0, -0.5], rng.uniform(-1, 1, size=min(lag + 1, len(t))))  # a softer pluck
        burst[: len(noise)] = noise - noise.mean()  # the loop passes DC: an offset would ring for seconds
        feedback = np.zeros(lag + 2)
        feedback[0] = 1.0
        feedback[lag] -= PLUCK_LOSS * (1 - frac)  # a two-tap loop: low-pass and fractional delay in one
        feedback[lag + 1] -= PLUCK_LOSS * frac
        wave = lfilter([1.0], feedback, burst)
        return wave / max(np.max(np.abs(wave)), 1e-9)
    raise ValueError(f"unknown object {kind}")


def render_audio(spec: ClipSpec, rng: np.random.Generator) -> np.ndarray:
    """Mono float32 soundtrack in [-1, 1] following the spec's sound rules."""
    sr = spec.sample_rate
    n_frames = max(2, int(round(spec.duration * spec.fps)))
    n = int(round(n_frames / spec.fps * sr))  # exactly the picture's length
    out = np.zeros(n)
    decay = 0.5 - 0.42 * spec.arousal01
    note_len = int((ATTACK_SECONDS + 6 * decay) * sr)
    for i, onset in enumerate(spec.onsets):
        start = int(round(onset * sr))
        length = min(note_len, n - start)
        if length <= 0:
            continue
        t = np.arange(length) / sr
        env = np.where(t < ATTACK_SECONDS, t / ATTACK_SECONDS, np.exp(-(t - ATTACK_SECONDS) / decay))
        freq = midi_to_hz(spec.notes[i % 3])
        out[start : start + length] += env * _oscillator(spec.object, freq, t, sr, rng)
    out *= spec.peak_amplitude / max(np.max(np.abs(out)), 1e-9)
    out += rng.uniform(-spec.noise_amplitude, spec.noise_amplitude, size=n)
    return np.clip(out, -1, 1).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Encoding and writing
# ----------------------------------------------------------------------------------------------


@dataclass
class Codec:
    """Container and codecs of an encoded clip; any FFmpeg can write (tests use several)."""

    container: str = "mp4"
    video: str = "libx264"
    audio: str = "aac"
    channels: int = 1


def encode_clips(clips: list[tuple[np.ndarray | None, np.ndarray | None]], fps: int, sample_rate: int,
                 codec: Codec = Codec()) -> list[bytes]:
    """Mux many (frames T,H,W,3 uint8; mono float audio) pairs with ONE FFmpeg process; returns file bytes.

    Starting FFmpeg costs ~50 ms (it links ~200 libraries), more than encoding a short clip, so clips are
    encoded in batches: each clip is two inputs and one output of the same command. `None` for frames or
    audio writes a clip without that stream (used to test skipping).
    """
    with tempfile.TemporaryDirectory(prefix="vaemo-enc-") as tmp:
        cmd = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-threads", "1"]
        outputs: list[tuple[list[str], Path]] = []
        n_inputs = 0
        for i, (frames, audio) in enumerate(clips):
            maps: list[str] = []
            if frames is not None:
                t, h, w, _ = frames.shape
                raw = Path(tmp) / f"{i}.rgb"
                raw.write_bytes(np.ascontiguousarray(frames).tobytes())
                cmd += ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", str(fps), "-i", str(raw)]
                maps += ["-map", f"{n_inputs}:v"]
                n_inputs += 1
            if audio is not None:
                raw = Path(tmp) / f"{i}.f32"
                raw.write_bytes(np.ascontiguousarray(audio, dtype=np.float32).tobytes())
                cmd += ["-f", "f32le", "-ar", str(sample_rate), "-ac", "1", "-i", str(raw)]
                maps += ["-map", f"{n_inputs}:a"]
                n_inputs += 1
            outputs.append((maps, Path(tmp) / f"out{i}.{codec.container}"))
        for (maps, out), (frames, audio) in zip(outputs, clips):
            cmd += maps
            if frames is not None:
                cmd += ["-c:v", codec.video, "-pix_fmt", "yuv420p", "-g", str(fps)]
                if codec.video == "libx264":
                    cmd += ["-preset", "ultrafast", "-crf", "18"]
                elif codec.video.startswith("libvpx"):
                    cmd += ["-deadline", "realtime", "-cpu-used", "8", "-b:v", "0", "-crf", "30"]
            if audio is not None:
                cmd += ["-c:a", codec.audio, "-ac", str(codec.channels)]
                if codec.audio == "libopus":
                    cmd += ["-ar", "48000"]
            cmd += ["-map_metadata", "-1", "-fflags", "+bitexact", "-flags:v", "+bitexact", "-flags:a", "+bitexact"]
            if codec.container in ("mp4", "mov"):
                cmd += ["-movflags", "+faststart"]
            cmd += [str(out)]
        proc = subprocess.run(cmd, capture_output=True)
        if proc.returncode != 0:
            raise RuntimeError(f"ffmpeg failed: {proc.stderr.decode(errors='replace').strip()[-400:]}")
        return [out.read_bytes() for _, out in outputs]


def encode_clip(frames: np.ndarray | None, audio: np.ndarray | None, fps: int, sample_rate: int,
                codec: Codec = Codec()) -> bytes:
    return encode_clips([(frames, audio)], fps, sample_rate, codec)[0]


def render_clip(seed: int, split: str, index: int, *, size: int, fps: int, min_duration: float,
                max_duration: float, sample_rate: int, emotion: str | None = None,
                obj: str | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Render one clip (not yet encoded); returns (frames, audio, its JSON labels)."""
    rng = np.random.default_rng([seed, SPLIT_CODES[split], index])
    spec = sample_clip(rng, size=size, fps=fps, min_duration=min_duration, max_duration=max_duration,
                       sample_rate=sample_rate, emotion=emotion, obj=obj)
    meta = {"caption": spec.caption, "emotion": spec.emotion, "valence": round(spec.valence, 4),
            "arousal": round(spec.arousal, 4), "object": spec.object, "count": spec.count, "split": split,
            "source": "artemo-synth", "synth": {k: v for k, v in asdict(spec).items()
                                                if k not in ("caption", "extra")}}
    return render_frames(spec), render_audio(spec, rng), meta


def make_clip(seed: int, split: str, index: int, **render) -> tuple[bytes, dict]:
    """Render and encode one clip; returns (mp4 bytes, its JSON labels)."""
    frames, audio, meta = render_clip(seed, split, index, **render)
    return encode_clip(frames, audio, render["fps"], render["sample_rate"]), meta


def balanced_labels(index: int) -> tuple[str, str]:
    """Emotion x object for balanced splits: every 16 consecutive clips cover all combinations."""
    return world.EMOTIONS[index % 4], world.OBJECTS[(index // 4) % 4]


@dataclass
class SynthJob:
    """One unit of parallel work: a shard of a split, or a range of bench clips."""

    split: str
    first: int
    count: int
    out: str
    seed: int
    render: dict


ENCODE_BATCH = 16


def _run_job(job: SynthJob) -> int:
    import webdataset as wds

    balanced = job.split != "train"
    indices = list(range(job.first, job.first + job.count))
    writer = None
    if job.split != "bench":
        stream = open(job.out, "wb")
        writer = wds.TarWriter(stream, mtime=0.0, encoder=False)
    for first in range(0, len(indices), ENCODE_BATCH):
        batch = indices[first : first + ENCODE_BATCH]
        rendered = []
        for index in batch:
            emotion, obj = balanced_labels(index) if balanced else (None, None)
            rendered.append(render_clip(job.seed, job.split, index, emotion=emotion, obj=obj, **job.render))
        encoded = encode_clips([(f, a) for f, a, _ in rendered], job.render["fps"], job.render["sample_rate"])
        for index, clip, (_, _, meta) in zip(batch, encoded, rendered):
            if writer is None:
                (Path(job.out) / f"clip-{index:05d}.mp4").write_bytes(clip)
                (Path(job.out) / f"clip-{index:05d}.json").write_text(json.dumps(meta))
            else:
                writer.write({"__key__": f"{job.split}-{index:06d}", "mp4": clip, "json": json.dumps(meta).encode()})
    if writer is not None:
        writer.close()
        stream.close()
    return job.count


def write_bench_items(bench_dir: Path, clips: int, seed: int) -> int:
    """items.jsonl: each bench clip asked about content and emotion under all three modalities."""
    rng = np.random.default_rng([seed, SPLIT_CODES["bench"], 10**9])
    items = []
    for index in range(clips):
        meta = json.loads((bench_dir / "media" / f"clip-{index:05d}.json").read_text())
        for modality in ("audio", "visual", "audio_visual"):
            for task in world.TASKS:
                options = world.shuffled_options(task, rng)
                truth = meta["object"] if task == "content" else meta["emotion"]
                items.append({
                    "id": f"q-{len(items) + 1:06d}", "media": f"media/clip-{index:05d}.mp4", "modality": modality,
                    "task": task, "question": world.QUESTIONS[task], "options": options,
                    "answer": options.index(truth), "valence": meta["valence"], "arousal": meta["arousal"],
                })
    with open(bench_dir / "items.jsonl", "w") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")
    return len(items)


def synthesize(out: str | Path, *, train_clips: int, val_clips: int, bench_clips: int, seed: int = 0,
               clips_per_shard: int = 100, size: int = 128, fps: int = 12, min_duration: float = 2.0,
               max_duration: float = 3.0, sample_rate: int = 16000, workers: int = 0,
               progress=None) -> dict[str, int]:
    """Write OUT/train/*.tar, OUT/val/*.tar and OUT/bench/ (items.jsonl + media/). Deterministic per seed."""
    out = Path(out)
    render = dict(size=size, fps=fps, min_duration=min_duration, max_duration=max_duration, sample_rate=sample_rate)
    jobs: list[SynthJob] = []
    for split, total in (("train", train_clips), ("val", val_clips)):
        (out / split).mkdir(parents=True, exist_ok=True)
        for shard, first in enumerate(range(0, total, clips_per_shard)):
            path = out / split / f"{split}-{shard:06d}.tar"
            jobs.append(SynthJob(split, first, min(clips_per_shard, total - first), str(path), seed, render))
    media = out / "bench" / "media"
    media.mkdir(parents=True, exist_ok=True)
    step = max(1, min(clips_per_shard, math.ceil(bench_clips / max(1, workers or os.cpu_count() or 1))))
    for first in range(0, bench_clips, step):
        jobs.append(SynthJob("bench", first, min(step, bench_clips - first), str(media), seed, render))

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
    items = write_bench_items(out / "bench", bench_clips, seed)
    return {"train": train_clips, "val": val_clips, "bench_clips": bench_clips, "bench_items": items}


def write_world(out: str | Path, synth: "SynthConfig", seed: int = 0, train: int | None = None,
                val: int | None = None, bench: int | None = None, shard_size: int | None = None,
                workers: int | None = None) -> dict[str, int]:
    """`vaemo data synth`: the world a preset's `synth` section describes, with progress; explicit counts
    win, and with only `train` given val and bench are derived from it (balanced blocks of 16)."""
    from vaemo import progress

    train_clips = train or synth.train_clips
    derived = max(16, math.ceil(train_clips / 12 / 16) * 16)
    val_clips = val or (synth.val_clips if train is None else derived)
    bench_clips = bench or (synth.bench_clips if train is None else derived)
    with progress.task("synthesizing clips", train_clips + val_clips + bench_clips) as update:
        counts = synthesize(out, train_clips=train_clips, val_clips=val_clips, bench_clips=bench_clips, seed=seed,
                            clips_per_shard=shard_size or synth.clips_per_shard, size=synth.size, fps=synth.fps,
                            min_duration=synth.min_duration, max_duration=synth.max_duration,
                            sample_rate=synth.sample_rate, workers=synth.workers if workers is None else workers,
                            progress=update)
    progress.log(f"wrote {out}: {counts}")
    return counts
