"""Generated clips obey spec/artemo-synth.md, measured on the decoded clips (FFmpeg round trip included)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from signal_checks import (
    background_rows,
    fundamental,
    harmonic_profile,
    hz_to_midi,
    note_segments,
    onset_times,
    rgb_to_hsv,
    triad_mode,
)
from torchcodec.decoders import AudioDecoder, VideoDecoder

from vaemo.data import synth, vocab

SR = 16000  # clips are decoded at this rate, whatever they were written at
CORNER = synth.Ranges.corner(duration=(3.0, 3.0))
# The spec's whole range of sizes, aspect ratios, frame and sample rates, channels, containers and the
# renderer's free choices (2.5-3.5 s keeps the module fast).
SPREAD = synth.Ranges(duration=(2.5, 3.5))
GRID = [(obj, emo) for obj in vocab.OBJECTS for emo in vocab.EMOTIONS]


def decoded(obj: str, emo: str, ranges: synth.Ranges, index: int = 0):
    """Render + encode + decode one clip with given labels; returns (frames THWC uint8, audio, meta)."""
    media, meta = synth.render_clip(
        11, "train", 1000 * vocab.OBJECTS.index(obj) + 10 * index + vocab.EMOTIONS.index(emo), ranges, obj=obj, emotion=emo
    )
    clip = synth.encode_clips([media])[0]
    video = VideoDecoder(clip).get_frames_in_range(0, len(media.frames)).data.permute(0, 2, 3, 1).numpy()
    sound = AudioDecoder(clip, sample_rate=SR, num_channels=1).get_all_samples().data[0].numpy()
    return video, sound, meta


@pytest.fixture(scope="module", params=["corner", "spread"])
def clips(request):
    ranges = CORNER if request.param == "corner" else SPREAD
    return {(obj, emo): decoded(obj, emo, ranges) for obj, emo in GRID}


def test_the_spread_covers_the_spec():
    specs = [synth.sample_clip(np.random.default_rng(i), synth.Ranges()) for i in range(300)]
    shorts = [s.short_side for s in specs]
    assert min(shorts) < 80 and max(shorts) > 208 and min(shorts) >= 64
    aspects = [s.width / s.height for s in specs]
    assert min(aspects) < 0.65 and max(aspects) > 1.6
    assert min(s.fps for s in specs) < 15 and max(s.fps for s in specs) > 55
    assert min(s.duration for s in specs) < 2.5 and max(s.duration for s in specs) > 7.5
    assert {s.sample_rate for s in specs} == set(synth.SAMPLE_RATES)
    assert {s.channels for s in specs} == {1, 2} and {s.container for s in specs} == set(synth.FORMATS)
    assert all(s.width % 2 == 0 and s.height % 2 == 0 for s in specs)
    assert len({round(s.look.star_inner, 3) for s in specs}) > 100  # the renderer's choices vary too


def test_background_hue_brightness_and_saturation_follow_valence_and_arousal(clips):
    for (obj, emo), (video, _, meta) in clips.items():
        hue, sat, val = rgb_to_hsv(background_rows(video))
        top_hue, top_val = float(np.median(hue[1:6])), float(np.median(val[1:6]))
        if meta["valence"] > 0:
            assert 15 - 4 <= top_hue <= 60 + 4, (obj, emo, top_hue)
        else:
            assert 190 - 4 <= top_hue <= 260 + 4, (obj, emo, top_hue)
        expected_top = 0.55 + 0.4 * meta["valence"]
        assert abs(top_val - expected_top) <= 0.05 + 0.03, (obj, emo, top_val, expected_top)
        bottom_val = float(np.median(val[-6:-1]))
        assert 0.15 - 0.04 <= top_val - bottom_val <= 0.15 + 0.04, (obj, emo, top_val - bottom_val)
        expected_sat = 0.35 + 0.3 * abs(meta["arousal"])
        assert abs(float(np.median(sat[1:6])) - expected_sat) <= 0.06, (obj, emo)


def test_objects_move_faster_with_higher_arousal():
    """Centre-of-object displacement per second matches (0.1 + 0.9 s) shorter sides (before reflections)."""
    for emo in vocab.EMOTIONS:
        rng = np.random.default_rng([5, vocab.EMOTIONS.index(emo)])
        spec = synth.sample_clip(rng, CORNER, emotion=emo, obj="circle")
        spec.count, spec.sizes, spec.starts, spec.onsets = 1, [spec.sizes[0]], [[64.0, 64.0]], []
        spec.directions = [0.0]  # to the right, from the centre: no reflection in the first frames
        frames = synth.render_frames(spec)
        background = frames[0, :, 0]  # column 0 is pure background at the start
        moved = np.abs(frames[:3].astype(int) - background[None, :, None, :].astype(int)).sum(-1) > 30
        centres = [np.nonzero(m.any(0))[0].mean() for m in moved]
        speed = (centres[1] - centres[0]) * spec.fps / spec.short_side
        assert abs(speed - (0.1 + 0.9 * spec.arousal01)) < 0.03, (emo, speed)


def test_onset_rate_follows_arousal(clips):
    for (obj, emo), (_, audio, meta) in clips.items():
        s = (meta["arousal"] + 1) / 2
        period = 60 / (50 + 150 * s)
        onsets = onset_times(audio, SR)
        measured = float(np.median(np.diff(onsets)))
        assert abs(measured - period) < 0.03 * period + 0.011, (obj, emo, measured, period)
        rate = 1 / measured  # onsets per second: (50 + 150 s) / 60, s > 0.65 exactly when arousal > 0.3
        if meta["arousal"] > 0:
            assert rate > (50 + 150 * 0.65) / 60 - 0.05, (obj, emo, rate)
        else:
            assert rate < (50 + 150 * 0.35) / 60 + 0.05, (obj, emo, rate)


def test_major_or_minor_triad_follows_valence(clips):
    for (obj, emo), (_, audio, meta) in clips.items():
        segments = note_segments(audio, SR, onset_times(audio, SR))
        midis = [hz_to_midi(fundamental(seg, SR)) for seg in segments]
        assert max(abs(m - round(m)) for m in midis) < 0.3, (obj, emo, midis)  # in tune
        assert triad_mode(midis) == ("major" if meta["valence"] > 0 else "minor"), (obj, emo, midis)
        # Register: some root r in the spec's range explains every note as r + triad step (+ an octave).
        steps = {0, 4, 7} if meta["valence"] > 0 else {0, 3, 7}
        allowed = steps | {s + 12 for s in steps}
        roots = range(67, 75) if meta["valence"] > 0 else range(50, 58)
        assert any(all(round(m) - r in allowed for m in midis) for r in roots), (obj, emo, midis)


def classify_timbre(audio: np.ndarray) -> str:
    profiles = []
    for t in onset_times(audio, SR):
        a, b = int((t + 0.012) * SR), int((t + 0.072) * SR)
        if int((t + 0.15) * SR) > len(audio):
            continue
        f0 = fundamental(audio[a : int((t + 0.15) * SR)], SR)
        profiles.append(harmonic_profile(audio[a:b], SR, f0))
    profiles = np.array(profiles)
    if profiles[:, 1:].std(0).max() > 0.15:  # a noise-excited string differs from note to note
        return "star"
    median = np.median(profiles, 0)
    templates = {"circle": [1, 0, 0, 0], "square": [1, 0, 1 / 3, 0], "triangle": [1, 1 / 2, 1 / 3, 1 / 4]}
    for name, template in templates.items():
        if np.abs(median - np.array(template)).max() < 0.08:
            return name
    return "unknown"


def test_object_timbre_is_audible(clips):
    for (obj, emo), (_, audio, _) in clips.items():
        assert classify_timbre(audio) == obj, (obj, emo)


def test_durations_and_streams_line_up(clips):
    for (obj, emo), (video, audio, meta) in clips.items():
        fps = meta["synth"]["fps"]
        assert video.shape[1:3] == (meta["synth"]["height"], meta["synth"]["width"])
        seconds = len(video) / fps
        assert 2.0 - 1 / fps <= seconds <= 8.0
        assert abs(len(audio) / SR - seconds) < 0.1, (obj, emo)
        assert abs(seconds - meta["synth"]["duration"]) <= 1 / fps


def test_peak_loudness_follows_arousal():
    for emo in vocab.EMOTIONS:
        rng = np.random.default_rng([9, vocab.EMOTIONS.index(emo)])
        spec = synth.sample_clip(rng, SPREAD, emotion=emo, obj="circle")
        audio = synth.render_audio(spec, rng)
        peak = float(np.abs(audio).max())
        assert abs(peak - (0.25 + 0.5 * spec.arousal01)) <= spec.noise_amplitude + 1e-6
        assert 0.005 <= spec.noise_amplitude <= 0.02


def test_a_note_cut_to_one_sample_at_the_clip_end_stays_finite():
    # An onset on a clip's last sample leaves a note of length 1, whose waveform is sin(0) = 0: it must
    # render as silence, not 0/0 (NaN audio makes FFmpeg's encoder refuse the whole clip).
    for kind in vocab.OBJECTS:
        wave = synth._oscillator(kind, 440.0, np.zeros(1), SR, np.random.default_rng(0), synth.Look())
        assert wave.shape == (1,) and np.isfinite(wave).all(), kind
    rng = np.random.default_rng(3)
    spec = synth.sample_clip(rng, SPREAD, obj="square")
    last = (spec.n_frames / spec.fps * spec.sample_rate - 1) / spec.sample_rate
    spec.onsets = [*spec.onsets, last]
    assert np.isfinite(synth.render_audio(spec, rng)).all()


def test_captions_name_object_count_emotion_and_cues():
    for i in range(40):
        rng = np.random.default_rng(i)
        spec = synth.sample_clip(rng, SPREAD)
        text = spec.caption.lower()
        assert spec.object in text and spec.emotion in text
        assert vocab.COUNT_WORDS[spec.count] in text
        for pair in (("warm", "cool"), ("bright", "dark"), ("fast", "slow"), ("major", "minor")):
            assert sum(word in text for word in pair) == 1, (pair, text)


def test_synthesize_writes_splits_and_a_balanced_benchmark(small_world):
    assert len(list((small_world / "train").glob("*.tar"))) == 4
    assert len(list((small_world / "val").glob("*.tar"))) == 2
    items = [json.loads(line) for line in (small_world / "bench" / "items.jsonl").read_text().splitlines()]
    assert len(items) == 16 * 6
    assert {(i["modality"], i["task"]) for i in items} == {
        (m, t) for m in ("audio", "visual", "audio_visual") for t in ("content", "emotion")
    }
    emotions = [i["options"][i["answer"]] for i in items if i["task"] == "emotion"]
    assert {e: emotions.count(e) for e in vocab.EMOTIONS} == {e: 12 for e in vocab.EMOTIONS}
    answers = [i["answer"] for i in items]
    assert len(set(answers)) == 4  # options are shuffled, so the right index varies
    for item in items[:6]:
        assert (small_world / "bench" / item["media"]).is_file()


def test_synthesis_is_deterministic_per_seed(tmp_path):
    kwargs = dict(train_clips=6, val_clips=2, bench_clips=2, clips_per_shard=6, workers=1, ranges=SPREAD)
    synth.synthesize(tmp_path / "a", seed=3, **kwargs)
    synth.synthesize(tmp_path / "b", seed=3, **kwargs)
    synth.synthesize(tmp_path / "c", seed=4, **kwargs)
    a = (tmp_path / "a/train/train-000000.tar").read_bytes()
    assert a == (tmp_path / "b/train/train-000000.tar").read_bytes()
    assert a != (tmp_path / "c/train/train-000000.tar").read_bytes()
    assert (tmp_path / "a/bench/items.jsonl").read_text() == (tmp_path / "b/bench/items.jsonl").read_text()


def test_the_val_split_becomes_a_bench_to_choose_settings_on(small_world, tmp_path):
    shards = sorted((small_world / "val").glob("*.tar"))
    items = synth.bench_from_shards(shards, tmp_path / "val-bench", seed=0)
    assert items == 16 * 6
    rows = [json.loads(line) for line in (tmp_path / "val-bench" / "items.jsonl").read_text().splitlines()]
    assert all((tmp_path / "val-bench" / r["media"]).is_file() for r in rows)
    first = json.loads((tmp_path / "val-bench" / "media" / "clip-00000.json").read_text())
    assert first["split"] == "val" and rows[0]["media"].endswith(first["synth"]["container"])


def test_vaemo_data_synth_writes_a_world_at_other_settings_inside_the_spec(tmp_path):
    from conftest import cli

    result = cli(
        "data",
        "synth",
        "--out",
        str(tmp_path / "w"),
        "--clips",
        "4",
        "--val-clips",
        "2",
        "--bench-clips",
        "2",
        "--workers",
        "1",
        "synth.fps=[24,24]",
        "synth.formats=[mkv]",
        "synth.min_duration=4",
        "synth.sample_rates=[22050]",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    meta = json.loads((tmp_path / "w/bench/media/clip-00001.json").read_text())["synth"]
    assert (meta["fps"], meta["container"], meta["sample_rate"]) == (24, "mkv", 22050) and meta["duration"] >= 4
    bad = cli("data", "synth", "--out", str(tmp_path / "bad"), "synth.fps=[5,24]")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: config field 'synth.fps'")
