"""Shared fixtures: a small synthetic world written once per test session, and environment defaults."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from vaemo.data.synth import Ranges

# No hub is reachable here; tests must never try. Local Ray clusters run without token auth.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
RAY_CLI = str(Path(sys.executable).parent / "ray")  # the venv's, beside the interpreter running the tests
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/signal_checks.py and friends

# The spec's whole range of sizes, rates and containers, with the tiny preset's 2-3 s durations.
SMALL_WORLD = dict(train_clips=48, val_clips=16, bench_clips=16, clips_per_shard=12, ranges=Ranges(duration=(2.0, 3.0)))


@pytest.fixture(scope="session")
def small_world(tmp_path_factory) -> Path:
    """train: 4 shards x 12 clips, val: 2 shards x 8... (16 clips), bench: 16 clips x 6 questions."""
    from vaemo.data.synth import synthesize

    out = tmp_path_factory.mktemp("world")
    synthesize(out, seed=0, workers=2, **SMALL_WORLD)
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SharedRayHead:
    """One `ray start --head` that the slow tests' runs join through RAY_ADDRESS, as jobs on a cluster do.

    Starting and stopping a local Ray costs each run 5-9 s on 2 cores, and the slow tests make about forty
    runs. The quick tests keep starting a local Ray of their own, so that path stays tested. A test that
    runs `ray stop --force` (it stops every Ray on the machine) takes this head down; the next slow test
    starts it again.
    """

    address: str | None = None
    tmp: str | None = None

    def alive(self) -> bool:
        import socket

        if self.address is None:
            return False
        host, port = self.address.split(":")
        with socket.socket() as s:
            return s.connect_ex((host, int(port))) == 0

    def ensure(self) -> str:
        import subprocess
        import tempfile

        if not self.alive():
            port = free_port()
            # Private (Ray helpers that look clusters up find this one) and short (Ray's sockets live in it)
            tmp = tempfile.mkdtemp(prefix="vaemo-ray-head-")
            started = subprocess.run(
                [RAY_CLI, "start", "--head", f"--num-cpus={os.cpu_count()}"]
                + [f"--port={port}", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1"]
                + [f"--dashboard-port={free_port()}", "--disable-usage-stats"],
                capture_output=True,
                text=True,
                timeout=120,
                env={**os.environ, "RAY_TMPDIR": tmp},
            )
            assert started.returncode == 0, started.stderr[-3000:]
            self.address, self.tmp = f"127.0.0.1:{port}", tmp
        return self.address

    def stop(self) -> None:
        import subprocess

        if self.alive():  # `ray stop` has no address: it stops every Ray on the machine
            subprocess.run([RAY_CLI, "stop", "--force"], capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def shared_ray_head():
    head = SharedRayHead()
    yield head
    head.stop()


@pytest.fixture(autouse=True)
def slow_tests_join_one_ray_head(request, monkeypatch):
    """Slow tests (end-to-end runs) join the session's Ray head; see SharedRayHead. A test that starts a
    cluster of its own gets the machine to itself (two heads' dashboard agents would want one port)."""
    if request.node.get_closest_marker("slow") is None:
        return
    head = request.getfixturevalue("shared_ray_head")
    if request.node.get_closest_marker("own_ray_cluster"):
        head.stop()
        return
    monkeypatch.setenv("RAY_ADDRESS", head.ensure())
    monkeypatch.setenv("RAY_TMPDIR", head.tmp)


def bench_clip(world: Path, index: int) -> Path:
    """The media file of bench clip `index` (its container varies: the world spans the spec's)."""
    return next(p for p in sorted((world / "bench" / "media").glob(f"clip-{index:05d}.*")) if p.suffix != ".json")


def cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 600):
    """Run the `vaemo` console script of this venv; returns the CompletedProcess."""
    import subprocess

    exe = Path(sys.executable).parent / "vaemo"
    return subprocess.run(
        [str(exe), *args], capture_output=True, text=True, cwd=cwd or ROOT, env={**os.environ, **(env or {})}, timeout=timeout
    )


# The 7B preset shrunk to a two-step bf16 run of two CPU workers (with tiny checkpoints in the hub's layout).
SEVEN_B_ON_CPU = [
    "data.num_frames=4",
    "data.frame_height=56",
    "data.batch_size=2",
    "data.loader_workers=1",
    "scaling.num_workers=2",
    "scaling.use_gpu=false",
    "scaling.cpus_per_worker=1",
    "train.max_steps=2",
    "train.checkpoint_every=2",
    "train.val_every=2",
    "train.val_batches=1",
    "train.report_every=1",
    "train.warmup_steps=1",
    "model.dtype=bfloat16",
]


def teacher_cache_cmd(cache: Path, *overrides: str) -> list[str]:
    """jobs/teacher_cache.py on the tiny preset with 2 actors, writing CACHE."""
    job, tiny = str(ROOT / "jobs/teacher_cache.py"), str(ROOT / "configs/tiny.yaml")
    return [sys.executable, job, "--config", tiny, "--out", str(cache), "--actors", "2", *overrides]


# For runs whose subject is not distribution: one Ray Train worker starts about 10 s sooner than two on 2 cores.
ONE_WORKER = "scaling.num_workers=1"


def stage_cmd(stage: int, out: Path, world: Path, *overrides: str) -> list[str]:
    """jobs/stageN.py on the small world with a few steps, under ZeRO-3 (the cluster's setting, whatever the
    tiny preset uses); overrides come last and win."""
    return [
        sys.executable,
        str(ROOT / f"jobs/stage{stage}.py"),
        "--config",
        str(ROOT / "configs/tiny.yaml"),
        "--out",
        str(out),
        f"data.train_shards={world}/train/*.tar",
        f"data.val_shards={world}/val/*.tar",
        "data.batch_size=4",
        "train.max_steps=4",
        "train.report_every=1",
        "train.checkpoint_every=2",
        "train.val_batches=1",
        "train.warmup_steps=1",
        f"deepspeed.config={ROOT / 'ds_configs/zero3.json'}",
        *overrides,
    ]


def run(cmd: list[str], env: dict | None = None, timeout: float = 420):
    import subprocess

    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})


def metrics(run_dir: Path) -> list[dict]:
    """The records of a run's metrics.jsonl."""
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def ok(result):
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-6000:])
    return result


@pytest.fixture(scope="session")
def stage0_export(small_world, tmp_path_factory) -> Path:
    """A stage-0 run of a few steps on the small world (real Ray Train + DeepSpeed); its export."""
    out = tmp_path_factory.mktemp("stage0")
    ok(run(stage_cmd(0, out, small_world, "stage0.vision_warmup_steps=2")))
    return out / "export"


def rewrite_shards(src: Path, dst: Path, keep_json: bool = False, strip_audio: bool = False) -> Path:
    """Copies of `src`'s shards whose samples are the clip alone (an independent writer of the format),
    optionally with the soundtrack removed."""
    import io
    import subprocess
    import tarfile

    dst.mkdir(parents=True, exist_ok=True)
    for shard in sorted(src.glob("*.tar")):
        with tarfile.open(shard) as source, tarfile.open(dst / shard.name, "w") as target:
            for member in source.getmembers():
                data = source.extractfile(member).read()
                if member.name.endswith(".json") and not keep_json:
                    continue
                if not member.name.endswith(".json") and strip_audio:  # any container: the film alone, as mp4
                    data = subprocess.run(
                        [
                            "ffmpeg",
                            "-loglevel",
                            "error",
                            "-i",
                            "pipe:0",
                            "-an",
                            "-c:v",
                            "libx264",
                            "-f",
                            "mp4",
                            "-movflags",
                            "frag_keyframe+empty_moov",
                            "pipe:1",
                        ],
                        input=data,
                        capture_output=True,
                        check=True,
                    ).stdout
                    member.name = member.name.rsplit(".", 1)[0] + ".mp4"
                info = tarfile.TarInfo(member.name)
                info.size = len(data)
                target.addfile(info, io.BytesIO(data))
    return dst


@pytest.fixture(scope="session")
def unlabeled(small_world, tmp_path_factory) -> Path:
    """The small world's train and val shards with every label gone: clips as a user has them."""
    root = tmp_path_factory.mktemp("unlabeled")
    for split in ("train", "val"):
        rewrite_shards(small_world / split, root / split)
    return root


@dataclass
class CachedStage1:
    cache: Path  # the teacher cache jobs/teacher_cache.py wrote
    run: Path  # the stage-1 run that read it
    stdout: str  # the run's driver output


@pytest.fixture(scope="session")
def stage1_on_unlabeled_clips(unlabeled, stage0_export, tmp_path_factory) -> CachedStage1:
    """Stage 1 as make demo runs it, on clips without any label: the frozen stage-0 teacher's answers written
    once by the actor pool, then read back by one worker (tests/test_train.py's stage chain and
    tests/test_user_data.py check it; one run serves both, since each run costs about 45 s of start-up)."""
    root = tmp_path_factory.mktemp("stage1-unlabeled")
    common = [
        f"model.init_from={stage0_export}",
        f"data.train_shards={unlabeled}/train/*.tar",
        f"data.val_shards={unlabeled}/val/*.tar",
        "data.batch_size=4",
        "stage1.topk=8",
        "stage1.teacher_response_tokens=8",
    ]
    cache, run_dir = root / "teacher-cache", root / "stage1"
    ok(run(teacher_cache_cmd(cache, *common)))
    cached = ["stage1.teacher.mode=cache", f"stage1.teacher.cache_dir={cache}"]
    result = ok(run(stage_cmd(1, run_dir, unlabeled, *common, *cached, ONE_WORKER)))
    return CachedStage1(cache, run_dir, result.stdout)


@pytest.fixture(scope="session")
def adapter_export(tmp_path_factory) -> Path:
    """An untrained tiny model with an Emotion Enhancer and Supervisor, saved as an export."""
    from vaemo.config import load_config
    from vaemo.model import build_model

    cfg = load_config(ROOT / "configs/tiny.yaml", stage=2)
    model = build_model(cfg.model, cfg.data, seed=0)
    model.add_enhancer(64, 0.0)
    model.add_supervisor(32, ["joy", "calm", "anger", "sadness"])
    out = tmp_path_factory.mktemp("adapter") / "export"
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Tiny folders shaped like Qwen2.5-VL-7B-Instruct and whisper-large-v3 (tests/hf_checkpoints.py)."""
    from hf_checkpoints import write_qwen25_vl, write_whisper

    root = tmp_path_factory.mktemp("checkpoints")
    return {"vlm": write_qwen25_vl(root / "Qwen2.5-VL-7B-Instruct"), "audio": write_whisper(root / "whisper-large-v3")}
