"""Decode one webdataset sample (clip bytes + JSON) into frames and 16 kHz mono audio with torchcodec.

A sample that cannot be used raises SkipSample with a short reason; streams count these reasons and
carry on. Reasons are stable names (they appear in `vaemo data inspect --json` and trainer metrics).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from contextlib import suppress
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from vaemo.data.tars import materialized, transient
from vaemo.data.teacher_records import TEACHER_JSON, TeacherRecord, decode_record

if TYPE_CHECKING:
    from torchcodec.decoders import VideoDecoder

    from vaemo.config import DataConfig

CLIP_EXTENSIONS: tuple[str, ...] = ("mp4", "mkv", "webm", "mov")
# Media a benchmark item or `vaemo ask` may also name (not a training shard's clip): a picture, shown as a
# clip whose frames are all the same, and a soundtrack alone.
PICTURE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
SOUND_EXTENSIONS: tuple[str, ...] = ("wav", "mp3", "flac", "m4a", "aac", "ogg", "opus")
SAMPLE_RATE = 16000  # the audio pathway (Whisper) hears 16 kHz mono
# Channels in antiphase (one wired with its polarity flipped, or "wide" fake stereo) cancel in a mono mix:
# loud channels, a mix near silence. A mix this quiet (full scale 1; -26 dBFS) is checked against its
# channels (a second decode), and gives way to the loudest channel when that is this many times louder.
# A channel at -0.9 times the other leaves a mix 26 dB down: under this level even at full scale (a
# channel's rms is at most 0.71 for a sine). Ordinary stereo, whose mix is never 10x quieter than its
# louder channel, keeps FFmpeg's mix at any level; the level only spares loud clips the second decode.
CANCELLED_RMS = 5e-2
CANCELLED_GAIN = 10.0

# Every reason a sample can be skipped for, and what it means.
SKIP_REASONS: dict[str, str] = {
    "bad_json": "KEY.json is not a JSON object",
    "missing_clip": "the sample has no clip file",
    "unknown_extension": "the sample's clip has an extension other than mp4/mkv/webm/mov",
    "multiple_clips": "the sample has more than one clip file",
    "duplicate_file": "the shard holds two files with the same key and extension",
    "scattered_sample": "a streamed shard (pipe:, URL) holds more of a sample's files after another sample's; "
    "the first part was read as the sample (a local shard is regrouped: write each sample's files together)",
    "empty_clip": "the clip file has zero bytes",
    "unreadable_media": "a clip file on disk could not be read (evaluation, vaemo ask)",
    "corrupt_clip": "FFmpeg cannot open the clip",
    "truncated_clip": "the clip opens but its streams end early or fail to decode",
    "non_finite_audio": "the soundtrack (float PCM) holds NaN or infinite samples",
    "decoder_hang": "decoding the clip took longer than data.decode_timeout_s: a training loader "
    "worker stuck on it was stopped and the stream goes on without it (a resume passes over it too); elsewhere "
    "(validation, evaluation, the teacher cache, the preflight, inspect) the clip is skipped and the thread "
    "decoding it left behind",
    "no_video_stream": "frames are asked for (a stage, a question) and the clip has no video stream",
    "no_audio_stream": "a soundtrack is asked for (a stage, a question) and the clip has no audio stream",
    "missing_field": "the stage needs a JSON field the sample lacks (e.g. caption, valence)",
    "bad_field": "a JSON field has the wrong type",
    "va_out_of_range": "valence/arousal outside [-1, 1] (declare another scale with a `va_scale: [low, high]` field)",
    "unknown_emotion": "the sample's emotion is not one of the config's stage2.emotions",
    "unreadable_shard": "a shard could not be opened or read (counted per shard, also for the samples a resume reads "
    "again for its shuffle buffer and no longer gets; per clip for a clip a resume read the headers of first, when "
    "its shard went away or was written again before the clip was read)",
    "no_teacher_cache": "stage 1 reads a teacher cache and it holds no (readable) record for the sample",
    "stale_teacher_cache": "the sample's cached teacher record was made for another model/prompts/k",
}


class SkipSample(Exception):
    """This sample cannot be used; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in SKIP_REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class DecodeSpec:
    """What the current consumer needs from each sample."""

    num_frames: int = 8
    height: int = 112
    width: int = 112
    audio_seconds: float = 4.0
    audio_fill: str = "repeat"  # a soundtrack shorter than audio_seconds: "repeat" it, or pad with "silence"
    need_video: bool = True
    need_audio: bool = True
    need_fields: tuple[str, ...] = ()
    allow_missing_audio: bool = False  # with need_audio: decode a soundtrack when there is one, else keep the clip
    sampling: str = "uniform"  # "uniform" frames, or uniformly spaced "pairs" of frames pair_seconds apart
    pair_seconds: float = 0.1  # time between a pair's frames, whatever the clip's frame rate
    fit: str = "letterbox"  # another aspect ratio: "letterbox" (black bars), "crop" (centre) or "stretch"
    teacher_fingerprint: str = ""  # non-empty: the sample needs a cached teacher record with this fingerprint
    emotions: tuple[str, ...] = ()  # with `emotion` in need_fields: the categories the consumer knows
    # A clip longer than audio_seconds is cut to one window of that length, which frames and audio share:
    # "random" (training: a start drawn per clip), or "middle" (validation, evaluation, inference).
    window: str = "middle"
    # Where a soundtrack shorter than the window starts before it repeats: "start", or "random" (a phase
    # drawn from the clip's key; training with data.audio_phase=random).
    audio_phase: str = "start"

    @property
    def audio_samples(self) -> int:
        return int(round(self.audio_seconds * SAMPLE_RATE))

    @classmethod
    def for_data(cls, d: "DataConfig", **needs) -> "DecodeSpec":
        """The frames and soundtrack a config's `data` section asks for, plus what the consumer needs."""
        return cls(
            d.num_frames,
            d.frame_height,
            d.frame_width,
            d.audio_seconds,
            audio_fill=d.audio_fill,
            sampling=d.frame_sampling,
            pair_seconds=d.pair_seconds,
            fit=d.frame_fit,
            **needs,
        )


@dataclass
class Clip:
    """A decoded sample. Missing modalities are None (allowed when the consumer does not need them)."""

    key: str
    video: torch.Tensor | None  # (F, 3, H, W) uint8
    audio: torch.Tensor | None  # (audio_samples,) float32, filled as spec.audio_fill says
    audio_len: int  # samples of the clip's own sound in `audio` (the rest repeats them, or is silence)
    duration: float  # seconds, from the container
    meta: dict = field(default_factory=dict)
    source: str = ""  # the shard the sample came from
    teacher: TeacherRecord | None = None  # the cached teacher outputs, when the consumer reads a cache


def split_sample(sample: dict) -> tuple[str, bytes, dict]:
    """(clip extension, clip bytes, JSON meta) of a raw webdataset sample; raises SkipSample."""
    meta: dict = {}
    if "__duplicate__" in sample:
        raise SkipSample("duplicate_file", sample["__duplicate__"])
    if "__scattered__" in sample:
        raise SkipSample("scattered_sample", sample["__key__"])
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (ValueError, UnicodeDecodeError) as err:
            raise SkipSample("bad_json", str(err)[:80]) from None
        if not isinstance(meta, dict):
            raise SkipSample("bad_json", f"top level is {type(meta).__name__}")
    clips = [ext for ext in CLIP_EXTENSIONS if ext in sample]
    if len(clips) > 1:
        raise SkipSample("multiple_clips", ", ".join(clips))
    if not clips:
        others = [k for k in sample if not k.startswith("__") and k != "json"]
        if others:
            raise SkipSample("unknown_extension", ", ".join(sorted(others)))
        raise SkipSample("missing_clip")
    raw = sample[clips[0]]
    if not raw:
        raise SkipSample("empty_clip")
    return clips[0], bytes(raw), meta


def check_fields(meta: dict, needed: tuple[str, ...], emotions: tuple[str, ...] = ()) -> None:
    """Raise SkipSample when a needed field is missing or unusable; valence/arousal on a declared
    `va_scale: [low, high]` (e.g. [1, 9]) are rescaled to [-1, 1] in place."""
    for name in needed:
        if name not in meta or meta[name] is None:
            raise SkipSample("missing_field", name)
        value = meta[name]
        if name in ("valence", "arousal"):
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise SkipSample("bad_field", f"{name}={value!r}")
            value = meta[name] = rescale_va(float(value), meta.get("va_scale"))
            if not -1.0 <= value <= 1.0:
                raise SkipSample("va_out_of_range", f"{name}={value!r}")
        elif name in ("caption", "emotion") and not isinstance(value, str):
            raise SkipSample("bad_field", f"{name}={value!r}")
        elif name == "emotion" and emotions and value not in emotions:
            raise SkipSample("unknown_emotion", f"{value!r}, not one of {', '.join(emotions)}")


def rescale_va(value: float, scale) -> float:
    """A rating on a declared [low, high] scale -> [-1, 1]; without a scale, the value as it is."""
    if scale is None:
        return value
    if not (
        isinstance(scale, list) and len(scale) == 2 and all(isinstance(x, (int, float)) for x in scale) and scale[1] > scale[0]
    ):
        raise SkipSample("bad_field", f"va_scale={scale!r}, not [low, high] with low < high")
    low, high = scale
    return 2.0 * (value - low) / (high - low) - 1.0


def frame_indices(n: int, fps: float, start: float, seconds: float, spec: DecodeSpec) -> list[int]:
    """Which of a clip's n frames (at `fps`) to decode from the window [start, start + seconds), chosen by
    time so that what a model sees does not depend on the frame rate. `pairs`: num_frames/2 pairs spread
    uniformly, the second frame of each pair_seconds after the first (the nearest frame, at least the next
    one); a vision tower whose temporal patch spans two frames then sees a sharp picture plus motion over
    a fixed time."""
    first = min(n - 1, int(start * fps + 1e-6))
    last = max(first, min(n - 1, math.ceil((start + seconds) * fps - 1e-6) - 1))
    if spec.sampling == "pairs" and spec.num_frames % 2 == 0 and n >= 2:
        gap = max(1, round(spec.pair_seconds * fps))
        leads = torch.linspace(first, max(first, last - gap), spec.num_frames // 2).round().long()
        leads = torch.clamp(leads, max=n - 1 - gap) if n - 1 - gap >= 0 else leads
        return torch.stack([leads, torch.clamp(leads + gap, max=n - 1)], 1).flatten().tolist()
    return torch.linspace(first, last, spec.num_frames).round().long().tolist()


def key_fraction(key: str, salt: str = "") -> float:
    """A number in [0, 1) drawn from a clip's key, so that a resumed run draws the same."""
    return int.from_bytes(hashlib.sha256((salt + key).encode()).digest()[:8], "little") / 2**64


def clip_window(total: float, spec: DecodeSpec, key: str = "") -> tuple[float, float]:
    """(start, seconds) of the stretch of a `total`-second clip that frames and audio are taken from: the
    whole clip when it fits in audio_seconds, else one window of that length (its start drawn from the
    clip's key for `random`)."""
    if total <= spec.audio_seconds or total <= 0:
        return 0.0, max(total, 0.0)
    slack = total - spec.audio_seconds
    if spec.window == "random":
        return slack * key_fraction(key), spec.audio_seconds
    return slack / 2, spec.audio_seconds


def fitted_size(height: int, width: int, spec: DecodeSpec) -> tuple[int, int]:
    """The size that frames are resized to: with the frame's aspect ratio, the largest inside (spec.height,
    spec.width) to letterbox, the smallest covering it to crop; to stretch, (spec.height, spec.width)."""
    if spec.fit == "stretch":
        return spec.height, spec.width
    if spec.fit == "crop":
        scale = max(spec.height / height, spec.width / width)
        return max(spec.height, round(height * scale)), max(spec.width, round(width * scale))
    scale = min(spec.height / height, spec.width / width)
    return max(1, min(spec.height, round(height * scale))), max(1, min(spec.width, round(width * scale)))


def _skip_absent_torchvision() -> None:
    """torchcodec tries `import torchvision` each time a decoder with transforms opens; Python does not
    remember a failed import, so without torchvision (vaemo does not install it) every clip paid a search
    of sys.path (~0.3 ms, 2% of a small clip's decode). A None entry in sys.modules makes that import fail
    at once, as it would anyway; with torchvision installed nothing changes."""
    import importlib.util
    import sys

    if "torchvision" not in sys.modules and importlib.util.find_spec("torchvision") is None:
        sys.modules["torchvision"] = None  # type: ignore[assignment]


@functools.cache
def _fitted_resize_type() -> type | None:
    """torchcodec's Resize with its size worked out from the stream's own (height, width) while the
    decoder opens, so a clip is opened once, not probed first (a probe costs ~10% of a clip's decode).
    It uses the hook through which torchcodec (0.11-0.13) turns a transform into its spec string, after
    reading the stream's size; where that hook is absent, None (open_video probes, as it always can)."""
    from torchcodec.transforms import Resize

    _skip_absent_torchvision()
    if not all(hasattr(Resize, hook) for hook in ("_make_transform_spec", "_get_output_dims")):
        return None

    class FittedResize(Resize):
        def __init__(self, spec: DecodeSpec):
            super().__init__((spec.height, spec.width))
            self.spec = spec

        def _get_output_dims(self):
            return None  # known only once the stream's size is; no transform follows this one

        def _make_transform_spec(self, input_dims) -> str:
            height, width = input_dims
            if height and width:
                self.size = fitted_size(height, width, self.spec)
            return super()._make_transform_spec(input_dims)

    return FittedResize


@dataclass
class OpenedVideo:
    """A clip's video stream, opened: its decoder, seconds and frame count."""

    decoder: "VideoDecoder"
    seconds: float
    frames: int
    # A variable frame rate: frame i is not shown at i / rate, so frames are picked by their timestamps
    # (the decoder scanned them: `exact`).
    by_time: bool = False


def rate_varies(frames: int, seconds: float, header_fps: float) -> bool:
    """The header's frame rate disagrees with its frame count over its duration: a variable frame rate (a
    phone's, or an edit joining two rates). Constant-rate clips are off by a frame at most (containers
    that estimate the count, e.g. WebM)."""
    return bool(frames and seconds and header_fps) and abs(frames - seconds * header_fps) > max(2.0, 0.02 * frames)


def open_video(raw: bytes, spec: DecodeSpec, seek_mode: str = "approximate") -> OpenedVideo | None:
    """A VideoDecoder resizing to fit spec's size with the aspect ratio kept, and the clip's seconds and
    frame count; None without a video stream. `approximate` reads the counts from the header (fast);
    `exact` scans the packets (for containers whose header only estimates them, e.g. WebM, and for a
    variable frame rate, which it then samples by time)."""
    from torchcodec.decoders import VideoDecoder
    from torchcodec.transforms import Resize

    fitted = _fitted_resize_type()
    try:
        if fitted is not None:
            decoder = VideoDecoder(raw, seek_mode=seek_mode, transforms=[fitted(spec)])
            md = decoder.metadata
        else:
            md = VideoDecoder(raw, seek_mode=seek_mode).metadata
            size = fitted_size(md.height, md.width, spec) if md.height and md.width else (spec.height, spec.width)
            decoder = VideoDecoder(raw, seek_mode=seek_mode, transforms=[Resize(size)])
    except (ValueError, RuntimeError) as err:
        if isinstance(err, ValueError) and "video stream" in str(err):
            return None
        if seek_mode == "approximate":  # a still picture (a painting's JPEG) has no timestamps to approximate from
            with suppress(SkipSample):
                return open_video(raw, spec, seek_mode="exact")
        raise SkipSample("corrupt_clip", str(err).splitlines()[0][:80]) from None
    n = md.num_frames
    if not n and md.duration_seconds and md.average_fps:
        n = int(md.duration_seconds * md.average_fps)
    if not n:
        raise SkipSample("corrupt_clip", "no frame count")
    seconds = float(md.duration_seconds or n / (md.average_fps or 1.0))
    if seek_mode == "approximate" and rate_varies(n, seconds, md.average_fps or 0.0):
        # torchcodec maps frame numbers and times through the header's rate in this mode, which a variable
        # rate makes wrong (frames from the wrong moments, never from the clip's end).
        return replace(open_video(raw, spec, seek_mode="exact"), by_time=True)
    return OpenedVideo(decoder, seconds, n)


def decode_video(raw: bytes, spec: DecodeSpec, key: str = "", opened=None) -> tuple[torch.Tensor | None, float]:
    """spec.num_frames frames from the clip's window (`clip_window`), chosen by time (`frame_indices`),
    resized with the aspect ratio kept and fitted (`fit_frames`), and the window's seconds; (None, 0)
    without video. `opened`: what `open_video` returned for these bytes, when the caller has it."""
    opened = opened or open_video(raw, spec)
    if opened is None:
        return None, 0.0
    with suppress(RuntimeError, IndexError):
        return window_frames(opened, spec, key)
    # The header's frame count may be an estimate (WebM derives it from a duration that includes the
    # soundtrack's tail): count the frames themselves and try once more.
    try:  # the clip opened before: whatever fails now, its streams end early
        counted = open_video(raw, spec, seek_mode="exact")
    except SkipSample as err:
        raise SkipSample("truncated_clip", err.detail) from None
    if counted is None:
        raise SkipSample("truncated_clip", "its video stream is gone on a second reading")
    if counted.frames == 1 < opened.frames:
        # A song's cover art is a video stream of one picture spanning the song, which cannot be sought.
        raise SkipSample("no_video_stream", "one attached picture (cover art), not video")
    try:
        if counted.frames < 0.9 * opened.frames:  # an estimate is off by a frame or two; a cut-off file by far more
            raise SkipSample("truncated_clip", f"{counted.frames} of {opened.frames} frames")
        return window_frames(counted, spec, key)
    except SkipSample as err:
        raise SkipSample("truncated_clip", err.detail) from None
    except (RuntimeError, IndexError) as err:
        raise SkipSample("truncated_clip", str(err).splitlines()[0][:80]) from None


def window_frames(opened: OpenedVideo, spec: DecodeSpec, key: str) -> tuple[torch.Tensor, float]:
    start, seconds = clip_window(opened.seconds, spec, key)
    fps = opened.frames / opened.seconds if opened.seconds > 0 else 1.0
    indices = frame_indices(opened.frames, fps, start, seconds, spec)
    if not opened.by_time:
        return fit_frames(opened.decoder.get_frames_at(indices=indices).data, spec), seconds
    return fit_frames(frames_shown_at(opened.decoder, indices, fps, spec), spec), seconds


def frames_shown_at(decoder: "VideoDecoder", indices: list[int], fps: float, spec: DecodeSpec) -> torch.Tensor:
    """A variable-rate clip's frames at the times `frame_indices` chose on its average rate (the middle of
    each chosen frame's slot, from the stream's start). A pair's partner is the frame shown pair_seconds
    after its lead starts, or later where the rate drops below one frame in pair_seconds: at least the
    next frame, as on a constant rate."""
    begin = decoder.metadata.begin_stream_seconds or 0.0
    last = (decoder.metadata.end_stream_seconds or begin + (max(indices) + 1) / fps) - 1e-6
    at = lambda chosen: [min(begin + (i + 0.5) / fps, last) for i in chosen]  # noqa: E731
    if not (spec.sampling == "pairs" and spec.num_frames % 2 == 0 and len(indices) >= 2):
        return decoder.get_frames_played_at(seconds=at(indices)).data
    leads = decoder.get_frames_played_at(seconds=at(indices[0::2]))
    frames = []
    for lead, lead_start in zip(leads.data, leads.pts_seconds.tolist()):
        partner, time = lead, lead_start
        while time < last:
            time = min(time + spec.pair_seconds, last)
            shown = decoder.get_frame_played_at(time)
            partner = shown.data
            if shown.pts_seconds > lead_start:
                break
        frames += [lead, partner]
    return torch.stack(frames)


def fit_frames(frames: torch.Tensor, spec: DecodeSpec) -> torch.Tensor:
    """(F, 3, h, w) resized frames -> (F, 3, H, W): centred on black bars (letterbox) or their centre cut out
    (crop); a no-op when the size already fits."""
    h, w = frames.shape[-2:]
    if (h, w) == (spec.height, spec.width):
        return frames
    top, left = (spec.height - h) // 2, (spec.width - w) // 2
    if spec.fit == "crop":
        return frames[..., -top : -top + spec.height, -left : -left + spec.width]
    return F.pad(frames, (left, spec.width - w - left, top, spec.height - h - top))


def decode_audio(
    raw: bytes, spec: DecodeSpec, start: float | None = None, key: str = ""
) -> tuple[torch.Tensor | None, int, float, float]:
    """16 kHz mono samples of the clip's window (from `start`, else the window `clip_window` picks from the
    audio's own length), filled to spec.audio_seconds (`fill_window`); the clip's own samples in it; seconds
    decoded (the whole clip when it fits the window); the soundtrack's seconds as its header gives them (0:
    not given). None without audio."""
    from torchcodec.decoders import AudioDecoder

    try:
        decoder = AudioDecoder(raw, sample_rate=SAMPLE_RATE, num_channels=1)
        total = decoder.metadata.duration_seconds_from_header or 0.0
        if start is None:
            start = clip_window(total, spec, key)[0] if total > spec.audio_seconds else 0.0
        if total and start >= total:  # a soundtrack shorter than the video, over before the window opens
            samples = torch.zeros(0)
        else:
            samples = played(decoder, start, spec.audio_seconds)[0]
            if (decoder.metadata.num_channels or 1) > 1 and samples.numel() and rms(samples) < CANCELLED_RMS:
                samples = louder_of(samples, raw, start, spec.audio_seconds)
    except ValueError as err:
        if "audio stream" in str(err):
            return None, 0, 0.0, 0.0
        raise SkipSample("corrupt_clip", str(err).splitlines()[0][:80]) from None
    except RuntimeError as err:
        raise SkipSample("corrupt_clip", str(err).splitlines()[0][:80]) from None
    if not torch.isfinite(samples).all():  # float PCM may carry NaN or inf: one such clip would poison the weights
        raise SkipSample("non_finite_audio", f"{int((~torch.isfinite(samples)).sum())} samples")
    seconds = samples.numel() / SAMPLE_RATE
    n = min(samples.numel(), spec.audio_samples)
    samples = samples[:n]
    if spec.audio_phase == "random" and spec.audio_fill == "repeat" and 0 < n < spec.audio_samples:
        samples = samples.roll(-int(key_fraction(key, "audio-phase") * n))
    return fill_window(samples, spec.audio_samples, spec.audio_fill), n, seconds, total


def played(decoder, start: float, seconds: float) -> torch.Tensor:
    """(channels, samples) of the `seconds` from `start`; from 0, the whole soundtrack (callers cut it)."""
    if start > 0:
        return decoder.get_samples_played_in_range(start, start + seconds).data
    return decoder.get_all_samples().data


def rms(samples: torch.Tensor) -> float:
    return samples.float().pow(2).mean().sqrt().item() if samples.numel() else 0.0


def louder_of(mix: torch.Tensor, raw: bytes, start: float, seconds: float) -> torch.Tensor:
    """The mono `mix`, or the soundtrack's loudest channel where the mix cancelled it."""
    from torchcodec.decoders import AudioDecoder

    channels = played(AudioDecoder(raw, sample_rate=SAMPLE_RATE), start, seconds)
    loudest = channels[channels.pow(2).mean(dim=1).argmax()]
    return loudest if rms(loudest) > CANCELLED_GAIN * rms(mix) else mix


def fill_window(samples: torch.Tensor, length: int, fill: str) -> torch.Tensor:
    """`samples` (at most `length`) brought to `length`: repeated end to end, or followed by silence."""
    if fill not in ("repeat", "silence"):
        raise ValueError(f"unknown audio fill {fill!r}")
    if fill == "repeat" and 0 < samples.numel() < length:
        return samples.repeat(-(-length // samples.numel()))[:length]
    return F.pad(samples, (0, length - samples.numel()))


def decode_sample(sample: dict, spec: DecodeSpec) -> Clip:
    """Decode what `spec` asks for; raises SkipSample when the sample cannot serve it. Frames and audio come
    from the same window of the clip (`clip_window`)."""
    try:
        sample = materialized(sample)  # (a resumed stream's samples come with their bytes unread)
    except OSError as err:
        if transient(err):  # the storage, not the clip: the worker stops for Ray's restart
            raise
        raise SkipSample("unreadable_shard", str(err)) from None
    except ValueError as err:  # the shard was cut or written again since its headers were read
        raise SkipSample("unreadable_shard", str(err)) from None
    _, raw, meta = split_sample(sample)
    check_fields(meta, spec.need_fields, spec.emotions)
    key = sample.get("__key__", "")
    teacher = cached_teacher(sample, spec.teacher_fingerprint) if spec.teacher_fingerprint else None
    video, seconds, start = None, 0.0, None
    if spec.need_video:
        opened = open_video(raw, spec)
        if opened is None:
            raise SkipSample("no_video_stream")
        start, seconds = clip_window(opened.seconds, spec, key)
        video, _ = decode_video(raw, spec, key, opened)
    audio, audio_len, audio_seconds, soundtrack = decode_audio(raw, spec, start, key) if spec.need_audio else (None, 0, 0.0, 0.0)
    if spec.need_audio and audio is None and not spec.allow_missing_audio:
        raise SkipSample("no_audio_stream")
    # A clip cut short still opens (its header is intact) but its soundtrack stops before the header says.
    # A soundtrack the header itself gives as shorter than the video is no fault: the window is filled.
    promised = min(seconds, soundtrack - (start or 0.0)) if soundtrack > 0 else seconds
    if audio is not None and promised > 0 and audio_seconds < 0.8 * promised:
        raise SkipSample("truncated_clip", f"audio {audio_seconds:.2f}s of {promised:.2f}s")
    duration = seconds or min(audio_seconds, spec.audio_seconds)
    return Clip(
        key=key,
        video=video,
        audio=audio,
        audio_len=audio_len,
        duration=duration,
        meta=meta,
        source=sample.get("__url__", ""),
        teacher=teacher,
    )


def cached_teacher(sample: dict, fingerprint: str) -> TeacherRecord:
    if TEACHER_JSON not in sample:
        raise SkipSample("no_teacher_cache")
    try:
        record = decode_record(sample)
    except (ValueError, KeyError, OSError) as err:
        raise SkipSample("no_teacher_cache", f"damaged record: {str(err)[:60]}") from None
    if record.fingerprint != fingerprint:
        raise SkipSample("stale_teacher_cache", record.fingerprint)
    return record
