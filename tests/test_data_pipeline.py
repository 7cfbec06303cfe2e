"""Decoding, streaming, skipping, packing and inspecting clip shards."""

from __future__ import annotations

import collections
import dataclasses
import io
import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import ROOT, cli

from vaemo.data.bench import read_bench
from vaemo.data.decode import DecodeSpec, SkipSample, decode_sample
from vaemo.data.stream import EvalStream, StreamState, TrainStream, expand_shards, make_loader, train_shard_subset
from vaemo.data.synth import Codec, encode_clip
from vaemo.errors import UserError

SPEC = DecodeSpec(num_frames=8, height=56, width=56, audio_seconds=3.0)


def ramp_clip(n_frames: int, fps: int, width: int, height: int, sr: int, codec: Codec, freq: float = 440.0):
    """Frame i is a flat grey of level 200*i/(n-1); the soundtrack is a sine at `freq`."""
    frames = np.stack([np.full((height, width, 3), round(200 * i / (n_frames - 1)), np.uint8) for i in range(n_frames)])
    t = np.arange(int(n_frames / fps * sr)) / sr
    return encode_clip(frames, 0.5 * np.sin(2 * np.pi * freq * t), fps, sr, codec)


@pytest.mark.parametrize(
    "codec,fps,size,sr",
    [
        (Codec("mp4", "libx264", "aac", 1), 12, (128, 128), 16000),
        (Codec("mkv", "libx264", "aac", 2), 25, (96, 64), 44100),
        (Codec("webm", "libvpx-vp9", "libopus", 2), 30, (160, 120), 48000),
        (Codec("mov", "libx264", "aac", 1), 10, (64, 64), 22050),
    ],
)
def test_decode_round_trip_any_container_codec_rate_and_size(codec, fps, size, sr):
    n_frames = 3 * fps
    raw = ramp_clip(n_frames, fps, size[0], size[1], sr, codec)
    clip = decode_sample({"__key__": "k", codec.container: raw, "json": b'{"caption": "x"}'}, SPEC)
    assert clip.video.shape == (8, 3, 56, 56) and str(clip.video.dtype) == "torch.uint8"
    levels = clip.video[:, :, 24:32, 24:32].float().mean(dim=(1, 2, 3)).numpy()  # the middle of the picture
    expected = np.round(200 * np.round(np.linspace(0, n_frames - 1, 8)) / (n_frames - 1))  # uniform frames
    assert np.abs(levels - expected).max() < 6, (levels, expected)
    width, height = size
    if width != height:  # the aspect ratio is kept: black bars on the short side, the picture in between
        bars = clip.video[-1, :, :2] if width > height else clip.video[-1, :, :, :2]
        assert int(bars.max()) < 8 and float(clip.video[-1, :, 26:30, 26:30].float().mean()) > 150
        cropped = decode_sample({"__key__": "k", codec.container: raw}, dataclasses.replace(SPEC, fit="crop"))
        assert cropped.video.shape == (8, 3, 56, 56) and int(cropped.video[-1].min()) > 150  # all picture
    assert clip.audio.shape == (3 * 16000,)  # 16 kHz mono, padded/cut to audio_seconds
    assert abs(clip.audio_len - 3 * 16000) < 0.03 * 3 * 16000
    spectrum = np.abs(np.fft.rfft(clip.audio[: clip.audio_len].numpy()))
    assert abs(np.argmax(spectrum) * 16000 / clip.audio_len - 440) < 5
    assert abs(clip.duration - 3.0) < 0.1
    assert clip.meta == {"caption": "x"}


def test_frame_fit_keeps_what_each_mode_promises_of_a_wide_picture():
    """A 2:1 picture whose left and right eighths are white: letterbox keeps them (bars above and below),
    crop cuts them off (the centre at full height), stretch keeps them and fills the frame."""
    frames = np.full((12, 64, 128, 3), 60, np.uint8)
    frames[:, :, :16] = frames[:, :, -16:] = 250
    raw = encode_clip(frames, None, 12, 16000, Codec("mp4", "libx264", "aac", 1))
    spec = dataclasses.replace(SPEC, need_audio=False)
    fitted = {
        fit: decode_sample({"__key__": "k", "mp4": raw}, dataclasses.replace(spec, fit=fit)).video[0].float()
        for fit in ("letterbox", "crop", "stretch")
    }
    letterbox, crop, stretch = fitted["letterbox"], fitted["crop"], fitted["stretch"]
    assert letterbox[:, :10].max() < 8 and letterbox[:, 20:36, :4].mean() > 230  # bars; the edges kept
    assert crop[:, :, :4].mean() < 80 and crop[:, :4].mean() > 50  # the edges gone; no bars
    assert stretch[:, :, :4].mean() > 230 and stretch[:, :4, 24:32].mean() > 50  # the edges kept; no bars
    assert all(v.shape == (3, 56, 56) for v in fitted.values())


@pytest.mark.parametrize("fit", ["letterbox", "crop", "stretch"])
def test_one_open_per_clip_decodes_what_a_probe_then_open_decodes(fit, monkeypatch):
    """open_video sizes its resize while the decoder opens (no probe open first); the frames must be the
    ones the probing path gives, for wide, tall and square pictures in every container."""
    from vaemo.data import decode

    assert decode._fitted_resize_type() is not None  # the pinned torchcodec has the hook
    spec = dataclasses.replace(SPEC, need_audio=False, fit=fit)
    clips = [
        ramp_clip(24, 12, 128, 72, 16000, Codec("mp4", "libx264", "aac", 1)),
        ramp_clip(30, 30, 72, 128, 16000, Codec("webm", "libvpx-vp9", "libopus", 1)),
        ramp_clip(20, 10, 96, 96, 16000, Codec("mkv", "mpeg4", "libvorbis", 1)),
    ]
    one_open = [decode.decode_video(raw, spec)[0] for raw in clips]
    monkeypatch.setattr(decode, "_fitted_resize_type", lambda: None)
    probed = [decode.decode_video(raw, spec)[0] for raw in clips]
    for a, b in zip(one_open, probed):
        assert a.shape == (8, 3, 56, 56) and torch.equal(a, b)


def test_an_absent_torchvision_is_searched_for_once_per_process_not_once_per_clip():
    """torchcodec imports torchvision whenever a decoder with a resize opens; without torchvision, Python
    searched sys.path for it again on every clip."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed here: there is no failed import to avoid")
    probe = (
        "import sys\n"
        "sys.path.insert(0, 'tests')\n"
        "from test_data_pipeline import Codec, ramp_clip, SPEC\n"
        "from vaemo.data.decode import decode_video\n"
        "raw = ramp_clip(12, 12, 64, 48, 16000, Codec('mp4', 'libx264', 'aac', 1))\n"
        "decode_video(raw, SPEC)\n"
        "searches = []\n"
        "class Count:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        searches.append(name)\n"
        "sys.meta_path.insert(0, Count())\n"
        "for _ in range(3):\n"
        "    assert decode_video(raw, SPEC)[0].shape[0] == SPEC.num_frames\n"
        "print(searches.count('torchvision'), sys.modules.get('torchvision', 'absent'))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["0", "None"]


@pytest.mark.parametrize("fps", [10, 12, 15, 24, 30, 60])
def test_frame_pairs_are_a_fixed_time_apart_whatever_the_frame_rate(fps):
    """The motion a pair shows (an arousal cue) must not depend on the frame rate: pairs are pair_seconds
    apart (to the nearest frame), spread over the same stretch of time."""
    from vaemo.data.decode import frame_indices

    spec = DecodeSpec(num_frames=8, sampling="pairs", pair_seconds=0.1)
    indices = frame_indices(3 * fps, fps, 0.0, 3.0, spec)
    leads, partners = np.array(indices[0::2]) / fps, np.array(indices[1::2]) / fps
    assert np.all(np.abs(partners - leads - 0.1) <= 0.5 / fps + 1e-9), partners - leads
    assert leads[0] == 0.0 and abs(partners[-1] - (3.0 - 1 / fps)) <= 1 / fps  # the whole window
    uniform = np.array(frame_indices(3 * fps, fps, 0.5, 2.0, DecodeSpec(num_frames=8))) / fps
    assert uniform[0] <= 0.5 < uniform[0] + 1 / fps  # the frame on screen at the start
    assert 2.5 - 1 / fps - 1e-9 <= uniform[-1] < 2.5  # and the last one before the end


def test_a_webm_whose_header_overestimates_its_frames_still_decodes():
    """WebM headers estimate the frame count from a duration that includes the soundtrack's tail; a clip
    of the tiny preset's world (seed 0, train 628) claims 95 frames and holds 94."""
    from torchcodec.decoders import VideoDecoder

    from vaemo.config import load_config
    from vaemo.data.synth import Ranges, encode_clips, render_clip

    media, meta = render_clip(0, "train", 628, Ranges.of(load_config(ROOT / "configs/tiny.yaml").synth))
    raw = encode_clips([media])[0]
    assert meta["synth"]["container"] == "webm" and len(media.frames) == 94
    assert VideoDecoder(raw, seek_mode="approximate").metadata.num_frames == 95
    spec = DecodeSpec(num_frames=8, height=56, width=56, audio_seconds=3.0, sampling="pairs")
    clip = decode_sample({"__key__": "k", "webm": raw}, spec)  # SkipSample("truncated_clip") before the fix
    assert clip.video.shape == (8, 3, 56, 56) and abs(clip.duration - 94 / meta["synth"]["fps"]) < 0.05


def test_decoded_pairs_at_60_fps_show_a_tenth_of_a_second():
    raw = ramp_clip(180, 60, 64, 64, 16000, Codec())
    spec = DecodeSpec(num_frames=8, height=56, width=56, audio_seconds=3.0, sampling="pairs", pair_seconds=0.1)
    levels = decode_sample({"__key__": "k", "mp4": raw}, spec).video.float().mean(dim=(1, 2, 3)).numpy()
    step = 200 / 179  # grey levels per frame
    assert np.allclose(levels[1::2] - levels[0::2], 6 * step, atol=1.5), levels  # 0.1 s = 6 frames at 60 fps


def ffmpeg_clip(path: Path, args: str) -> bytes:
    """The clip FFmpeg writes to `path` from `args` (split on spaces)."""
    import subprocess

    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", *args.split(), str(path)], check=True, timeout=120)
    return path.read_bytes()


def shown_seconds(video: torch.Tensor) -> np.ndarray:
    """The time each frame of `time_lit_clip` was shown at, read from its brightness."""
    return video.float().mean(dim=(1, 2, 3)).numpy() * 219 / 255 / 40


def time_lit_clip(path: Path, variable_rate: bool) -> bytes:
    """4 s whose brightness gives each frame's time (luma 16 + 40 t); with `variable_rate`, 5 fps for its
    first 2 s and 60 fps after (a header of 60 fps and 130 frames), as an edit of two clips gives."""
    thin = ",select='if(lt(t,2),not(mod(n,12)),1)'" if variable_rate else ""
    video = f"nullsrc=s=64x48:r=60:d=4,geq=lum='16+40*T':cb=128:cr=128{thin},format=yuv420p"
    return ffmpeg_clip(path, f"-f lavfi -i {video} -f lavfi -i sine=r=48000:d=4 -fps_mode vfr -c:v libx264 -c:a aac -shortest")


def test_a_variable_frame_rate_is_sampled_by_time(tmp_path):
    """torchcodec's fast mode maps frame numbers to times through the header's rate: on a clip at 5 then 60
    fps the frames came from the wrong moments (up to 2.15 s of 4) and each pair showed one frame twice."""
    from vaemo.data.decode import open_video

    raw = time_lit_clip(tmp_path / "vfr.mp4", variable_rate=True)
    whole = DecodeSpec(num_frames=8, height=48, width=64, audio_seconds=4.0, fit="stretch")
    assert open_video(raw, whole).by_time
    seconds = shown_seconds(decode_sample({"__key__": "k", "mp4": raw}, whole).video)
    assert seconds[0] < 0.1 and seconds[-1] > 3.5 and np.all(np.diff(seconds) > 0.2), seconds  # spread over the clip
    for key in ("a", "b", "c"):
        spec = dataclasses.replace(whole, audio_seconds=2.0, sampling="pairs", window="random")
        clip = decode_sample({"__key__": key, "mp4": raw}, spec)
        seconds = shown_seconds(clip.video)
        leads, partners = seconds[0::2], seconds[1::2]
        gaps = partners - leads
        assert np.all(gaps > 0.05) and np.all(gaps < 0.25), seconds  # the frame 0.1 s on, at least the next (5 fps: 0.2 s)
        assert leads[-1] - leads[0] > 1.2, seconds  # spread over the 2 s window
    constant = time_lit_clip(tmp_path / "cfr.mp4", variable_rate=False)
    assert not open_video(constant, whole).by_time  # a constant rate keeps the fast path


def test_a_soundtrack_shorter_than_its_video_is_filled_not_called_truncated(tmp_path):
    """A 3 s video with 1 s of sound is a whole file (its header says so): the window is filled; a file cut
    in half, whose header promises more sound than it holds, is still a truncated clip."""
    video = "-f lavfi -i testsrc2=s=160x120:d=3"
    raw = ffmpeg_clip(tmp_path / "short-sound.mp4", f"{video} -f lavfi -i sine=r=48000:d=1 -c:v libx264 -c:a aac")
    spec = DecodeSpec(num_frames=8, height=56, width=56, audio_seconds=2.0, window="middle")
    clip = decode_sample({"__key__": "k", "mp4": raw}, spec)
    assert clip.audio.shape == (32000,) and 0.4 * 16000 < clip.audio_len < 0.6 * 16000  # 0.5-1.0 s of the window
    assert float(clip.audio.abs().mean()) > 0.05  # repeated, not silent
    late = decode_sample({"__key__": "k", "mp4": raw}, dataclasses.replace(spec, audio_seconds=1.0))  # window 1-2 s
    assert late.audio_len < 0.1 * 16000 and late.video.shape[0] == 8  # the sound was over: a silent window, not a skip
    whole = ffmpeg_clip(
        tmp_path / "whole.mp4", f"{video} -f lavfi -i sine=r=48000:d=3 -c:v libx264 -c:a aac -movflags +faststart"
    )
    with pytest.raises(SkipSample) as cut:
        decode_sample({"__key__": "k", "mp4": whole[: len(whole) // 2]}, spec)
    assert cut.value.reason == "truncated_clip"


def test_a_soundtrack_with_nan_samples_is_skipped_not_fed_to_the_model(tmp_path):
    """Float PCM (mkv, mov, wav) can carry NaN and inf, and FFmpeg passes them through: one such clip's NaN
    loss would write NaN into the weights, and into every checkpoint after it."""
    pcm = (0.1 * np.sin(np.arange(32000) * 0.05)).astype("<f4")
    pcm[1000:1010] = np.nan
    pcm[2000] = np.inf
    (tmp_path / "nan.f32").write_bytes(pcm.tobytes())
    video = "-f lavfi -i testsrc2=s=160x120:d=2"
    raw = ffmpeg_clip(
        tmp_path / "nan.mkv", f"{video} -f f32le -ar 16000 -ac 1 -i {tmp_path / 'nan.f32'} -c:v libx264 -c:a pcm_f32le"
    )
    spec = DecodeSpec(num_frames=8, height=56, width=56, audio_seconds=2.0, window="middle")
    with pytest.raises(SkipSample) as bad:
        decode_sample({"__key__": "k", "mkv": raw}, spec)
    assert bad.value.reason == "non_finite_audio"
    pcm[~np.isfinite(pcm)] = 0.0  # the same clip, finite: decoded
    (tmp_path / "nan.f32").write_bytes(pcm.tobytes())
    fine = ffmpeg_clip(
        tmp_path / "fine.mkv", f"{video} -f f32le -ar 16000 -ac 1 -i {tmp_path / 'nan.f32'} -c:v libx264 -c:a pcm_f32le"
    )
    assert torch.isfinite(decode_sample({"__key__": "k", "mkv": fine}, spec).audio).all()


def test_a_stereo_soundtrack_in_antiphase_is_heard_not_mixed_to_silence(tmp_path):
    """One channel wired with its polarity flipped cancels the other in a mono mix: the loudest channel is
    read instead. A soundtrack that is silent stays silent, and ordinary stereo keeps its mix."""
    from torchcodec.decoders import AudioDecoder

    spec = DecodeSpec(num_frames=2, height=48, width=64, audio_seconds=2.0)
    heard = {}
    cases = [("antiphase", "c1=-1*c0"), ("partly", "c1=-0.9*c0"), ("inphase", "c1=c0"), ("silent", "c0=0*c0|c1=0*c0")]
    cases.append(("loud", "c0=6*c0|c1=-5.4*c0"))  # rms 0.53 and 0.48: a mix of 0.027, 26 dB down
    for name, pan in cases:
        pan = pan if "c0=" in pan else f"c0=c0|{pan}"
        raw = ffmpeg_clip(
            tmp_path / f"{name}.mp4",
            f"-f lavfi -i testsrc=s=64x48:r=10:d=2 -f lavfi -i sine=f=440:r=44100:d=2 -af pan=stereo|{pan} "
            "-c:v libx264 -c:a aac -shortest",
        )
        clip = decode_sample({"__key__": name, "mp4": raw}, spec)
        heard[name] = float(clip.audio.pow(2).mean().sqrt())
        if name == "inphase":
            mix = AudioDecoder(raw, sample_rate=16000, num_channels=1).get_all_samples().data[0][: clip.audio_len]
            assert torch.equal(clip.audio[: clip.audio_len], mix)
    assert min(heard[name] for name in ("antiphase", "partly", "loud", "inphase")) > 0.05 and heard["silent"] == 0.0, heard


def test_a_picture_or_a_soundtrack_alone_is_media_a_benchmark_item_may_name(tmp_path):
    """Artworks are often a painting or a piece of music, not a clip: a picture is shown as a clip whose
    frames are all the same (torchcodec's fast mode could not open it: no timestamps), a sound file is
    heard; each asked for the stream it lacks is skipped for that reason."""
    from vaemo.eval.scoring import decode_clip

    spec = DecodeSpec(num_frames=4, height=48, width=64, audio_seconds=2.0, sampling="pairs", pair_seconds=0.1)
    for name in ("painting.jpg", "painting.png"):
        ffmpeg_clip(tmp_path / name, "-f lavfi -i testsrc=s=160x120:d=1 -frames:v 1")
        frames, _, _ = decode_clip(tmp_path / name, spec, video=True, audio=False)
        assert frames.shape == (4, 3, 48, 64) and frames.float().std() > 20 and all(torch.equal(frames[0], f) for f in frames)
        with pytest.raises(SkipSample, match="no_audio_stream"):
            decode_clip(tmp_path / name, spec, video=True, audio=True)
    cover = f"-i {tmp_path / 'painting.jpg'} -map 0 -map 1 -c:v mjpeg -disposition:v attached_pic"
    for name, extra in (("music.mp3", ""), ("with-cover-art.mp3", cover)):  # a library's songs carry their covers
        ffmpeg_clip(tmp_path / name, f"-f lavfi -i sine=f=440:r=44100:d=3 {extra}".strip())
        _, sound, _ = decode_clip(tmp_path / name, spec, video=False, audio=True)
        assert sound.shape == (32000,) and sound.abs().mean() > 0.02
        with pytest.raises(SkipSample, match="no_video_stream"):  # not truncated_clip: there is no video to see
            decode_clip(tmp_path / name, spec, video=True, audio=False)


@pytest.mark.parametrize("codec", [Codec("mp4", "libx264", "aac", 1), Codec("webm", "libvpx-vp9", "libopus", 2)])
def test_a_clip_shorter_than_the_window_is_repeated_or_followed_by_silence(codec):
    """A 1.25 s clip in a 3 s window: `repeat` plays it again from its start, `silence` leaves a silent tail
    (whose log-mel would carry the clip's loudness; see data.audio_fill)."""
    raw = ramp_clip(15, 12, 64, 64, 44100, codec, freq=300.0)
    repeated = decode_sample({"__key__": "k", codec.container: raw}, SPEC)  # the default fill
    silent = decode_sample({"__key__": "k", codec.container: raw}, dataclasses.replace(SPEC, audio_fill="silence"))
    n = repeated.audio_len
    assert abs(n - 1.25 * 16000) < 0.05 * 16000 and silent.audio_len == n
    assert torch.equal(repeated.audio[:n], silent.audio[:n])
    assert torch.equal(repeated.audio[n : 2 * n], repeated.audio[:n])  # the clip again, from its first sample
    assert torch.equal(repeated.audio[2 * n :], repeated.audio[: 3 * 16000 - 2 * n])
    assert float(silent.audio[n:].abs().max()) == 0.0
    assert float(repeated.audio[2 * n :].abs().mean()) > 0.1


def test_training_starts_a_short_soundtrack_at_a_phase_drawn_from_the_clip_key():
    """A window cut from a longer clip starts anywhere in a note; training shows short clips that way too: the
    clip's own samples rotated by a key-drawn offset, then repeated. Evaluation keeps the clip's start."""
    raw = ramp_clip(15, 12, 64, 64, 16000, Codec(), freq=300.0)
    spec = dataclasses.replace(SPEC, audio_phase="random")
    start = decode_sample({"__key__": "k", "mp4": raw}, SPEC)
    phased = [decode_sample({"__key__": key, "mp4": raw}, spec) for key in ("k", "k", "other")]
    n = start.audio_len
    assert torch.equal(phased[0].audio, phased[1].audio)  # a resumed run draws the same phase
    assert not torch.equal(phased[0].audio, phased[2].audio)
    for clip in phased:
        assert clip.audio_len == n and not torch.equal(clip.audio, start.audio)
        shift = next(s for s in range(n) if torch.equal(start.audio[:n].roll(-s), clip.audio[:n]))
        assert 0 < shift < n
        assert torch.equal(clip.audio[n : 2 * n], clip.audio[:n])  # then repeated as before
    silent = decode_sample({"__key__": "k", "mp4": raw}, dataclasses.replace(spec, audio_fill="silence"))
    assert torch.equal(silent.audio[:n], start.audio[:n])  # a silent tail keeps the clip's length and start


def test_a_clip_longer_than_the_window_gives_frames_and_audio_of_one_window():
    """8 s clip, 3 s window: evaluation takes the middle 3 s, training a window drawn per clip key; frames
    and audio come from the same stretch."""
    fps, seconds = 12, 8
    raw = ramp_clip(seconds * fps, fps, 64, 64, 16000, Codec())
    middle = decode_sample({"__key__": "k", "mp4": raw}, SPEC)
    assert abs(middle.duration - 3.0) < 0.01 and middle.audio_len == 3 * 16000
    levels = middle.video.float().mean(dim=(1, 2, 3)).numpy()
    first_frame, last_frame = 2.5 * fps, 5.5 * fps  # the window [2.5 s, 5.5 s)
    assert 200 * (first_frame - 1) / 95 <= levels[0] <= 200 * (first_frame + 1) / 95, levels
    assert 200 * (last_frame - 2) / 95 <= levels[-1] <= 200 * (last_frame + 1) / 95, levels
    shuffled = dataclasses.replace(SPEC, window="random")
    starts = {
        key: float(decode_sample({"__key__": key, "mp4": raw}, shuffled).video[0].float().mean()) for key in ("a", "b", "c", "d")
    }
    assert len({round(v) for v in starts.values()}) > 1  # windows differ between clips
    again = decode_sample({"__key__": "a", "mp4": raw}, shuffled)
    assert float(again.video[0].float().mean()) == starts["a"]  # and not between visits (exact resume)


def bad_shard(path: Path) -> tuple[list[str], dict[str, int]]:
    """A shard mixing good samples with one of each kind of bad sample; returns good keys and expected skips."""
    good = ramp_clip(24, 12, 64, 64, 16000, Codec())
    no_audio = encode_clip(np.zeros((24, 64, 64, 3), np.uint8), None, 12, 16000)
    no_video = encode_clip(None, np.zeros(32000, np.float32), 12, 16000)
    samples = [
        {"__key__": "good-0", "mp4": good, "json": b"{}"},
        {"__key__": "truncated", "mp4": good[: len(good) // 2], "json": b"{}"},
        {"__key__": "empty", "mp4": b"", "json": b"{}"},
        {"__key__": "good-1", "mp4": good},  # JSON is optional
        {"__key__": "noaudio", "mp4": no_audio, "json": b"{}"},
        {"__key__": "novideo", "mp4": no_video, "json": b"{}"},
        {"__key__": "badjson", "mp4": good, "json": b"{not json"},
        {"__key__": "avi", "avi": good, "json": b"{}"},
        {"__key__": "jsononly", "json": b'{"caption": "lonely"}'},
        {"__key__": "good-2", "mkv": ramp_clip(24, 12, 64, 64, 16000, Codec("mkv")), "json": b"{}"},
    ]
    with wds.TarWriter(str(path), encoder=False) as sink:
        for s in samples:
            sink.write(s)
    expected = {
        "truncated_clip": 1,
        "empty_clip": 1,
        "no_audio_stream": 1,
        "no_video_stream": 1,
        "bad_json": 1,
        "unknown_extension": 1,
        "missing_clip": 1,
    }
    return ["good-0", "good-1", "good-2"], expected


def test_bad_samples_are_skipped_and_counted_by_reason_and_the_stream_goes_on(tmp_path):
    shard = tmp_path / "bad.tar"
    good_keys, expected = bad_shard(shard)
    batches = list(make_loader(EvalStream([str(shard)], SPEC, batch_size=2), workers=0))
    keys = [k for b in batches for k in b.keys]
    assert keys == good_keys
    assert batches[-1].skips == expected

    inspected = cli("data", "inspect", str(shard), "--json")
    assert inspected.returncode == 0, inspected.stderr
    report = json.loads(inspected.stdout.strip().splitlines()[-1])
    assert report["samples"] == 10
    assert report["ok"] == 5  # the 3 good ones plus the two single-stream clips
    assert report["skipped"] == {k: v for k, v in expected.items() if k not in ("no_audio_stream", "no_video_stream")}


def test_a_sample_lacking_a_needed_field_is_skipped(tmp_path):
    raw = ramp_clip(24, 12, 64, 64, 16000, Codec())
    spec = DecodeSpec(num_frames=2, height=28, width=28, need_fields=("caption", "valence"))
    with pytest.raises(SkipSample) as missing:
        decode_sample({"__key__": "a", "mp4": raw, "json": b'{"caption": "c"}'}, spec)
    assert missing.value.reason == "missing_field"
    with pytest.raises(SkipSample) as bad:
        decode_sample({"__key__": "a", "mp4": raw, "json": b'{"caption": "c", "valence": 3}'}, spec)
    assert bad.value.reason == "va_out_of_range"
    assert decode_sample({"__key__": "a", "mp4": raw, "json": b'{"caption": "c", "valence": 0.5}'}, spec).key == "a"
    rated = decode_sample({"__key__": "a", "mp4": raw, "json": b'{"caption": "c", "valence": 7, "va_scale": [1, 9]}'}, spec)
    assert rated.meta["valence"] == pytest.approx(0.5)  # a declared 1-9 scale is rescaled to [-1, 1]
    emotional = DecodeSpec(num_frames=2, height=28, width=28, need_fields=("emotion",), emotions=("joy", "calm"))
    with pytest.raises(SkipSample) as unknown:
        decode_sample({"__key__": "a", "mp4": raw, "json": b'{"emotion": "awe"}'}, emotional)
    assert unknown.value.reason == "unknown_emotion"


def test_a_shard_that_fails_with_an_io_error_is_tried_again_and_a_missing_one_is_not(small_world, monkeypatch):
    """Shared storage that drops out for a moment (EIO) costs a shard nothing; a missing file, and a `pipe:`
    command that failed (an object that does not exist fails again), are not waited on."""
    import errno

    import webdataset

    from vaemo.data.tars import ShardError, read_shard

    url = expand_shards(str(small_world / "val" / "*.tar"))[0]
    real_gopen, calls, failures = webdataset.gopen, [], [2]

    def flaky(path, mode="rb", **kwargs):
        calls.append(path)
        if failures[0] > 0:
            failures[0] -= 1
            raise OSError(errno.EIO, "Input/output error", path)
        return real_gopen(path, mode, **kwargs)

    monkeypatch.setattr(webdataset, "gopen", flaky)
    samples = list(read_shard(url, retry_delays=(0.0, 0.0)))
    assert len(calls) == 3 and len(samples) == 12 and not any(isinstance(s, ShardError) for s in samples)
    calls.clear()
    failures[0] = 2
    assert isinstance(list(read_shard(url, retry_delays=(0.0,)))[-1], ShardError) and len(calls) == 2  # out of tries
    for permanent in (url + ".missing", f"pipe:cat {url}.missing"):
        calls.clear()
        gone = list(read_shard(permanent, retry_delays=(0.0, 0.0)))
        assert len(calls) == 1 and len(gone) == 1 and isinstance(gone[0], ShardError), (permanent, calls, gone)


def test_shards_unreadable_after_a_good_read_stop_the_stream_for_rays_restart_not_as_bad_data(small_world, monkeypatch):
    """Never read: the data (NoUsableData, the user's to fix: exit 2, no retry). Read, then unreadable (in this
    start, or before a resume): the storage, which a restart of the workers from the newest checkpoint may
    find back. A stream retries its shards; stopped, the run's error names this one."""
    from vaemo.data import stream as stream_module
    from vaemo.data.stream import SHARD_RETRY_DELAYS, NoUsableData, ShardsUnreadableError
    from vaemo.data.tars import ShardError, read_shard
    from vaemo.train.launch import first_line

    urls = expand_shards(str(small_world / "val" / "*.tar"))
    spec = DecodeSpec(num_frames=2, height=28, width=28, need_audio=False)
    reads = []

    def storage_gone_after_first_read(url, retry_delays=(), lazy=False):
        reads.append(retry_delays)
        if len(reads) == 1:
            yield from read_shard(url)
        else:
            yield ShardError(url, "OSError: [Errno 5] Input/output error")

    def drain(stream: TrainStream) -> None:
        collections.deque(stream.raw_samples(0, 1), maxlen=0)  # every sample, until the stream raises

    monkeypatch.setattr(stream_module, "read_shard", storage_gone_after_first_read)
    with pytest.raises(ShardsUnreadableError, match="could not be read, though it had read samples before") as gone:
        drain(TrainStream(urls, spec, 4, seed=0, shuffle_buffer=1, in_order=True))
    assert reads[0] == SHARD_RETRY_DELAYS and not issubclass(ShardsUnreadableError, UserError)
    raised = f"vaemo.data.stream.{gone.type.__name__}: {gone.value}"
    ray_report = f"Training failed due to worker errors:\nTraceback (most recent call last):\n  ...\n{raised}"
    assert first_line(Exception(ray_report)).endswith(f"ShardsUnreadableError: {gone.value}")  # not Ray's header line
    never = lambda url, retry_delays=(), lazy=False: iter([ShardError(url, "OSError: gone")])  # noqa: E731
    monkeypatch.setattr(stream_module, "read_shard", never)
    with pytest.raises(NoUsableData):
        drain(TrainStream(urls, spec, 4, seed=0, shuffle_buffer=1, in_order=True))
    resumed = StreamState(num_workers=1, positions={0: 5})
    with pytest.raises(ShardsUnreadableError):
        drain(TrainStream(urls, spec, 4, seed=0, shuffle_buffer=1, in_order=True, resume=resumed))
    monkeypatch.setattr(stream_module, "STORAGE_WAIT_S", -1.0)  # minutes of an outage: stopped before 4 x shards
    reads.clear()
    monkeypatch.setattr(stream_module, "read_shard", storage_gone_after_first_read)
    with pytest.raises(ShardsUnreadableError, match="the last 1 shards"):
        drain(TrainStream(urls, spec, 4, seed=0, shuffle_buffer=1, in_order=True))


@pytest.mark.parametrize("split", ["train", "val"])  # 4 shards: split by shard; 2 shards: split by sample
def test_evaluation_sees_every_sample_exactly_once_across_2_ranks_x_2_workers(small_world, split):
    urls = expand_shards(str(small_world / split / "*.tar"))
    spec = DecodeSpec(num_frames=2, height=28, width=28, need_audio=False)
    seen = Counter()
    for rank in range(2):
        for batch in make_loader(EvalStream(urls, spec, batch_size=5, rank=rank, world_size=2), workers=2):
            seen.update(batch.keys)
    total = 48 if split == "train" else 16
    assert len(seen) == total and set(seen.values()) == {1}


def test_training_stream_is_deterministic_per_seed_disjoint_per_rank_and_resumes_exactly(small_world):
    urls = expand_shards(str(small_world / "train" / "*.tar"))
    spec = DecodeSpec(num_frames=2, height=28, width=28, need_audio=False)

    def keys(seed, rank=0, state=None, n=8):
        stream = TrainStream(urls, spec, 3, seed=seed, rank=rank, world_size=2, shuffle_buffer=8, resume=state)
        return [b for b in itertools.islice(iter(make_loader(stream, workers=2)), n)]

    first, again, other = keys(1), keys(1), keys(2)
    assert [b.keys for b in first] == [b.keys for b in again]
    assert [b.keys for b in first] != [b.keys for b in other]
    assert [b.worker for b in first] == [0, 1] * 4  # batches alternate over loader workers, in order

    state = StreamState(num_workers=2)
    for batch in first[:5]:
        state.update(batch)
    resumed = keys(1, state=StreamState.from_state_dict(state.state_dict(), 2), n=3)
    assert [b.keys for b in resumed] == [b.keys for b in first[5:8]]
    assert [b.worker for b in resumed] == [1, 0, 1]  # the round robin continues where it stopped

    rank0 = {url for w in range(2) for url in train_shard_subset(urls, 0, 2, w, 2)}
    rank1 = {url for w in range(2) for url in train_shard_subset(urls, 1, 2, w, 2)}
    assert rank0.isdisjoint(rank1) and rank0 | rank1 == set(urls)
    from_rank1 = {k for b in keys(1, rank=1) for k in b.keys}
    shard_of = {}
    for url in urls:
        for sample in wds.WebDataset(url, shardshuffle=False):
            shard_of[sample["__key__"]] = url
    assert {shard_of[k] for k in from_rank1} <= rank1


def single_stream_batches(urls: list[str], n: int, state: StreamState | None = None, shuffle_buffer: int = 4, **kwargs) -> list:
    """The first n batches (3 small clips each) of seed 1's one-rank training stream, decoded in this process."""
    spec = DecodeSpec(num_frames=2, height=28, width=28, need_audio=False)
    stream = TrainStream(urls, spec, 3, seed=1, shuffle_buffer=shuffle_buffer, resume=state, **kwargs)
    return list(itertools.islice(iter(make_loader(stream, workers=0)), n))


def state_after(batches: list) -> StreamState:
    """What a one-worker consumer's StreamState holds after taking `batches`."""
    state = StreamState(num_workers=1)
    for batch in batches:
        state.update(batch)
    return state


@pytest.mark.parametrize("recorded", [True, False], ids=["draws-recorded", "checkpoint-without-the-record"])
def test_a_resumed_stream_reads_again_only_the_clips_its_shuffle_buffer_still_holds(small_world, monkeypatch, recorded):
    """A resume reads the clips its shuffle buffer held, not those drawn before it (at step 20k of a 7B run that
    was some 80k clips a rank, read again from shared storage), and gives the same batches, bit for bit, as the
    stream that ran straight on: from the draws' record, or, from a checkpoint without it, by passing over the
    samples drawn before reading the local shards' headers."""
    from vaemo.data import tars

    urls = expand_shards(str(small_world / "train" / "*.tar"))
    clip_reads = []
    real_read_exact = tars._read_exact

    def counted(stream, n):  # a clip is kilobytes; a header 512 bytes, a JSON file less
        if n > 1000:
            clip_reads.append(n)
        return real_read_exact(stream, n)

    monkeypatch.setattr(tars, "_read_exact", counted)

    straight = single_stream_batches(urls, 18)
    state = state_after(straight[:15])
    largest_shard = max(tars.count_samples(url) for url in urls)
    clip_reads.clear()
    saved = state.state_dict()
    if not recorded:
        del saved["draw_counts"]
    resumed = single_stream_batches(urls, 3, StreamState.from_state_dict(saved, 1))
    assert [b.keys for b in resumed] == [b.keys for b in straight[15:]]
    assert all(torch.equal(a.video, b.video) for a, b in zip(resumed, straight[15:]))
    # 9 clips decoded, the 4 the buffer held, and what a shard drawn after the resume put in it; not the 45 passed
    # over
    assert len(clip_reads) <= 9 + 4 + largest_shard < 45, (len(clip_reads), largest_shard)


def test_a_resume_reads_only_the_shards_its_shuffle_buffer_and_its_current_draw_need_streamed_ones_too(
    small_world, tmp_path, monkeypatch
):
    """Streamed shards (`pipe:`, URLs, gzip) cannot be read for their headers alone: a resume that replayed
    every draw before it would download the run's whole history again (hours, late in a week-long run). The
    stream records how many samples each draw gave; a resume works out its place from that and opens only the
    shards its shuffle buffer held samples of, plus the draw in progress. The batches are those of the stream
    that ran straight on, bit for bit, through a checkpoint's round trip; a checkpoint without the record (from
    before it was kept) still resumes exactly, by reading, and records it again from there. A resume with another
    shuffle buffer draws otherwise: the record is not of its draws, so it reads them (no sample taken for gone)."""
    from vaemo.data import stream as stream_module

    urls = [f"pipe:cat {url}" for url in expand_shards(str(small_world / "train" / "*.tar"))]
    opened = []
    real_read_shard = stream_module.read_shard

    def counted(url, retry_delays=(), lazy=False):
        opened.append(url)
        return real_read_shard(url, retry_delays, lazy=lazy)

    monkeypatch.setattr(stream_module, "read_shard", counted)

    def checkpointed(state: StreamState) -> StreamState:
        torch.save(state.state_dict(), tmp_path / "state.pt")
        return StreamState.from_state_dict(torch.load(tmp_path / "state.pt", weights_only=True), 1)

    straight = single_stream_batches(urls, 44)
    state = state_after(straight[:40])
    draws_before = len(state.draw_counts[0])
    assert draws_before >= 9 and sum(state.draw_counts[0]) <= state.positions[0] + 4, state.draw_counts  # the buffer's 4

    opened.clear()
    resumed = single_stream_batches(urls, 4, checkpointed(state))
    assert [b.keys for b in resumed] == [b.keys for b in straight[40:]]
    assert all(torch.equal(a.video, b.video) for a, b in zip(resumed, straight[40:]))
    # the buffer's 4 samples come from at most 4 shards; then the draw in progress, and what 12 more samples draw
    assert len(opened) <= 4 + 1 + 2 < draws_before, (opened, draws_before)

    old = state.state_dict()
    del old["draw_counts"]
    opened.clear()
    replayed = single_stream_batches(urls, 4, StreamState.from_state_dict(old, 1))
    assert [b.keys for b in replayed] == [b.keys for b in straight[40:]]
    assert len(opened) > draws_before  # every draw again, read whole
    recorded = StreamState.from_state_dict(old, 1)
    for batch in replayed[:2]:
        recorded.update(batch)
    assert recorded.draw_counts[0] == state.draw_counts[0] + recorded.draw_counts[0][draws_before:]
    assert [b.keys for b in single_stream_batches(urls, 2, checkpointed(recorded))] == [b.keys for b in straight[42:44]]

    opened.clear()
    other = single_stream_batches(urls, 2, checkpointed(state), shuffle_buffer=6)
    assert len(opened) > draws_before and "unreadable_shard" not in other[-1].skips, (opened, other[-1].skips)


@pytest.mark.parametrize("in_order", [False, True], ids=["drawn", "in-order"])
def test_a_resume_from_the_record_is_exact_over_unreadable_and_damaged_shards(small_world, tmp_path, in_order):
    """Draws that gave nothing (a file that is not a tar) or stopped partway (a tar cut short) are in the record
    as what they gave; a resume from it goes on exactly as the stream that ran straight on, counts included."""
    import shutil

    for url in expand_shards(str(small_world / "train" / "*.tar")):
        shutil.copy(url, tmp_path)
    damaged = tmp_path / "train-000001.tar"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    (tmp_path / "train-000002.tar").write_bytes(b"not a tar file" * 100)
    urls = expand_shards(str(tmp_path / "*.tar"))
    straight = single_stream_batches(urls, 24, in_order=in_order)
    state = state_after(straight[:16])
    assert 0 in state.draw_counts[0] and state.skips()["unreadable_shard"] >= 2, (state.draw_counts, state.skips())
    resumed = single_stream_batches(urls, 8, StreamState.from_state_dict(state.state_dict(), 1), in_order=in_order)
    assert [b.keys for b in resumed] == [b.keys for b in straight[16:]]
    assert (
        resumed[-1].skips["unreadable_shard"] == straight[-1].skips["unreadable_shard"] - straight[15].skips["unreadable_shard"]
    )


def test_a_broken_record_of_draws_is_dropped_for_good_not_restarted_midway():
    """A gap in what a stream reported (it cannot happen; should it) must not leave a record that a resume would
    take for one from the first draw."""
    from vaemo.data.stream import Batch

    def batch(position: int, ended: list[tuple[int, int]]) -> Batch:
        return Batch([], None, None, [], [], [], worker=0, position=position, ended_draws=ended, draws_of="abc")

    state = StreamState(num_workers=1)
    state.update(batch(3, [(0, 12)]))
    assert state.draw_counts == {0: [12]} and state.draws_of == {0: "abc"}
    state.update(batch(6, [(2, 12)]))
    state.update(batch(9, []))
    state.update(batch(12, [(0, 12)]))
    assert 0 not in state.draw_counts and state.draws_of[0] == ""
    again = StreamState.from_state_dict(state.state_dict(), 1)
    assert again.draws_of == {0: ""} and not TrainStream(["/a.tar"], DecodeSpec(), 2, seed=0, resume=again).start_draws


def test_a_resume_goes_on_without_a_sample_its_shard_no_longer_holds(small_world, tmp_path):
    """A shard rewritten shorter between a checkpoint and its resume: the samples of it the shuffle buffer held
    and that are gone are counted as `unreadable_shard`, and the stream goes on."""
    import shutil

    from vaemo.data.stream import replay_draws

    for url in expand_shards(str(small_world / "train" / "*.tar")):
        shutil.copy(url, tmp_path)
    urls = expand_shards(str(tmp_path / "*.tar"))
    state = state_after(single_stream_batches(urls, 10))
    rng = np.random.default_rng([1, 0, 0])  # (seed, rank, stream)
    point = replay_draws(train_shard_subset(urls, 0, 1, 0, 1), rng, False, 4, state.draw_counts[0], state.positions[0])
    shard, _ = Counter(point.urls[draw] for draw, _ in point.buffer).most_common(1)[0]
    first = next(iter(wds.WebDataset(shard, shardshuffle=False)))
    with wds.TarWriter(shard) as rewritten:  # the same shard, one sample long
        rewritten.write({k: v for k, v in first.items() if k != "__url__"})
    resumed = single_stream_batches(urls, 2, StreamState.from_state_dict(state.state_dict(), 1))
    assert len(resumed) == 2 and resumed[-1].skips.get("unreadable_shard", 0) >= 1, resumed[-1].skips


def test_a_sample_read_lazily_decodes_as_read_at_once_and_meets_storage_errors_as_a_stream_would(
    small_world, tmp_path, monkeypatch
):
    """A shard written again since its headers were read is not read at the old offsets (a skip); an I/O
    error of the storage stops the stream (for Ray's restart) instead of counting as a bad clip."""
    import errno
    import os
    import shutil

    from vaemo.data.tars import LazyBytes, read_shard

    shard = tmp_path / "val.tar"
    shutil.copy(expand_shards(str(small_world / "val" / "*.tar"))[0], shard)
    spec = DecodeSpec(num_frames=2, height=28, width=28, need_audio=False)
    lazy, eager = list(read_shard(str(shard), lazy=True)), list(read_shard(str(shard)))
    clip = next(ext for ext in lazy[0] if not ext.startswith("__") and ext != "json")
    assert isinstance(lazy[0][clip], LazyBytes) and isinstance(eager[0][clip], bytes)
    assert torch.equal(decode_sample(lazy[0], spec).video, decode_sample(eager[0], spec).video)
    (tmp_path / "again.tar").write_bytes(shard.read_bytes())
    os.replace(tmp_path / "again.tar", shard)  # packed again: the same bytes, another file
    with pytest.raises(SkipSample, match="unreadable_shard: the shard was written again"):
        decode_sample(lazy[1], spec)

    def storage_down(self):
        raise OSError(errno.EIO, "Input/output error", self.path)

    monkeypatch.setattr(LazyBytes, "read", storage_down)
    with pytest.raises(OSError, match="Input/output error"):
        decode_sample(lazy[2], spec)


def test_validation_reads_its_shards_in_order_every_clip_once_before_any_again(small_world, tmp_path, capsys):
    """Drawn at random, validation's shards could repeat one and leave out another; in order, a split of 16 clips
    read as 32 gives each clip twice. A report that reads more than a worker's shards hold is said before training."""
    from vaemo.config import load_config
    from vaemo.data.tars import count_samples
    from vaemo.train.launch import warn_if_validation_repeats

    urls = expand_shards(str(small_world / "val" / "*.tar"))
    spec = DecodeSpec(num_frames=2, height=28, width=28, need_audio=False)
    stream = TrainStream(urls, spec, 4, seed=3, shuffle_buffer=1, in_order=True)
    keys = [k for batch in itertools.islice(iter(make_loader(stream, 0)), 8) for k in batch.keys]
    in_shards = [sample["__key__"] for url in urls for sample in wds.WebDataset(url, shardshuffle=False)]
    assert len(in_shards) == 16 and keys == in_shards * 2

    assert [count_samples(url) for url in urls] == [12, 4]
    (tmp_path / "cut.tar").write_bytes(Path(urls[0]).read_bytes()[:700])
    (tmp_path / "zipped.tar").write_bytes(__import__("gzip").compress(Path(urls[0]).read_bytes()))
    assert [count_samples(str(tmp_path / n)) for n in ("cut.tar", "zipped.tar", "absent.tar")] == [None] * 3

    def warned(*overrides: str) -> str:
        cfg = load_config(ROOT / "configs/tiny.yaml", [f"data.val_shards={small_world}/val/*.tar", *overrides], stage=2)
        capsys.readouterr()
        warn_if_validation_repeats(cfg, urls)
        return capsys.readouterr().out

    # 2 workers: one shard each, the smaller of 4 clips
    assert warned("scaling.num_workers=2", "data.batch_size=4", "train.val_batches=1") == ""
    line = warned("scaling.num_workers=2", "data.batch_size=4", "train.val_batches=2")
    assert "hold 4 clips" in line and "= 8 there" in line and "set train.val_batches=1" in line
    assert warned("scaling.num_workers=1", "data.batch_size=4", "train.val_batches=4") == ""


def test_recycled_batch_buffers_give_the_same_batches_and_never_overwrite_an_unreleased_one(small_world):
    """Loader workers reuse a batch's shared memory only after the consumer releases it."""
    urls = expand_shards(str(small_world / "train" / "*.tar"))
    spec = DecodeSpec(num_frames=2, height=28, width=28, audio_seconds=1.0)

    def batches(recycle, release, n=12):
        stream = TrainStream(urls, spec, 3, seed=1, shuffle_buffer=8, recycle_buffers=recycle)
        out = []
        for batch in itertools.islice(iter(make_loader(stream, workers=2, prefetch_batches=1)), n):
            out.append((batch.slot, batch.video.clone(), batch.audio.clone(), batch))  # copies, then the batch itself
            if release:
                stream.release(batch)
        return out

    fresh = batches(0, release=False)
    recycled = batches(3, release=True)
    kept = batches(3, release=False)
    for (_, video, audio, _), (_, r_video, r_audio, _), (_, k_video, k_audio, k_batch) in zip(fresh, recycled, kept):
        assert torch.equal(video, r_video) and torch.equal(audio, r_audio)
        # never released: each batch still holds what it held when it arrived
        assert torch.equal(video, k_video) and torch.equal(k_batch.video, k_video) and torch.equal(k_batch.audio, k_audio)
    assert all(slot is None for slot, *_ in fresh)
    assert [slot for slot, *_ in recycled] == [(w, s % 3) for s in range(6) for w in (0, 1)]  # reused, in turn
    assert [slot for slot, *_ in kept][:6] == [(w, s) for s in range(3) for w in (0, 1)]
    assert all(slot is None for slot, *_ in kept[6:])  # no buffer came back: fresh memory, as without recycling


def test_kept_decoded_clips_give_the_same_batches_and_spare_the_second_epoch_its_decoding(small_world):
    """48 training clips over 2 loader workers: 40 batches of 3 (2.5 epochs) equal with and without kept
    clips; in process, a budget for all of them decodes each clip once, a budget under one clip keeps none."""
    urls = expand_shards(str(small_world / "train" / "*.tar"))
    spec = DecodeSpec(num_frames=2, height=28, width=28, audio_seconds=1.0, audio_phase="random")

    def batches(budget, workers=2):
        stream = TrainStream(urls, spec, 3, seed=1, shuffle_buffer=8, decoded_cache_bytes=budget)
        return [(b.keys, b.video.clone(), b.audio.clone()) for b in itertools.islice(iter(make_loader(stream, workers)), 40)]

    fresh, kept = batches(0), batches(2**30)
    assert [k for k, *_ in fresh] == [k for k, *_ in kept]
    assert all(torch.equal(v, kv) and torch.equal(a, ka) for (_, v, a), (_, kv, ka) in zip(fresh, kept))

    from vaemo.data.stream import DecodedClips, _decode_into_batches
    from vaemo.data.tars import read_shard

    samples = [s for url in urls for s in read_shard(url)]
    for budget, kept_clips in ((2**30, len(samples)), (1000, 0)):
        decoded = DecodedClips(budget)
        twice = list(_decode_into_batches(samples * 2, spec, 4, 0, Counter(), decoded=decoded))
        assert len(decoded.clips) == kept_clips and decoded.hits == kept_clips
        assert decoded.used_bytes <= budget
        half = len(twice) // 2
        assert all(torch.equal(x.video, y.video) and torch.equal(x.audio, y.audio) for x, y in zip(twice[:half], twice[half:]))


def test_a_clip_that_hangs_its_loader_worker_is_passed_over_as_a_bad_clip_would_be(small_world, monkeypatch, capsys, tmp_path):
    """A loader worker stuck on one clip (FFmpeg in an endless loop, here a sleep) is stopped by the rank's
    watchdog, and the batches go on exactly as if that clip were bad: skipped at every draw, the first one
    included. The stream state a checkpoint saves keeps it, so a resume passes over it without stopping a
    worker again. Starting the loader, and again after the stop, draws nothing from the process's torch RNG
    (dropout's), so the training's own random draws stay those of a run without the stop."""
    import time

    from vaemo.data import stream as stream_module
    from vaemo.data.stream import TrainBatches

    urls = expand_shards(str(small_world / "train" / "*.tar"))
    spec = DecodeSpec(num_frames=2, height=28, width=28, need_audio=False)
    real_decode = stream_module.decode_sample

    def run(hang="", bad="", state=None, n=10, limit_s=5.0, on_stop=lambda sample: None):
        def decode(sample, spec):
            if sample["__key__"] == hang:
                time.sleep(3600)
            if sample["__key__"] == bad:
                raise SkipSample("corrupt_clip")
            return real_decode(sample, spec)

        monkeypatch.setattr(stream_module, "decode_sample", decode)  # the loader's workers are forked: they see it
        if state is not None:  # as a checkpoint saves and loads it
            torch.save(state.state_dict(), tmp_path / "state.pt")
            state = StreamState.from_state_dict(torch.load(tmp_path / "state.pt", weights_only=True), 2)
        else:
            state = StreamState(num_workers=2)
        batches = TrainBatches(
            lambda start: TrainStream(urls, spec, 3, seed=1, shuffle_buffer=8, resume=start, recycle_buffers=4),
            state,
            workers=2,
            prefetch_batches=2,
            limit_s=limit_s,
            name="stage 1, rank 0",
            on_stop=on_stop,
        )
        keys = []
        for batch in itertools.islice(batches, n):
            state.update(batch)
            keys.append(batch.keys)
            batches.release(batch)
        batches.close()
        return keys, state

    from vaemo.data.tars import read_shard

    real_decode(next(read_shard(urls[0])), spec)  # the workers fork with FFmpeg's libraries loaded: no slow first clip
    plain, _ = run(n=20)
    later = [k for keys in plain[10:] for k in keys]
    hang = next(k for keys in plain[2:10] for k in keys if k in later)  # drawn in both halves
    as_bad, bad_state = run(bad=hang)
    started = time.monotonic()
    noted = []
    training_rng = torch.get_rng_state()
    stopped, state = run(hang=hang, on_stop=noted.append)
    assert torch.equal(torch.get_rng_state(), training_rng)
    assert stopped == as_bad and hang not in {k for keys in stopped for k in keys}
    assert state.skips()["decoder_hang"] == bad_state.skips()["corrupt_clip"] >= 1
    assert time.monotonic() - started < 120  # the sleep would take an hour
    assert [entry[2] for entry in state.passed_over] == [hang]
    assert [sample.key for sample in noted] == [hang]  # told at once: the trainer notes it in the run folder
    import re

    assert re.search(rf"spent \d+ s on the clip {hang} of .*decoder_hang", capsys.readouterr().err)

    # A resume from the state a checkpoint would save passes over the clip at its later draws, stopping nothing.
    resumed, resumed_state = run(hang=hang, state=state, limit_s=600.0)
    as_bad_resumed, bad_resumed_state = run(bad=hang, state=bad_state)
    assert resumed == as_bad_resumed and hang not in {k for keys in resumed for k in keys}
    drawn_again = bad_resumed_state.skips()["corrupt_clip"] - bad_state.skips()["corrupt_clip"]
    assert drawn_again >= 1 and resumed_state.skips()["decoder_hang"] - state.skips()["decoder_hang"] == drawn_again
    assert len(resumed_state.passed_over) == 1


def test_a_restart_from_a_checkpoint_saved_before_a_stop_passes_over_the_clip_the_run_folder_noted(tmp_path):
    """Should the other ranks' collectives time out while a rank replays its stream, Ray restarts every rank
    from a checkpoint that predates the stop: each then reads the run folder's notes (a rank's own positions
    only, as positions are its streams')."""
    from vaemo.data.watchdog import UNNAMED, StuckSample
    from vaemo.train.trainer import note_decoder_hang, noted_decoder_hangs

    note_decoder_hang(tmp_path, 0, StuckSample(1, 40, "clip-9", "/data/a.tar", 301.0))
    note_decoder_hang(tmp_path, 1, StuckSample(0, 7, UNNAMED, "/data/very-long", 300.5))
    note_decoder_hang(tmp_path, 1, StuckSample(0, 12, "clip-3", "/data/b.tar", 300.5))
    with open(tmp_path / "decoder_hangs" / "rank1.jsonl", "a") as f:
        f.write('[0, 15, "clip')  # a line cut short by a crash
    assert noted_decoder_hangs(tmp_path, 0) == [(1, 40, "clip-9", "/data/a.tar"), (0, 12, "clip-3", "/data/b.tar")]
    assert noted_decoder_hangs(tmp_path, 1) == [
        (1, 40, "clip-9", "/data/a.tar"),
        (0, 7, UNNAMED, "/data/very-long"),
        (0, 12, "clip-3", "/data/b.tar"),
    ]
    assert noted_decoder_hangs(tmp_path / "elsewhere", 0) == []
    stream = TrainStream(
        ["/data/a.tar"], DecodeSpec(), 2, seed=0, resume=StreamState(2, passed_over=noted_decoder_hangs(tmp_path, 1))
    )
    passes_over = stream.passes_over(0)
    assert passes_over(40, {"__url__": "/data/a.tar", "__key__": "clip-9"})  # by name, whichever stream drew it
    assert passes_over(7, {"__url__": "/data/c.tar", "__key__": "clip-0"})  # by position, in its own stream
    assert not stream.passes_over(1)(7, {"__url__": "/data/c.tar", "__key__": "clip-0"})
    assert not passes_over(40, {"__url__": "/data/b.tar", "__key__": "clip-9"})


def test_a_stream_decoding_in_its_own_process_skips_a_clip_that_hangs_and_gives_up_on_it(small_world, monkeypatch, capsys):
    """Validation, the teacher cache and evaluation decode in the process that uses the clips: a clip still
    decoding after the limit is skipped as a bad clip would be, its thread left behind, and the process
    does not wait on that clip again."""
    import threading

    from vaemo.data import stream as stream_module
    from vaemo.data import watchdog

    urls = expand_shards(str(small_world / "val" / "*.tar"))
    spec = DecodeSpec(num_frames=2, height=28, width=28, need_audio=False)
    real_decode = stream_module.decode_sample
    hang, release = "", threading.Event()

    def run(bad="", limit_s=2.0):
        def decode(sample, spec):
            if sample["__key__"] == hang:
                release.wait()
            if sample["__key__"] == bad:
                raise SkipSample("corrupt_clip")
            return real_decode(sample, spec)

        monkeypatch.setattr(stream_module, "decode_sample", decode)
        stream = TrainStream(urls, spec, 3, seed=1, shuffle_buffer=1, in_order=True, decode_limit_s=limit_s)
        batches = list(itertools.islice(iter(make_loader(stream, 0)), 5))
        return [b.keys for b in batches], batches[-1].skips

    try:
        plain, _ = run()
        as_bad, bad_skips = run(bad=plain[1][0])
        hang = plain[1][0]
        skipped, skips = run()
        assert skipped == as_bad and skips["decoder_hang"] == bad_skips["corrupt_clip"] == 1
        assert (urls[0], hang) in watchdog.GAVE_UP and capsys.readouterr().err.count("still being decoded") == 1
        again, skips = run(limit_s=600.0)  # would wait 10 min if it tried the clip again
        assert again == as_bad and skips["decoder_hang"] == 1 and "still being decoded" not in capsys.readouterr().err
    finally:
        release.set()
        watchdog.GAVE_UP.clear()


def test_the_preflight_and_inspect_pass_over_a_clip_that_hangs_the_decoder(small_world, monkeypatch):
    """The preflight (a stage's first look at its shards) and `vaemo data inspect` read clips in the command's
    own process: one that hangs FFmpeg is counted and passed over, not waited on for good."""
    import threading
    import types

    from vaemo.data import shards as shards_module
    from vaemo.data import stream as stream_module
    from vaemo.data import watchdog
    from vaemo.data.stream import probe_usable
    from vaemo.data.tars import read_shard

    urls = expand_shards(str(small_world / "val" / "*.tar"))
    samples = read_shard(urls[0])
    first = next(samples)["__key__"]
    decode_sample(next(samples), DecodeSpec())  # FFmpeg's libraries loaded: no slow first clip
    release = threading.Event()
    real_decode, real_inspect = stream_module.decode_sample, shards_module.inspect_sample

    def hangs_on_the_first(real):
        return lambda sample, *args: release.wait() if sample["__key__"] == first else real(sample, *args)

    monkeypatch.setattr(stream_module, "decode_sample", hangs_on_the_first(real_decode))
    monkeypatch.setattr(shards_module, "inspect_sample", hangs_on_the_first(real_inspect))
    monkeypatch.setattr(shards_module, "DataConfig", lambda: types.SimpleNamespace(decode_timeout_s=1.0))
    try:
        probe_usable(urls, DecodeSpec(num_frames=2, height=28, width=28), limit=2, decode_limit_s=1.0)  # the 2nd clip
        with pytest.raises(UserError, match="decoder_hang 1"):
            probe_usable(urls[:1], DecodeSpec(), limit=1, decode_limit_s=1.0)  # given up on: passed over at once
        watchdog.GAVE_UP.clear()
        counts = shards_module._inspect_shard(urls[0])
        assert counts["skipped"] == {"decoder_hang": 1} and counts["ok"] == counts["samples"] - 1
    finally:
        release.set()
        watchdog.GAVE_UP.clear()


def test_the_watchdog_stops_a_stuck_worker_only_while_the_consumer_waits_for_a_batch():
    """Killing a worker halfway through writing a batch into the loader's pipe would leave the consumer reading
    forever: a worker is stopped only once the consumer has waited long enough to have read every batch."""
    import subprocess
    import time

    from vaemo.data.watchdog import DecodeWatch, DecodeWatchdog

    worker = subprocess.Popen(["sleep", "600"])
    watch = DecodeWatch()
    name = json.dumps(["clip-7", "/data/train-000003.tar"]).encode()
    watch.names[3, : len(name)] = torch.tensor(list(name), dtype=torch.uint8)
    watch.ids[3] = torch.tensor([worker.pid, 1, 42])
    watch.since[3] = time.monotonic() - 100.0
    waited = [0.0]
    watchdog = DecodeWatchdog(watch, limit_s=2.0, consumer_waited=lambda: waited[0])
    try:
        time.sleep(2.0)  # four checks while the consumer is busy
        assert worker.poll() is None and watchdog.stopped == []
        waited[0] = 5.0
        assert worker.wait(timeout=30) == -9
        (stuck,) = watchdog.stopped
        assert (stuck.stream, stuck.position, stuck.key, stuck.url) == (1, 42, "clip-7", "/data/train-000003.tar")
        assert stuck.seconds >= 100 and float(watch.since[3]) == 0.0
    finally:
        watchdog.close()
        worker.kill()


def test_a_worker_that_finishes_its_clip_as_the_watchdog_pauses_it_goes_on(monkeypatch):
    """The watchdog pauses a worker before it kills it: one that left the stuck clip meanwhile (and may be
    writing its batch into the loader's pipe) is let go on, not killed and not left paused."""
    import subprocess
    import time

    from vaemo.data import watchdog as watchdog_module
    from vaemo.data.watchdog import DecodeWatch, DecodeWatchdog

    worker = subprocess.Popen(["sleep", "600"])
    watch = DecodeWatch()
    watch.ids[0] = torch.tensor([worker.pid, 0, 5])
    watch.since[0] = time.monotonic() - 100.0
    real_paused, checks = watchdog_module.paused, []

    def paused_after_the_clip(pid):  # the worker's decoding ended just before it paused
        watch.since[0] = time.monotonic()
        checks.append(pid)
        return real_paused(pid)

    monkeypatch.setattr(watchdog_module, "paused", paused_after_the_clip)
    watchdog = DecodeWatchdog(watch, limit_s=2.0, consumer_waited=lambda: 60.0)
    try:
        deadline = time.monotonic() + 30
        while not checks and time.monotonic() < deadline:
            time.sleep(0.1)
        watchdog.close()
        assert checks and worker.poll() is None and watchdog.stopped == []
        state = Path(f"/proc/{worker.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        assert state not in ("T", "t")  # continued
    finally:
        watchdog.close()
        worker.kill()


def test_resuming_with_other_loader_workers_is_refused():
    with pytest.raises(UserError, match="loader_workers"):
        StreamState.from_state_dict({"num_workers": 2, "positions": {}, "skips": {}}, num_workers=1)


def test_too_few_shards_for_the_ranks_is_a_clear_error():
    with pytest.raises(UserError, match="at least 2 shards"):
        train_shard_subset(["a.tar"], 0, 2, 0, 1)


def test_pack_then_inspect_a_users_clips(tmp_path):
    src = tmp_path / "clips"
    (src / "sub").mkdir(parents=True)
    (src / "a.mp4").write_bytes(ramp_clip(24, 12, 64, 64, 16000, Codec()))
    (src / "sub" / "b.v2.mkv").write_bytes(ramp_clip(24, 12, 64, 64, 44100, Codec("mkv", channels=2)))
    (src / "c.webm").write_bytes(ramp_clip(24, 12, 64, 64, 48000, Codec("webm", "libvpx-vp9", "libopus", 2)))
    (src / "c.json").write_text(json.dumps({"caption": "from a sidecar"}))
    (src / "d.mp4").write_bytes(ramp_clip(24, 12, 64, 64, 16000, Codec()))
    (src / "silent.mp4").write_bytes(encode_clip(np.zeros((24, 64, 64, 3), np.uint8), None, 12, 16000, Codec()))
    (src / "notes.txt").write_text("ignored")
    manifest = tmp_path / "labels.jsonl"
    manifest.write_text(
        json.dumps({"clip": "a.mp4", "emotion": "joy", "valence": 0.5, "arousal": 0.4})
        + "\n"
        + json.dumps({"clip": "d.mp4", "split": "val"})
        + "\n"
        + json.dumps({"clip": "missing.mp4", "emotion": "calm"})
        + "\n"
    )
    out = tmp_path / "shards"
    packed = cli(
        "data", "pack", str(src), "--out", str(out), "--manifest", str(manifest), "--shard-size", "2", "--val-fraction", "0.25"
    )
    assert packed.returncode == 0, packed.stderr
    assert "1 clip(s) without an audio stream" in packed.stdout + packed.stderr
    train, val = sorted(out.glob("train-*.tar")), sorted(out.glob("val-*.tar"))
    assert [p.name for p in train] == ["train-000000.tar", "train-000001.tar"]  # the presets' patterns
    assert len(val) == 2  # d (its split field) and one more (a quarter of the other four): one shard per worker
    metas = {s["__key__"]: json.loads(s["json"]) for url in train + val for s in wds.WebDataset(str(url), shardshuffle=False)}
    assert set(metas) == {"a", "sub__b_v2", "c", "d", "silent"}
    assert "d" in {s["__key__"] for url in val for s in wds.WebDataset(str(url), shardshuffle=False)}
    assert metas["a"]["emotion"] == "joy" and metas["c"]["caption"] == "from a sidecar"
    assert metas["sub__b_v2"]["source"] == "sub/b.v2.mkv"  # keys carry no dots
    report = json.loads(cli("data", "inspect", str(out / "*.tar"), "--json").stdout.strip().splitlines()[-1])
    assert report == {"samples": 5, "ok": 5, "skipped": {}, "modalities": {"audio_visual": 4, "visual_only": 1}, "shards": 4}
    staged = cli("data", "inspect", str(out / "*.tar"), "--json", "--stage", "2", "--config", str(ROOT / "configs/tiny.yaml"))
    stage = json.loads(staged.stdout.strip().splitlines()[-1])["stage"]
    assert stage == {"stage": 2, "usable": 1, "skipped": {"missing_field": 4}}  # only a.mp4 has emotion + V/A
    shown = cli("data", "inspect", str(out / "*.tar"), "--stage", "2", "--config", str(ROOT / "configs/tiny.yaml")).stdout
    named = [line.strip() for line in shown.splitlines() if line.strip().startswith("e.g. ")]  # which samples, not only how many
    assert len(named) == 3 and all(".tar: " in line and line.split(": ")[1].split()[0] in metas for line in named), shown
    stage1 = json.loads(cli("data", "inspect", str(out / "*.tar"), "--json", "--stage", "1").stdout.strip().splitlines()[-1])[
        "stage"
    ]
    assert stage1 == {"stage": 1, "usable": 4, "skipped": {"no_audio_stream": 1}}  # no label needed


def test_pack_takes_any_script_linked_folders_and_keeps_test_clips_out(tmp_path):
    """Names in any script keep their letters (two Japanese names both became '___'), linked folders are
    searched (once, however many links reach them), a link to nothing is reported instead of a traceback,
    and a clip marked test is never packed."""
    import os

    src, elsewhere = tmp_path / "clips", tmp_path / "elsewhere"
    src.mkdir()
    elsewhere.mkdir()
    clip = ramp_clip(24, 12, 64, 64, 16000, Codec())
    for name in ("日本語.mp4", "中文字.mp4", "held.mp4", "trained.mp4"):
        (src / name).write_bytes(clip)
    (elsewhere / "linked.mp4").write_bytes(clip)
    os.symlink(elsewhere, src / "shortcut")
    os.symlink(elsewhere, src / "twin")  # a second link to the same folder adds nothing
    (src / "real").mkdir()
    (src / "real" / "inner.mp4").write_bytes(clip)
    os.symlink(src / "real", src / "a-link")  # keyed by its real path, not by the link sorted first
    os.symlink(src / "trained.mp4", src / "again.mp4")  # a link to a clip in the tree: one clip
    os.symlink(src, elsewhere / "loop")  # a cycle through the linked folder is walked once
    os.symlink(tmp_path / "gone.mp4", src / "dangling.mp4")
    (src / "held.json").write_text(json.dumps({"split": "test"}))
    (src / "trained.json").write_text(json.dumps({"split": "Training"}))
    out = tmp_path / "shards"
    packed = cli("data", "pack", str(src), "--out", str(out), "--val-fraction", "0")
    assert packed.returncode == 0, packed.stderr
    keys = {s["__key__"] for url in sorted(out.glob("*.tar")) for s in wds.WebDataset(str(url), shardshuffle=False)}
    assert keys == {"日本語", "中文字", "trained", "shortcut__linked", "real__inner"}
    log = packed.stdout + packed.stderr
    assert "1 clip(s) left out: their split is test" in log and "1 clip(s) left out: links to nothing" in log


def test_pack_merges_a_sidecar_with_the_manifest_and_matches_names_as_typed(tmp_path):
    """A sidecar's labels stay when the manifest names the clip too (the manifest's value wins a field both
    give); a name macOS wrote decomposed matches the manifest's composed spelling; `split: null` is no split;
    files of other containers are named by type with how to repack them. A clip named twice in the manifest,
    or a NaN there, is one line and exit 2."""
    import unicodedata

    src = tmp_path / "clips"
    src.mkdir()
    clip = ramp_clip(24, 12, 64, 64, 16000, Codec())
    (src / "b.mp4").write_bytes(clip)
    (src / "b.json").write_text(json.dumps({"caption": "a calm sea", "emotion": "contentment", "valence": 0.4, "arousal": -0.2}))
    decomposed = unicodedata.normalize("NFD", "café.mp4")
    (src / decomposed).write_bytes(clip)
    (src / "n.mp4").write_bytes(clip)
    (src / "n.json").write_text(json.dumps({"split": None, "caption": "no split"}))
    (src / "old.avi").write_bytes(b"RIFF")
    manifest = tmp_path / "labels.jsonl"
    lines = [{"clip": "b.mp4", "split": "train", "emotion": "awe"}, {"clip": "café.mp4", "emotion": "fear"}]
    manifest.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    out = tmp_path / "shards"
    packed = cli("data", "pack", str(src), "--out", str(out), "--manifest", str(manifest), "--val-fraction", "0")
    assert packed.returncode == 0, packed.stderr
    metas = {
        s["__key__"]: json.loads(s["json"])
        for url in sorted(out.glob("*.tar"))
        for s in wds.WebDataset(str(url), shardshuffle=False)
    }
    assert metas["b"] == {
        "caption": "a calm sea",
        "emotion": "awe",
        "valence": 0.4,
        "arousal": -0.2,
        "split": "train",
        "source": "b.mp4",
    }
    # keyed as the file system spells it (the keys of shards packed before stay), labelled as the manifest does
    assert metas["cafe_"]["emotion"] == "fear" and metas["cafe_"]["source"] == decomposed
    assert metas["n"]["caption"] == "no split"
    log = packed.stdout + packed.stderr
    assert "packed 3 clips (3 labelled)" in log and "manifest entries name no clip" not in log, log
    assert "ignored 1 file(s) that are not clips (.avi 1)" in log and "ffmpeg -i clip.avi -c copy clip.mkv" in log, log

    for bad, message in (
        (lines + [{"clip": "./b.mp4", "emotion": "fear"}], "names the clip 'b.mp4' twice (lines 1 and 3); keep one line"),
        ([{"clip": "b.mp4", "valence": float("nan")}], "line 1 is not valid JSON (NaN is not a JSON value"),
    ):
        manifest.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in bad))
        refused = cli("data", "pack", str(src), "--out", str(out), "--manifest", str(manifest))
        assert refused.returncode == 2 and message in refused.stderr and "Traceback" not in refused.stderr, refused.stderr


@pytest.mark.parametrize(
    "sidecar,message",
    [("[]", "holds list, not a JSON object"), ('{"split": "tset"}', "clip 'a.mp4' has split 'tset'; use train, val")],
)
def test_pack_refuses_labels_it_cannot_read_in_one_line(tmp_path, sidecar, message):
    src = tmp_path / "clips"
    src.mkdir()
    (src / "a.mp4").write_bytes(ramp_clip(24, 12, 64, 64, 16000, Codec()))
    (src / "a.json").write_text(sidecar)
    result = cli("data", "pack", str(src), "--out", str(tmp_path / "shards"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert message in result.stderr, result.stderr


def test_a_samples_files_may_lie_apart_in_a_local_shard_not_in_a_streamed_one(tmp_path):
    """data-formats: a sample is the files that share a key. `tar cf` of a folder, or a tool writing all
    labels first, puts them apart: a local shard is regrouped (the labels were lost before), a streamed one
    counts what comes back as `scattered_sample`. A key may start with `__` (pack writes `__intro.mp4` so);
    only webdataset's own top-level `__x__` files are not samples. A gzip'ed tar reads like a tar."""
    import gzip
    import tarfile

    from vaemo.data.tars import read_shard

    clip = ramp_clip(24, 12, 64, 64, 16000, Codec())
    order = [("c1.json", b'{"caption": "one"}'), ("c2.json", b'{"caption": "two"}'), ("c1.mp4", clip)]
    order += [("__intro.mp4", clip), ("c2.mp4", clip), ("__meta__", b"x")]
    shard = tmp_path / "apart.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in order:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    samples = list(read_shard(str(shard)))
    assert [(s["__key__"], sorted(k for k in s if not k.startswith("__"))) for s in samples] == [
        ("c1", ["json", "mp4"]),
        ("c2", ["json", "mp4"]),
        ("__intro", ["mp4"]),
    ]
    (tmp_path / "apart.tar.gz").write_bytes(gzip.compress(shard.read_bytes()))
    for url in (str(tmp_path / "apart.tar.gz"), f"pipe:cat {tmp_path / 'apart.tar.gz'}"):  # read in order
        assert [s["__key__"] for s in read_shard(url)] == ["c1", "c2", "c1", "__intro", "c2"]
    streamed = cli("data", "inspect", f"pipe:cat {shard}", "--json")
    assert streamed.returncode == 0, streamed.stderr
    counts = json.loads(streamed.stdout.strip().splitlines()[-1])
    assert counts["samples"] == 5 and counts["skipped"].get("scattered_sample") == 2, counts


def test_a_regrouped_shard_cut_short_gives_every_whole_sample_before_the_cut(tmp_path):
    """a.mp4 b.mp4 b.json c.mp4 a.json, cut inside a.json: b and c are whole and come, a is incomplete and
    left out, and the shard ends as unreadable (a first pass had yielded a without its labels and lost c)."""
    import tarfile

    from vaemo.data.tars import ShardError, read_shard

    shard = tmp_path / "cut.tar"
    with tarfile.open(shard, "w") as tar:
        for name in ("a.mp4", "b.mp4", "b.json", "c.mp4", "a.json"):
            data = b'{"caption": "a long enough caption"}' if name.endswith("json") else b"clip bytes"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(shard) as tar:
        cut_at = tar.getmember("a.json").offset_data + 5
    shard.write_bytes(shard.read_bytes()[:cut_at])
    *samples, end = read_shard(str(shard))
    assert [(s["__key__"], sorted(k for k in s if not k.startswith("__"))) for s in samples] == [
        ("b", ["json", "mp4"]),
        ("c", ["mp4"]),
    ]
    assert isinstance(end, ShardError) and "ends inside a member" in end.detail


def test_a_named_shard_that_is_not_there_and_an_empty_one_are_one_line(tmp_path):
    """A brace range one shard too long dropped that shard without a word; an empty shard's stop line gave no
    reason."""
    import tarfile

    from vaemo.data.stream import NoUsableData, expand_shards, probe_usable

    for name in ("r-000000.tar", "r-000002.tar"):
        tarfile.open(tmp_path / name, "w").close()
    with pytest.raises(UserError, match=r"1 of the shards named do not exist, e\.g\. '.*r-000001\.tar'"):
        expand_shards(str(tmp_path / "r-{000000..000002}.tar"))
    assert len(expand_shards(str(tmp_path / "r-*.tar"))) == 2
    with pytest.raises(NoUsableData, match="0 usable of 0 samples read: the shards hold no sample"):
        probe_usable(expand_shards(str(tmp_path / "r-*.tar")), DecodeSpec(), limit=10)


def test_inspect_exits_2_only_when_nothing_can_be_read(tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar file" * 100)
    result = cli("data", "inspect", str(junk), "--json")
    assert result.returncode == 2
    assert "nothing could be read" in result.stderr
    assert cli("data", "inspect", str(tmp_path / "none-*.tar")).returncode == 2


@pytest.mark.parametrize(
    "args,message",
    [
        (["data", "synth", "--out", "FILE", "--clips", "1"], "--out 'FILE' is a file; give a folder"),
        (["data", "synth", "--out", "FILE/world", "--clips", "1"], "--out 'FILE/world' is not writable"),
        (["data", "synth", "--out", "DIR", "--clips", "1", "--workers", "-1"], "expected an integer >= 0, got '-1'"),
        (["data", "synth", "--out", "DIR", "--clips", "1", "synth.workers=-2"], "config field 'synth.workers' must be >= 0"),
        (["data", "pack", "FILE", "--out", "DIR"], "source folder 'FILE' is a file"),
        (["data", "pack", "CLIPS", "--out", "FILE"], "--out 'FILE' is a file; give a folder"),
        (["config", "show", "--config", "DIR"], "config file 'DIR' is a folder"),
        (["config", "show", "--config", "BINARY"], "config file 'BINARY' is not UTF-8 text"),
        (["export", "--checkpoint", "DIR/step-00000004", "--out", "DIR/x"], "--checkpoint 'DIR/step-00000004' does not exist"),
    ],
)
def test_paths_of_the_wrong_kind_and_bad_counts_are_one_line_and_exit_2(tmp_path, args, message):
    """Before any work, never a traceback: an output that is a file, a source that is not a folder."""
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "a.mp4").write_bytes(b"not read before the output is checked")
    (tmp_path / "binary").write_bytes(bytes(range(256)))
    names = {"FILE": tmp_path / "file", "DIR": tmp_path / "dir", "CLIPS": tmp_path / "clips", "BINARY": tmp_path / "binary"}

    def placed(text: str) -> str:
        for name, path in names.items():
            text = text.replace(name, str(path))
        return text

    result = cli(*map(placed, args))
    assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-2000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and placed(message) in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "dir").iterdir())  # nothing written


def test_file_urls_name_local_shards(tmp_path):
    """data-formats: shards may be any URL webdataset opens; file: ones are local paths (globbed, checked)."""
    from vaemo.config import load_config

    for name in ("train-000000.tar", "train-000001.tar"):
        (tmp_path / name).write_bytes(b"")
    both = [str(tmp_path / "train-000000.tar"), str(tmp_path / "train-000001.tar")]
    assert expand_shards(f"file:{tmp_path}/train-*.tar") == both
    assert expand_shards(f"file://{tmp_path}/train-000001.tar") == both[1:]
    with pytest.raises(UserError, match="match no file"):
        expand_shards(f"file:{tmp_path}/val-*.tar")
    cfg = load_config(None, [f"data.train_shards=file:{tmp_path}/train-*.tar"])
    assert cfg.data.train_shards == f"{tmp_path}/train-*.tar"


def test_bench_reader(small_world, tmp_path):
    items = read_bench(small_world / "bench")
    assert len(items) == 96 and items[0].media.is_file()
    assert {i.modality for i in items} == {"audio", "visual", "audio_visual"}
    (tmp_path / "items.jsonl").write_text(
        json.dumps(
            {
                "id": "q1",
                "media": "m.mp4",
                "modality": "audio",
                "task": "emotion",
                "question": "q?",
                "options": ["a", "b"],
                "answer": 1,
            }
        )
        + "\n"
        + json.dumps(
            {
                "id": "q2",
                "media": "m.mp4",
                "modality": "smell",
                "task": "emotion",
                "question": "q?",
                "options": ["a", "b"],
                "answer": 0,
            }
        )
        + "\n"
    )
    with pytest.raises(UserError, match=r"items.jsonl:2: field 'modality'"):
        read_bench(tmp_path)


@pytest.mark.parametrize(
    "change,encoding,message",
    [
        ({}, "utf-8-sig", None),  # a byte-order mark, as Windows tools write: read, not "not valid JSON"
        ({"question": "Quelle émotion ?"}, "latin-1", "is not UTF-8 text"),
        ({"media": "/elsewhere/m.mp4"}, "utf-8", "field 'media' must be a path relative to the benchmark folder"),
        ({"task": "all"}, "utf-8", "task 'all' is reserved"),
    ],
)
def test_a_bench_in_another_encoding_or_naming_what_it_may_not_is_one_line(tmp_path, change, encoding, message):
    item = {"id": "q1", "media": "m.mp4", "modality": "audio", "task": "emotion", "question": "q?", "options": ["a", "b"]}
    (tmp_path / "items.jsonl").write_bytes(
        (json.dumps({**item, "answer": 1, **change}, ensure_ascii=False) + "\n").encode(encoding)
    )
    if message is None:
        assert [i.id for i in read_bench(tmp_path)] == ["q1"]
    else:
        with pytest.raises(UserError, match=message):
            read_bench(tmp_path)


def test_shard_reader_matches_webdataset_and_counts_damaged_shards(small_world, tmp_path):
    from vaemo.data.tars import ShardError, read_shard

    url = str(sorted((small_world / "train").glob("*.tar"))[0])
    ours = [s for s in read_shard(url)]
    theirs = list(wds.WebDataset(url, shardshuffle=False))
    assert [s["__key__"] for s in ours] == [s["__key__"] for s in theirs]
    assert all(a == {k: v for k, v in b.items() if k != "__local_path__"} for a, b in zip(ours, theirs))
    assert len({ext for s in ours for ext in s if not ext.startswith("__")}) > 2  # several containers

    long_key = "x" * 150  # longer than a ustar name: written with a pax header
    with wds.TarWriter(str(tmp_path / "long.tar"), encoder=False) as sink:
        sink.write({"__key__": f"dir/{long_key}", "mp4": b"clip", "json": b"{}"})
    (sample,) = read_shard(str(tmp_path / "long.tar"))
    assert sample["__key__"] == f"dir/{long_key}" and sample["mp4"] == b"clip"

    cut = tmp_path / "cut.tar"
    cut.write_bytes(open(url, "rb").read()[:300_000])
    items = list(read_shard(str(cut)))
    assert isinstance(items[-1], ShardError) and not any(isinstance(i, ShardError) for i in items[:-1])
    assert len(items) > 2  # the samples before the cut still come


def test_the_data_formats_page_explains_every_skip_reason():
    """Users read skip reasons in `vaemo data inspect` and the metrics; each must be explained in the docs."""
    from vaemo.data.decode import SKIP_REASONS

    page = (ROOT / "docs" / "data-formats.md").read_text()
    assert [reason for reason in SKIP_REASONS if f"| `{reason}` |" not in page] == []
