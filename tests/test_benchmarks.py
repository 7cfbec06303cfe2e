"""The benchmarks' code paths, quickly: the GPU benchmark on a shrunken model on the CPU, with only what the
GPU machine has; the stage-1 step benchmark on one tiny step (its figures are in the README, not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ONE_WORKER, ROOT


def run_bench(script: str, *args: str, timeout: float = 300) -> str:
    """Run bench/SCRIPT with this venv's python from the repository root; its stdout (it must succeed)."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


SMOKE = ["--smoke", "--clips", "2", "--frames", "4", "--size", "56", "--audio-seconds", "2", "--steps", "1", "--topk", "8"]


def test_gpu_stage1_benchmark_runs_and_prints_one_summary_line():
    result = subprocess.run(
        ["bash", str(ROOT / "bench/gpu_stage1.sh"), *SMOKE], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("GPU_STAGE1 cpu (smoke") and "tok/s" in last and "MFU" in last
    assert "| sdpa packed " in last and "| sdpa " in last  # SDPA timed with and without prefix packing
    # the 7B preset's stage-1 and stage-2 steps through vaemo's objectives, their peak against the estimate
    for stage in (1, 2):
        part = last.split(f"| preset stage {stage} step ")[1].split(" |")[0]
        peak, estimate = (float(part.split(word)[1].split()[0]) for word in (" peak ", " est "))
        assert peak > 0 and estimate > 0, part


def test_the_gpu_benchmark_needs_neither_ray_deepspeed_nor_the_data_stack():
    probe = (
        "import runpy, sys; sys.argv = ['gpu_stage1.py', *sys.argv[1:]]\n"
        "try:\n    runpy.run_path('bench/gpu_stage1.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('ray', 'deepspeed', 'torchcodec', 'webdataset') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", probe, *SMOKE], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_stage1_step_benchmark_times_both_teacher_modes():
    stdout = run_bench("stage1_step.py", "--presets", "tiny", "--steps", "1", "--warmup", "0", "--batch", "2")
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("tiny: online ") and "ratio cache/online" in last


def test_stage2_step_benchmark_trains_alike_whether_the_teacher_reuses_the_vision_tokens_or_not():
    compared, share = run_bench("stage2_step.py", "--steps", "1", "--batch", "2", "--teacher-share").strip().splitlines()[-2:]
    assert "ratio shared/unshared" in compared and compared.endswith("the same losses"), compared
    fraction = float(share.split(": ")[-1].split()[0])
    assert share.startswith("the KD teacher's forward alone") and fraction > 0, share


def test_comm_bytes_sizes_the_real_7b_and_replicating_frozen_weights_removes_their_gathers():
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench/comm_bytes.py"), "--nodes", "1", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    # Qwen2.5-VL-7B's language model above the persistence threshold (norms and biases are below it): 28 blocks
    # of 3584 wide (GQA 28/4 heads of 128, MLP 18944) and both 152,064-row tables
    h, kv, ffn, vocab = 3584, 4 * 128, 18944, 152064
    llm = 28 * (2 * h * h + 2 * h * kv + 3 * h * ffn) + 2 * vocab * h
    llm_rows = [line for line in lines if line.strip().startswith("llm ")]
    assert len(llm_rows) == 2 and all(f"frozen {llm / 1e6:9.1f} M" in row for row in llm_rows)
    summary = [line for line in lines if line.startswith("stage ")][-2:]
    for stage, line in zip((1, 2), summary):
        partitioned, replicated = (float(x) for x in line.split(": ")[1].split(" GB")[0:1] + [line.split(" vs ")[1].split()[0]])
        assert line.startswith(f"stage {stage}:") and replicated < partitioned / 100


def test_memory_estimate_of_the_7b_fits_and_matches_a_measured_peak_on_the_tiny_model():
    sized = subprocess.run([sys.executable, str(ROOT / "bench/memory.py")], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert sized.returncode == 0, sized.stderr[-3000:]
    summary = [line for line in sized.stdout.splitlines() if line.startswith("stage ") and "estimated peak" in line]
    assert [line.split(":")[0] for line in summary] == ["stage 1", "stage 2"]
    for line in summary:
        peak, without = float(line.split("estimated peak ")[1].split()[0]), float(line.split("; ")[1].split()[0])
        assert peak < 80 and without > peak  # checkpointing is what lets stage 2 fit
    checked = subprocess.run(
        [sys.executable, str(ROOT / "bench/memory.py"), "--check", "tiny"], capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert checked.returncode == 0, checked.stderr[-3000:]
    ratios = [float(line.rsplit("ratio ", 1)[1]) for line in checked.stdout.splitlines() if "ratio " in line]
    assert len(ratios) == 2 and all(0.8 <= r <= 1.2 for r in ratios), checked.stdout


@pytest.mark.slow
def test_val_curve_scores_every_checkpoint_on_the_val_clips(small_world, tmp_path):
    """bench/val_curve.py: one short stage-0 run, each checkpoint exported and scored on a bench made of the
    val clips (not the bench split), one row per checkpoint."""
    run_bench(
        "val_curve.py",
        *("--stage", "0", "--world", str(small_world), "--steps", "4", "--every", "2", "--actors", "0"),
        *("--max-items", "24", "--out", str(tmp_path)),
        *("data.batch_size=4", "train.report_every=1", "train.val_batches=1", "train.warmup_steps=1"),
        "stage0.vision_warmup_steps=1",
        ONE_WORKER,
        timeout=600,
    )
    curve = json.loads((tmp_path / "curve.json").read_text())
    assert [row["step"] for row in curve] == [2, 4]
    assert all(0.0 <= row["visual/content"] <= 1.0 for row in curve)
    val_media = sorted(p.name for p in (tmp_path / "val-bench" / "media").glob("*.json"))
    assert len(val_media) == 16  # the 16 val clips, not the bench split's


def test_cpu_precision_benchmark_times_one_training_step_in_each_precision():
    small = ["data.num_frames=2", "data.frame_height=56", "data.frame_width=56", "data.batch_size=2"]
    lines = run_bench("cpu_precision_step.py", "--steps", "1", *small).strip().splitlines()
    embeds = [line for line in lines if " patch embedding, " in line]
    assert [line.split()[0] for line in embeds] == ["float32", "bfloat16"] and all("Conv3d" in line for line in embeds), lines
    last = lines[-1]
    fp32, bf16, ratio = (float(last.split(word)[1].split()[0]) for word in ("fp32 ", "bf16 ", "bf16/fp32 "))
    assert fp32 > 0 and bf16 > 0 and ratio == pytest.approx(bf16 / fp32, rel=0.05, abs=0.1), last


def test_video_inputs_benchmark_checks_equality_and_prints_the_ratio():
    out = run_bench("video_inputs.py", "--clips", "2", "--frames", "4", "--size", "56", "--repeats", "2")
    assert "patches equal bit for bit" in out
    ratio = float(out.split("video_inputs / definition: ")[1].split()[0])
    assert ratio > 0


def test_the_audio_tail_benchmark_scores_the_audio_items_both_ways(adapter_export, small_world):
    out = run_bench("audio_tail.py", "--model", str(adapter_export), "--bench", str(small_world / "bench"), "--sound", "1")
    decoded, cut, gain = out.strip().splitlines()[-3:]
    fill = json.loads((adapter_export / "vaemo_config.json").read_text())["audio_fill"]
    assert decoded.startswith("soundtracks as decoded") and cut.startswith(f"first 1 s, then {fill}")
    for line in (decoded, cut):
        scores = [float(line.split(word)[1].split()[0]) for word in ("content", "emotion", "arousal error")]
        assert all(0.0 <= score <= 2.0 for score in scores), line
    assert gain.startswith(f"audio emotion gained from a cut and filled soundtrack ({fill}): ")


def test_data_throughput_benchmark_alternates_pipeline_and_ceiling_legs(small_world):
    shards = str(small_world / "train" / "*.tar")
    stdout = run_bench("data_throughput.py", "--shards", shards, "--legs", "2", "--batches", "2", "--batch-size", "4")
    ratio_line = next(line for line in stdout.splitlines() if line.startswith("ratio"))
    assert float(ratio_line.split()[2]) > 0 and "over 2 alternating legs, 16 clips each side" in ratio_line
    split = next(line for line in stdout.splitlines() if line.startswith("where the time goes"))
    assert "decoding alone" in split and "loader workers" in split


@pytest.mark.slow
def test_the_eval_pool_benchmark_scores_several_exports_both_ways_alike(stage0_export, adapter_export, small_world):
    out = run_bench(
        "eval_pool.py",
        *("--model", str(stage0_export), str(adapter_export)),
        *("--bench", str(small_world / "bench"), "--rounds", "1", "--max-items", "24"),
        timeout=600,
    )
    summary = out.strip().splitlines()[-1]  # the script exits non-zero when the two ways' reports differ
    assert summary.startswith("summary: 2 exports x 1 benches, one pool / a pool per export = "), summary
    assert summary.endswith("same reports: yes") and float(summary.split(" = ")[1].split()[0]) > 0
