"""Data as users have it: clips with no labels train stage 1; data a stage cannot use stops the run with one
line (never a hang)."""

from __future__ import annotations

import json
import socket
import tarfile

import pytest
from conftest import metrics, rewrite_shards, run, stage_cmd

from vaemo.data.decode import DecodeSpec
from vaemo.data.stream import NoUsableData, TrainStream, expand_shards, make_loader


def test_a_stream_that_cannot_fill_a_batch_gives_up_with_the_counts(unlabeled):
    """Through a DataLoader worker process, as training reads it: bounded reads, one line, no hang."""
    from vaemo.train.trainer import named_stream

    spec = DecodeSpec(num_frames=2, height=28, width=28, need_fields=("emotion",))
    stream = TrainStream(expand_shards(str(unlabeled / "train" / "*.tar")), spec, 2, seed=0, shuffle_buffer=4, give_up_after=30)
    with pytest.raises(NoUsableData) as err:
        next(named_stream(iter(make_loader(stream, 1)), "stage 2: data.train_shards", rank=1))
    line = NoUsableData.line_in(str(err.value))
    # the rank and its node: ranks read disjoint shards, and a node may see other files than the driver
    where = f"read by rank 1 on node {socket.gethostname()}"
    assert line == f"stage 2: data.train_shards: 0 usable of 30 samples read: missing_field 30; {where}"


def test_the_preflight_finds_a_worker_whose_shards_hold_nothing_usable(small_world, tmp_path):
    """Usable clips in the split, but none in the shards one rank validates on: that rank would stop the run at
    its first validation (hours in, on a real schedule), so the preflight probes each worker's share too; and
    each training loader worker's, where they read shards of their own."""
    import shutil

    import webdataset as wds
    from conftest import ROOT

    from vaemo.config import load_config
    from vaemo.errors import UserError
    from vaemo.train.launch import probe_data

    val = sorted((small_world / "val").glob("*.tar"))
    shutil.copy(val[1], tmp_path / "val-000001.tar")
    with wds.TarWriter(str(tmp_path / "val-000000.tar")) as broken:
        for i in range(3):
            broken.write({"__key__": f"broken-{i}", "mp4": b"not a video" * 50, "json": json.dumps({"caption": "x"}).encode()})
    train = [str(p) for p in sorted((small_world / "train").glob("*.tar"))]
    val_urls = [str(tmp_path / "val-000000.tar"), str(tmp_path / "val-000001.tar")]
    one_worker = load_config(ROOT / "configs/tiny.yaml", ["scaling.num_workers=1"], stage=0)
    probe_data(one_worker, train, val_urls)  # the one worker reads both shards: usable clips
    two_workers = load_config(ROOT / "configs/tiny.yaml", ["scaling.num_workers=2"], stage=0)
    with pytest.raises(UserError) as err:
        probe_data(two_workers, train, val_urls)
    assert str(err.value) == (
        f"stage 0: data.val_shards: the 1 shard(s) worker 0 reads, e.g. {val_urls[0]}: 0 usable of 3 samples read: corrupt_clip 3"
    )

    train_with_broken = [train[0], train[1], val_urls[0], train[3]]
    shared = load_config(ROOT / "configs/tiny.yaml", ["scaling.num_workers=1", "data.loader_workers=2"], stage=0)
    probe_data(shared, train_with_broken, val_urls[1:])  # each loader worker reads a good shard beside the broken one
    own = load_config(ROOT / "configs/tiny.yaml", ["scaling.num_workers=1", "data.loader_workers=4"], stage=0)
    with pytest.raises(UserError) as err:
        probe_data(own, train_with_broken, val_urls[1:])
    assert str(err.value).startswith(
        f"stage 0: data.train_shards: the 1 shard(s) worker 0 (its loader worker 2) reads, e.g. {val_urls[0]}:"
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage,world,expected",
    [
        (0, "unlabeled", "stage 0: data.train_shards: 0 usable of 48 samples read: missing_field 48"),
        (2, "unlabeled", "stage 2: data.train_shards: 0 usable of 48 samples read: missing_field 48"),
        (1, "silent", "stage 1: data.train_shards: 0 usable of 48 samples read: no_audio_stream 48"),
        (2, "unlabeled-val", "stage 2: data.val_shards: 0 usable of 16 samples read: missing_field 16"),
    ],
)
def test_each_stage_stops_with_one_line_on_data_it_cannot_use(small_world, unlabeled, tmp_path, stage, world, expected):
    if world == "silent":
        shards = [f"data.train_shards={rewrite_shards(small_world / 'train', tmp_path / 'silent', True, True)}/*.tar"]
    elif world == "unlabeled":
        shards = [f"data.train_shards={unlabeled}/train/*.tar"]
    else:  # good training shards, validation shards the stage cannot use
        shards = [f"data.val_shards={unlabeled}/val/*.tar"]
    result = run(stage_cmd(stage, tmp_path / "run", small_world, *shards), timeout=180)
    assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-2000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {expected}"], result.stderr[-2000:]


@pytest.mark.slow
def test_stage1_trains_from_a_teacher_cache_written_for_clips_without_any_label(stage1_on_unlabeled_clips):
    """The teacher writes each response from the frames (stage1.responses=auto, no caption anywhere). The online
    teacher does the same on unlabelled real clips in tests/test_real_format.py."""
    cache, run_dir = stage1_on_unlabeled_clips.cache, stage1_on_unlabeled_clips.run
    manifest = json.loads((cache / "teacher-cache.json").read_text())
    assert manifest["cached"] == 48 + 16
    with tarfile.open(sorted(cache.glob("*.tar"))[0]) as tar:
        record = json.loads(tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith(".teacher.json"))).read())
    # the response the teacher wrote (a 4-step model may end it at once) is stored with its top-k positions
    assert isinstance(record["sequences"][0][1], str) and record["lengths"][0] >= 1
    records = metrics(run_dir)
    assert records[-1]["step"] == 4 and records[-1]["kd"] > 0 and "val_loss" in records[-1]
    assert not any(k.startswith("skip/") for k in records[-1])
