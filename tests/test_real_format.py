"""The cluster user's path end to end: `configs/qwen2.5-vl-7b.yaml` on checkpoint folders in the hub's layout
(tests/hf_checkpoints.py), with only paths, sizes and scaling changed: stage 1 -> stage 2 -> eval -> ask,
ZeRO-3 on 2 Ray Train workers, bf16. It runs everything the tiny preset skips: the tokenizer's chat
template, adding vaemo's audio tokens and resizing the embeddings, the v4 weight names, the full 30 s
Whisper window, LoRA, and bf16 training, scoring and generation."""

from __future__ import annotations

import json
import math
import sys

import pytest
from conftest import ROOT, SEVEN_B_ON_CPU, bench_clip, cli, metrics, ok, run

pytestmark = pytest.mark.slow
PRESET = str(ROOT / "configs/qwen2.5-vl-7b.yaml")


def test_the_7b_preset_runs_end_to_end_on_hub_layout_checkpoints_in_bf16(small_world, hf_checkpoints, tmp_path):
    sizes = [
        f"model.vlm={hf_checkpoints['vlm']}",
        f"model.audio_encoder={hf_checkpoints['audio']}",
        f"data.train_shards={small_world}/train/*.tar",
        f"data.val_shards={small_world}/val/*.tar",
        f"data.bench_dir={small_world}/bench",
        *SEVEN_B_ON_CPU,
        "data.frame_width=56",
        "data.shuffle_buffer=8",
    ]
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    ok(run([sys.executable, str(ROOT / "jobs/stage1.py"), "--config", PRESET, "--out", str(stage1), *sizes], timeout=900))
    ok(
        run(
            [
                sys.executable,
                str(ROOT / "jobs/stage2.py"),
                "--config",
                PRESET,
                "--out",
                str(stage2),
                *sizes,
                f"model.init_from={stage1 / 'export'}",
            ],
            timeout=900,
        )
    )
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
    ok(
        run(
            [
                sys.executable,
                str(ROOT / "jobs/eval.py"),
                "--config",
                PRESET,
                "--model",
                str(stage2 / "export"),
                "--bench",
                str(small_world / "bench"),
                "--out",
                str(out),
                "--actors",
                "2",
                "--max-items",
                "24",
                "--dtype",
                "bf16",
            ],
            timeout=600,
        )
    )
    report = json.loads((out / "results.json").read_text())
    assert report["skipped"] == 0 and {"audio", "visual", "audio_visual"} <= set(report["accuracy"])

    clip = bench_clip(small_world, 1)
    result = cli(
        "ask", "--model", str(stage2 / "export"), "--clip", str(clip), "--dtype", "bf16", "--max-new-tokens", "4", "--json"
    )
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert isinstance(answer["answer"], str) and answer["valence"] is not None
