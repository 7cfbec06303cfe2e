"""The GPU benchmark's code path, on a shrunken model on the CPU, with only what the GPU machine has."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT

SMOKE = ["--smoke", "--clips", "2", "--frames", "4", "--size", "56", "--audio-seconds", "2", "--steps", "1",
         "--topk", "8"]


def test_gpu_stage1_benchmark_runs_and_prints_one_summary_line():
    result = subprocess.run(["bash", str(ROOT / "bench/gpu_stage1.sh"), *SMOKE], capture_output=True, text=True,
                            timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("GPU_STAGE1 cpu (smoke") and "tok/s" in last and "MFU" in last


def test_the_gpu_benchmark_needs_neither_ray_deepspeed_nor_the_data_stack():
    probe = ("import runpy, sys; sys.argv = ['gpu_stage1.py', *sys.argv[1:]]\n"
             "try:\n    runpy.run_path('bench/gpu_stage1.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in ('ray', 'deepspeed', 'torchcodec', 'webdataset') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe, *SMOKE], capture_output=True, text=True, timeout=300,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
