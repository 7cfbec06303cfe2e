"""The offline teacher cache: same targets as the online teacher, stale caches refused. Stage 1 trains from a
cache the actor pool wrote for unlabelled clips in tests/conftest.py (stage1_on_unlabeled_clips), which the stage
chain in tests/test_train.py and tests/test_user_data.py check."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, run, stage_cmd

from vaemo.cache_fingerprint import fingerprint
from vaemo.config import load_config
from vaemo.data.decode import decode_sample
from vaemo.data.stream import collate
from vaemo.data.tars import read_shard
from vaemo.data.teacher_records import MANIFEST, cache_shard_for, with_cache
from vaemo.losses import distill, teacher_topk
from vaemo.model import PromptItem, build_model
from vaemo.teacher_cache import build_cache
from vaemo.train.objectives import AlignObjective

TOPK = 8


def tiny_stage1(world: Path, *overrides: str):
    return load_config(
        ROOT / "configs/tiny.yaml",
        [
            f"data.train_shards={world}/train/*.tar",
            f"data.val_shards={world}/val/*.tar",
            "data.batch_size=4",
            f"stage1.topk={TOPK}",
            *overrides,
        ],
        stage=1,
    )


@pytest.fixture(scope="module")
def cache_dir(small_world, tmp_path_factory) -> Path:
    """The teacher cache of one training shard, written in-process by a fresh tiny model."""
    out = tmp_path_factory.mktemp("teacher-cache")
    shard = sorted((small_world / "train").glob("*.tar"))[0]
    build_cache(tiny_stage1(small_world), [str(shard)], out, actors=0)
    return out


def test_cache_layout_and_manifest(small_world, cache_dir):
    shard = sorted((small_world / "train").glob("*.tar"))[0]
    manifest = json.loads((cache_dir / MANIFEST).read_text())
    assert manifest["fingerprint"] == fingerprint(tiny_stage1(small_world))[0]
    assert manifest["shards"][shard.name]["cached"] == 12
    names = Counter(item["__key__"] for item in read_shard(cache_shard_for(str(shard), str(cache_dir))))
    source_keys = {item["__key__"] for item in read_shard(str(shard))}
    assert set(names) == source_keys


def test_a_cache_shard_written_where_the_driver_cannot_see_it_stops_the_cache(cache_dir, tmp_path):
    """An actor on a node whose --out is not the shared folder reports a shard the driver cannot read: the
    manifest would have listed it as cached."""
    from vaemo.errors import UserError
    from vaemo.teacher_cache import check_driver_sees

    written = next(cache_dir.glob("*.tar"))
    check_driver_sees({"path": str(written), "node": "gpu-3"})
    with pytest.raises(UserError, match=r"written on node gpu-3 \(.*elsewhere.tar\) is not there on this node: --out"):
        check_driver_sees({"path": str(tmp_path / "elsewhere.tar"), "node": "gpu-3"})


def test_cached_and_online_topk_losses_agree(small_world, cache_dir):
    cfg = tiny_stage1(small_world, "stage1.teacher.mode=cache", f"stage1.teacher.cache_dir={cache_dir}")
    objective = AlignObjective(cfg)
    shard = str(sorted((small_world / "train").glob("*.tar"))[0])
    raw = [s for s in with_cache(read_shard(shard), cache_shard_for(shard, str(cache_dir)))][:4]
    cached_batch = collate([decode_sample(s, objective.decode_spec()) for s in raw], 0, 4, Counter())
    online_spec = AlignObjective(tiny_stage1(small_world)).decode_spec()
    video_batch = collate([decode_sample(s, online_spec) for s in raw], 0, 4, Counter())
    assert cached_batch.video is None and len(cached_batch.teacher) == 4  # cache mode decodes no frames

    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data, seed=cfg.seed).eval()
    step = objective.prepare(model, cached_batch, np.random.default_rng(0))
    assert set(step.passes) == {"student"}

    # The online teacher on the very same prompts and clips.
    items = [PromptItem("visual", p, r, i) for i, rec in enumerate(cached_batch.teacher) for p, r in rec.sequences]
    teacher_inputs = model.prompts.batch(items, video_batch.video, None, video_batch.duration)
    with torch.no_grad():
        hidden = model(teacher_inputs).hidden[teacher_inputs.pred_mask]
        online = teacher_topk(hidden, model.logits, TOPK, cfg.stage1.temperature, 16)
    assert torch.equal(online.ids, step.labels["ids"])
    assert torch.allclose(online.logprobs, step.labels["logprobs"], atol=1e-5)

    _, cached_kd = objective.kd(model, step, "teacher", "student")
    student = step.passes["student"]
    student_hidden = model(student).hidden[student.pred_mask]
    online_kd = distill(student_hidden, model.logits, online, cfg.stage1.temperature, 16)
    assert cached_kd.count == online_kd.count > 0
    per_token = abs(float(cached_kd.kl_sum.detach()) - float(online_kd.kl_sum.detach())) / online_kd.count
    assert per_token < 1e-5, per_token
    assert float(online_kd.kl_sum.detach()) > 0  # a fresh student disagrees with the teacher: the check has teeth


def test_stale_or_missing_cache_is_refused(small_world, cache_dir, tmp_path):
    base = stage_cmd(1, tmp_path / "run", small_world, "stage1.teacher.mode=cache", "train.val_batches=0")
    stale = run(base + [f"stage1.teacher.cache_dir={cache_dir}", f"stage1.topk={TOPK * 2}"], timeout=120)
    assert stale.returncode == 2, stale.stderr[-2000:]
    assert "stale teacher cache" in stale.stderr and "topk" in stale.stderr
    uncovered = run(base + [f"stage1.teacher.cache_dir={cache_dir}", f"stage1.topk={TOPK}"], timeout=120)
    assert uncovered.returncode == 2 and "does not cover shard" in uncovered.stderr
    missing = run(base + [f"stage1.teacher.cache_dir={tmp_path / 'nowhere'}", f"stage1.topk={TOPK}"], timeout=120)
    assert missing.returncode == 2 and "teacher-cache.json" in missing.stderr


def test_a_cache_written_for_another_audio_window_is_stale(tmp_path):
    """The teacher's frames come from the clip's audio window: a cache written with 2 s windows showed the
    teacher other stretches of a long clip than a 3 s student hears (it used to be taken as current)."""
    from vaemo.cache_fingerprint import check_cache
    from vaemo.errors import UserError

    two = load_config(ROOT / "configs/tiny.yaml", ["data.audio_seconds=2", f"stage1.teacher.cache_dir={tmp_path}"], stage=1)
    three = load_config(ROOT / "configs/tiny.yaml", ["data.audio_seconds=3", f"stage1.teacher.cache_dir={tmp_path}"], stage=1)
    key, parts = fingerprint(two)
    assert key != fingerprint(three)[0]
    (tmp_path / MANIFEST).write_text(json.dumps({"fingerprint": key, "parts": parts}))
    check_cache(two, [])
    with pytest.raises(UserError, match="stale teacher cache .* another frames.audio_seconds"):
        check_cache(three, [])


def test_the_demo_writes_its_teacher_cache_once_and_again_only_for_another_teacher(small_world, tmp_path):
    from vaemo.demo import stage1_teacher_cache

    preset = str(ROOT / "configs/tiny.yaml")
    common = [
        f"data.train_shards={small_world}/train/*.tar",
        f"data.val_shards={small_world}/val/*.tar",
        "data.batch_size=4",
        f"stage1.topk={TOPK}",
    ]
    switches = stage1_teacher_cache(tmp_path, preset, common, fresh=False, actors=0)
    manifest = tmp_path / "teacher-cache" / MANIFEST
    first = json.loads(manifest.read_text())
    assert first["cached"] == 48 + 16  # every train and val clip
    cfg = load_config(preset, [*common, *switches], stage=1)  # what stage 1 then runs with
    assert cfg.stage1.teacher.mode == "cache" and Path(cfg.stage1.teacher.cache_dir) == tmp_path / "teacher-cache"
    assert first["fingerprint"] == fingerprint(cfg)[0]

    written = manifest.stat().st_mtime_ns
    assert stage1_teacher_cache(tmp_path, preset, common, fresh=False, actors=0) == switches
    assert manifest.stat().st_mtime_ns == written  # the same teacher: reused, not rewritten

    stage1_teacher_cache(tmp_path, preset, [*common, "stage1.temperature=2.0"], fresh=False, actors=0)
    second = json.loads(manifest.read_text())
    assert second["fingerprint"] != first["fingerprint"] and second["cached"] == 48 + 16


def test_the_demo_asks_for_a_top_k_before_writing_a_cache(tmp_path):
    from vaemo.demo import stage1_teacher_cache
    from vaemo.errors import UserError

    with pytest.raises(UserError, match=r"stage1.topk.*--stage1-teacher online"):
        stage1_teacher_cache(tmp_path, str(ROOT / "configs/tiny.yaml"), ["stage1.topk=0"], fresh=False, actors=0)
    assert not (tmp_path / "teacher-cache").exists()
