"""Shared fixtures: a small synthetic world written once per test session, and environment defaults."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# No hub is reachable here; tests must never try. Local Ray clusters run without token auth.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/signal_checks.py and friends

SMALL_WORLD = dict(train_clips=48, val_clips=16, bench_clips=16, clips_per_shard=12, size=128, fps=12,
                   min_duration=2.0, max_duration=3.0, sample_rate=16000)


@pytest.fixture(scope="session")
def small_world(tmp_path_factory) -> Path:
    """train: 4 shards x 12 clips, val: 2 shards x 8... (16 clips), bench: 16 clips x 6 questions."""
    from vaemo.data.synth import synthesize

    out = tmp_path_factory.mktemp("world")
    synthesize(out, seed=0, workers=2, **SMALL_WORLD)
    return out


def cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 600):
    """Run the `vaemo` console script of this venv; returns the CompletedProcess."""
    import subprocess

    exe = Path(sys.executable).parent / "vaemo"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=cwd or ROOT,
                          env={**os.environ, **(env or {})}, timeout=timeout)
