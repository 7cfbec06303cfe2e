"""The benchmarks' code paths, quickly: the GPU benchmark on a shrunken model on the CPU, with only what the
GPU machine has; the stage-1 step benchmark on one tiny step (its figures are in the README, not asserted)."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT

SMOKE = ["--smoke", "--clips", "2", "--frames", "4", "--size", "56", "--audio-seconds", "2", "--steps", "1", "--topk", "8"]


def test_gpu_stage1_benchmark_runs_and_prints_one_summary_line():
    result = subprocess.run(
        ["bash", str(ROOT / "bench/gpu_stage1.sh"), *SMOKE], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("GPU_STAGE1 cpu (smoke") and "tok/s" in last and "MFU" in last
    assert "| sdpa packed " in last and "| sdpa " in last  # SDPA timed with and without prefix packing


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
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench/stage1_step.py"),
            "--presets",
            "tiny",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--batch",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("tiny: online ") and "ratio cache/online" in last
