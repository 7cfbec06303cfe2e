"""The distributed trainer for real: Ray Train workers running DeepSpeed ZeRO-3 engines on gloo, on the
tiny preset and the small synthetic world. Slow (each run starts Ray); CI runs them."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import webdataset as wds
from conftest import ONE_WORKER, RAY_CLI, ROOT, free_port, metrics, ok, run, stage_cmd
from safetensors.torch import load_file

from vaemo.config import load_config
from vaemo.model import VAEmotionLLM
from vaemo.train.checkpoint import find_checkpoint, missing_parts
from vaemo.train.trainer import learning_rate

pytestmark = pytest.mark.slow
PYTHON = sys.executable


def loss_by_step(*run_dirs: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for run_dir in run_dirs for r in metrics(run_dir)}


def weights(export: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(export.rglob("*.safetensors")):
        out.update({f"{file.relative_to(export)}:{k}": v for k, v in load_file(str(file)).items()})
    return out


def test_stages_chain_and_write_every_promised_output(small_world, stage0_export, stage1_on_unlabeled_clips, tmp_path):
    run0 = stage0_export.parent
    for name in ("metrics.jsonl", "config.yaml", "curves.png", "export/vaemo_config.json"):
        assert (run0 / name).exists(), name
    assert list((run0 / "tb").glob("events.out.tfevents.*"))
    assert [p.name for p in run0.glob("export*")] == ["export"]  # written beside, then renamed into place
    assert {p.name for p in (run0 / "checkpoints").glob("step-*")} == {"step-00000002", "step-00000004"}
    records = metrics(run0)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in ("loss", "aux", "samples_per_s", "tokens_per_s", "data_wait_s", "compute_s", "data_wait_frac", "lr"):
        assert key in records[0], key
    assert "lm" not in records[0] and "lm" in records[-1]  # vision warm-up (steps 1-2), then the LLM joins
    # Validation measures the objective the stage ends on: it ran its batches as step 0, inside the warm-up,
    # so stage 0's val_loss was its heads' alone and no val_lm was written.
    assert records[-1]["val_lm"] > 0 and records[-1]["val_loss"] > records[-1]["val_aux"] > 0

    # Stage 1 as make demo runs it (the teacher's answers written once by the actor pool, then read back), on
    # clips without any label; tests/test_user_data.py checks the cache. (The teacher running every step, the
    # default, is what the other tests here train with.)
    run1 = stage1_on_unlabeled_clips.run
    assert "stage1 step 4/4" in stage1_on_unlabeled_clips.stdout  # compact progress lines off a terminal
    assert "agreement" in metrics(run1)[-1]  # reported; what it counts: tests/test_losses.py
    assert "val_loss" in metrics(run1)[-1]
    # Stage 2 given paths relative to where the user runs (ROOT here), as users type them: Ray's workers run in
    # other directories. (Stage 2 on two ranks: test_zero3_ranks_stay_in_step...; an export of two ranks'
    # shards: test_a_failed_save...)
    run2 = tmp_path / "stage2"
    rel = lambda path: Path(os.path.relpath(path, ROOT))  # noqa: E731
    # A stage chooses its own answer length and system turn; they were taken from the export without a word.
    settings = ["model.lora.rank=2", "model.max_response_tokens=40", "model.system_prompt=Be brief."]
    ok(run(stage_cmd(2, rel(run2), rel(small_world), f"model.init_from={rel(run1 / 'export')}", *settings, ONE_WORKER)))
    recorded = json.loads((run2 / "export" / "vaemo_config.json").read_text())
    assert (recorded["max_response_tokens"], recorded["system_prompt"]) == (40, "Be brief.")
    last = metrics(run2)[-1]
    for key in (
        "lm",
        "kd",
        "va",
        "cat",
        "val_emotion_acc",
        "val_emotion_audio_acc",
        "val_emotion_visual_acc",
        "val_content_acc",
        "val_content_audio_acc",
        "val_objective",
    ):
        assert key in last, key
    model = VAEmotionLLM.from_pretrained(run2 / "export")
    assert model.enhancer is not None and model.supervisor is not None
    assert (run2 / "export" / "emo_adapter.safetensors").is_file() and (run2 / "export" / "lora.safetensors").is_file()
    assert (run1 / "export" / "audio_projector.safetensors").is_file()
    # stage 1 trained the projector and (the tiny preset's stage1.train_audio_encoder) the audio encoder;
    # the VLM equals the stage-0 export (whole, although a stage 1 that reads its teacher from a cache never
    # builds the vision tower on the workers)
    before, after = weights(stage0_export), weights(run1 / "export")
    assert after.keys() == before.keys()
    changed = {k.split(":")[0] for k in after if not torch.equal(after[k], before[k])}
    assert changed == {"audio_projector.safetensors", "audio_encoder/model.safetensors"}

    exported = tmp_path / "from-checkpoint"
    ok(run([str(Path(PYTHON).parent / "vaemo"), "export", "--checkpoint", str(run2 / "checkpoints"), "--out", str(exported)]))
    a, b = weights(run2 / "export"), weights(exported)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# What the three tests below compare against: one stage-1 run under ZeRO-3's defaults (frozen weights
# partitioned, frozen blocks fetched whole), with activation checkpointing, checkpoints at steps 3 and 6, and
# a record every 2 steps (so a resume from step 3 must carry step 3's statistics into the record of step 4).
# Each run costs about 45 s of fixed start-up on 2 cores, so they share it instead of starting their own.
SIX_STEPS = [
    "train.max_steps=6",
    "train.checkpoint_every=3",
    "train.report_every=2",
    "train.val_batches=0",
    "data.loader_workers=2",
    "model.activation_checkpointing=true",
]


@pytest.fixture(scope="module")
def six_step_run(small_world, stage0_export, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("six-steps") / "run"
    ok(run(six_step_variant(out, small_world, stage0_export)))
    return out


def six_step_variant(out: Path, small_world: Path, stage0_export: Path, *overrides: str) -> list[str]:
    return stage_cmd(1, out, small_world, f"model.init_from={stage0_export}", *SIX_STEPS, *overrides)


def test_replicated_frozen_weights_leave_zero3_and_train_the_same(small_world, stage0_export, six_step_run, tmp_path):
    """deepspeed.frozen_weights=replicated under ZeRO-3 on 2 workers: ZeRO-3 partitions only what trains
    (and small tensors it keeps whole anyway), the frozen VLM sits outside it, and the losses and the
    exported model are those of the partitioned run."""
    out = tmp_path / "replicated"
    ok(run(six_step_variant(out, small_world, stage0_export, "deepspeed.frozen_weights=replicated")))
    placements, losses, exports = {}, {}, {}
    for mode, run_dir in (("partitioned", six_step_run), ("replicated", out)):
        placements[mode] = json.loads((run_dir / "workers" / "rank0.json").read_text())
        losses[mode] = [r["loss"] for r in metrics(run_dir)]
        exports[mode] = weights(run_dir / "export")
    partitioned, replicated = placements["partitioned"], placements["replicated"]
    assert partitioned["replicated_frozen_numel"] == 0 and replicated["replicated_frozen_numel"] > 0
    # what ZeRO-3 gathers shrinks by exactly the frozen tensors taken out of it
    moved = partitioned["zero3_partitioned_numel"] - replicated["zero3_partitioned_numel"]
    assert moved == replicated["replicated_frozen_numel"]
    assert replicated["zero3_partitioned_numel"] < partitioned["zero3_partitioned_numel"] / 10
    assert len(losses["replicated"]) == 3
    assert losses["replicated"] == pytest.approx(losses["partitioned"], rel=1e-6, abs=1e-7)
    a, b = exports["partitioned"], exports["replicated"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)


def test_zero3_fetching_whole_blocks_trains_the_same_as_hooks_on_every_module(small_world, stage0_export, six_step_run, tmp_path):
    """deepspeed.leaf_modules (default auto: the blocks the transformers models never split) under ZeRO-3 on
    2 workers, with activation checkpointing: each frozen block's parameters come in one fetch, and the
    losses and the export are those of DeepSpeed's hooks on every module. The audio encoder's blocks train,
    so they keep the hooks."""
    out = tmp_path / "every-module"
    ok(run(six_step_variant(out, small_world, stage0_export, "deepspeed.leaf_modules=[]")))
    leaves, losses, exports = {}, {}, {}
    for name, run_dir in (("every module", out), ("blocks", six_step_run)):
        placement = json.loads((run_dir / "workers" / "rank0.json").read_text())
        leaves[name] = (placement["zero3_leaf_modules"], placement["zero3_trainable_blocks_hooked"])
        losses[name] = [r["loss"] for r in metrics(run_dir)]
        exports[name] = weights(run_dir / "export")
    assert leaves == {
        "every module": ([], []),
        "blocks": (["Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock"], ["WhisperEncoderLayer"]),
    }
    assert len(losses["blocks"]) == 3 and losses["blocks"] == pytest.approx(losses["every module"], rel=1e-6, abs=1e-7)
    a, b = exports["every module"], exports["blocks"]
    assert a.keys() == b.keys()
    # Adam divides each update by the root of its squared-gradient average, so where a gradient is nearly
    # zero the two paths' rounding moves a weight by a few 1e-6 (seen on 4 of 98,304 elements); a wrong fetch
    # or reduction moves weights by the learning rate's order (3e-3 per step).
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-5)


def test_resume_is_exact_and_a_checkpoint_missing_one_optimizer_shard_is_torn(small_world, stage0_export, six_step_run, tmp_path):
    """ZeRO-3 writes model and optimizer shards per rank; losing either, or a file cut short, makes the
    checkpoint unusable, and a resume from the run takes the previous complete one (step 3). The resumed
    steps 4-6 give the losses and the final weights of the straight six-step run exactly, and the records too:
    the one of step 4 covers steps 3 and 4 in both (before, a resume's first record left out the steps between
    the last report and the checkpoint).
    (`train.stop_after`, the other way a run stops early, is tested with the killed worker below.)"""
    out = tmp_path / "run"
    shutil.copytree(six_step_run, out)  # the shared run stays whole for the other tests
    last, previous = out / "checkpoints" / "step-00000006", out / "checkpoints" / "step-00000003"
    assert not missing_parts(last) and json.loads((last / "meta.json").read_text())["zero_stage"] == 3
    # A copy stopped midway (a preempted node) leaves the name and part of the file.
    state = last / "trainer_state_rank1.pt"
    whole = state.read_bytes()
    state.write_bytes(whole[: len(whole) // 2])
    assert missing_parts(last) == ["trainer_state_rank1.pt (cut short)"] and find_checkpoint(out) == previous
    state.write_bytes(b"")  # stopped before its first bytes
    assert missing_parts(last) == ["trainer_state_rank1.pt (cut short)"]
    state.write_bytes(whole)
    meta = (last / "meta.json").read_text()
    (last / "meta.json").write_text(meta[:10])
    assert missing_parts(last) == ["meta.json (cut short)"] and find_checkpoint(out) == previous
    (last / "meta.json").write_text(meta)
    shards = sorted((last / "ds").glob("*zero_pp_rank_1_*optim_states.pt"))
    assert len(shards) == 1
    shards[0].unlink()
    assert missing_parts(last) == ["ds/ optimizer shard of rank 1"]
    assert find_checkpoint(out) == previous
    resumed = tmp_path / "resumed"
    ok(run(six_step_variant(resumed, small_world, stage0_export) + ["--resume-from", str(out)]))
    straight = loss_by_step(six_step_run)
    assert sorted(straight) == [2, 4, 6]
    assert loss_by_step(resumed) == {step: straight[step] for step in (4, 6)}
    a, b = weights(six_step_run / "export"), weights(resumed / "export")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_resumed_launch_keeps_earlier_checkpoints_and_writes_over_no_later_one(
    small_world, stage0_export, six_step_run, tmp_path
):
    """Ray Train restores its record of an earlier launch's checkpoints from the run folder: a step folder
    deleted by hand made it refuse the folder ("corrupted run directory"), and a rollback in place made it
    prune the folders the new launch had just written. Each launch now starts Ray's record afresh."""
    from vaemo.train.checkpoint import read_meta

    out = tmp_path / "run"
    shutil.copytree(six_step_run, out)
    checkpoints = out / "checkpoints"
    rollback = run(six_step_variant(out, small_world, stage0_export) + ["--resume-from", str(checkpoints / "step-00000003")])
    assert rollback.returncode == 2, rollback.stderr[-2000:]
    assert "holds checkpoint(s) step-00000006, later than --resume-from" in rollback.stderr.splitlines()[-1]
    shutil.rmtree(checkpoints / "step-00000003")  # freeing disk by hand
    torn = checkpoints / "step-00000009"  # a later launch's copy stopped midway
    shutil.copytree(checkpoints / "step-00000006", torn)
    state = torn / "trainer_state_rank0.pt"
    state.write_bytes(state.read_bytes()[:100])
    resumed = ok(run(six_step_variant(out, small_world, stage0_export, "train.max_steps=9") + ["--resume-from", str(out)]))
    assert "resuming from " + str(checkpoints / "step-00000006") in resumed.stdout
    assert "removed incomplete checkpoint folder(s) the new steps reuse: step-00000009" in resumed.stdout
    assert {p.name for p in checkpoints.glob("step-*")} == {"step-00000006", "step-00000009"}
    assert not missing_parts(torn) and read_meta(torn)["launch_id"] != read_meta(checkpoints / "step-00000006")["launch_id"]


def test_an_export_stopped_midway_leaves_the_folder_as_it_was(tmp_path):
    """The export (gigabytes at 7B) was written in place: a run stopped while writing it left a folder with
    vaemo_config.json that loads, half of its weights missing."""
    from vaemo.train.trainer import write_into_place

    def write(files: dict[str, str], fail: bool = False):
        def into(folder: Path) -> None:
            folder.mkdir()
            for name, text in files.items():
                (folder / name).write_text(text)
                if fail:
                    raise KeyboardInterrupt  # stopped after its first file

        return into

    out = tmp_path / "export"
    with pytest.raises(KeyboardInterrupt):
        write_into_place(out, write({"vaemo_config.json": "{}", "weights": "w"}, fail=True))
    assert not out.exists()
    write_into_place(out, write({"vaemo_config.json": "{}", "weights": "old"}))
    with pytest.raises(KeyboardInterrupt):
        write_into_place(out, write({"vaemo_config.json": "{}", "weights": "new"}, fail=True))
    assert (out / "weights").read_text() == "old"  # the earlier whole export
    write_into_place(out, write({"vaemo_config.json": "{}", "weights": "new"}))
    assert (out / "weights").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["export"]


def test_a_trainer_state_that_would_run_code_is_refused(tmp_path):
    import pickle

    from vaemo.errors import UserError
    from vaemo.train.checkpoint import load_trainer_state, save_trainer_state

    save_trainer_state(tmp_path / "good.pt", 3, {"num_workers": 1, "positions": {0: 5}, "batches": 3, "skips": {}})
    assert load_trainer_state(tmp_path / "good.pt")["step"] == 3

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "ran"),))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"step": Payload()}))
    with pytest.raises(UserError, match="refusing to load it"):
        load_trainer_state(tmp_path / "evil.pt")
    assert not (tmp_path / "ran").exists()


def test_a_resume_that_would_read_other_data_says_so_and_other_workers_or_trained_parts_are_refused(tmp_path, capsys):
    """Resumed with another seed, batch size, shuffle buffer or shard list, the weights and step continue but
    the data does not (a line says so); other loader workers are refused before the model loads (each
    worker's place in the data is saved), where before each worker refused them after loading it."""
    from vaemo.config import load_config, render_config
    from vaemo.errors import UserError
    from vaemo.train.checkpoint import check_resume_matches, shard_list_digest

    cfg = load_config(ROOT / "configs/tiny.yaml", stage=1)
    urls = [f"/data/train-{i:03d}.tar" for i in range(4)]
    (tmp_path / "config.yaml").write_text(render_config(cfg))
    meta = {"loader_workers": cfg.data.loader_workers, "train_shards": shard_list_digest(urls), "train_shard_count": 4}
    check_resume_matches(cfg, tmp_path, meta, urls)
    assert capsys.readouterr().out == ""
    other = load_config(ROOT / "configs/tiny.yaml", ["seed=7", "data.shuffle_buffer=3"], stage=1)
    check_resume_matches(other, tmp_path, meta, [*urls, "/data/train-004.tar"])
    line = capsys.readouterr().out
    assert "seed=7 (the checkpoint's: 0)" in line and "data.shuffle_buffer=3" in line
    assert "another data.train_shards list (5 shard(s); the checkpoint's had 4)" in line and "not those an uninterrupted" in line
    with pytest.raises(UserError, match="written with data.loader_workers=5; resume with the same value"):
        check_resume_matches(cfg, tmp_path, {**meta, "loader_workers": 5}, urls)
    # other trained parameters: DeepSpeed would fail in every worker after the model loads, or train from
    # weights the checkpoint never held
    for changed, said in (
        ("stage1.train_audio_encoder=false", "trained with stage1.train_audio_encoder=True (now False)"),
        ("model.projector.hidden_size=64", "trained with model.projector.hidden_size="),
    ):
        with pytest.raises(UserError, match=re.escape(said)):
            check_resume_matches(load_config(ROOT / "configs/tiny.yaml", [changed], stage=1), tmp_path, meta, urls)
    # a field stage 1 does not train, and one a checkpoint of an older vaemo's config does not name
    check_resume_matches(load_config(ROOT / "configs/tiny.yaml", ["stage2.use_enhancer=false"], stage=1), tmp_path, meta, urls)
    older = "\n".join(line for line in render_config(cfg).splitlines() if "audio_encoder_top_layers:" not in line)
    (tmp_path / "config.yaml").write_text(older)
    check_resume_matches(cfg, tmp_path, meta, urls)
    elsewhere = load_config(ROOT / "configs/tiny.yaml", ["model.init_from=/elsewhere/export"], stage=1)
    check_resume_matches(elsewhere, tmp_path, meta, urls)
    assert "model.init_from='/elsewhere/export'" in capsys.readouterr().out


def test_nccl_and_cuda_settings_reach_the_workers_but_not_cuda_visible_devices(monkeypatch):
    from vaemo.train.launch import worker_env

    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "eth0")
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv("VAEMO_TEST_FLAG", "1")
    env = worker_env(load_config(ROOT / "configs/tiny.yaml"))
    assert env["NCCL_SOCKET_IFNAME"] == "eth0" and env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert env["VAEMO_TEST_FLAG"] == "1" and "CUDA_VISIBLE_DEVICES" not in env


def test_a_local_rays_folder_is_removed_once_it_has_stopped_but_the_newest_few(tmp_path):
    """Every command that starts a local Ray leaves its logs in a private temp folder: a few MB each, and
    hundreds after a few weeks. A folder whose Ray still answers, or that a Ray is starting in, stays."""
    import socket

    from vaemo.cluster import remove_stopped_local_rays

    def folder(name: str, address: str | None, age_s: float) -> Path:
        path = tmp_path / f"vaemo-ray-{name}"
        (path / "ray").mkdir(parents=True)
        if address is not None:
            (path / "ray" / "ray_current_cluster").write_text(address)
        os.utime(path, (time.time() - age_s, time.time() - age_s))
        return path

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        running = folder("running", f"127.0.0.1:{listening.getsockname()[1]}", age_s=10_000)
        stopped = [folder(f"stopped{i}", f"127.0.0.1:{free_port()}", age_s=1000 * (i + 1)) for i in range(5)]
        starting = folder("starting", None, age_s=5)
        failed = folder("failed", None, age_s=20_000)
        removed = remove_stopped_local_rays(tmp_path, keep=3)
    assert sorted(removed) == sorted([stopped[3], stopped[4], failed])  # the oldest stopped ones
    assert all(p.exists() for p in (running, starting, *stopped[:3])) and not any(p.exists() for p in removed)


def test_a_ray_address_that_cannot_be_joined_is_one_line(monkeypatch):
    from vaemo.cluster import connect_ray
    from vaemo.errors import UserError

    for address, message in [
        (f"127.0.0.1:{free_port()}", "no Ray cluster answers there"),  # ray.init would retry it for good
        ("http://127.0.0.1:8265", "is a dashboard (job submission) address"),  # what `ray job submit` takes
    ]:
        monkeypatch.setenv("RAY_ADDRESS", address)
        with pytest.raises(UserError, match=re.escape(message)):
            connect_ray()


def complete(folder) -> bool:
    try:
        return folder.is_dir() and not missing_parts(folder)
    except ValueError:  # meta.json caught half-copied
        return False


def test_a_failed_save_leaves_the_previous_checkpoint_loadable(small_world, stage0_export, tmp_path):
    """The storage refuses a checkpoint mid-run (a file stands where its folder must go, planted once step 2
    is saved): the stage fails in one line, the checkpoints saved before stay complete, a resume would take
    the newest of them, and its shards load (`vaemo export` reads every rank's; resuming from the newest
    complete checkpoint is tested above)."""
    crashed = tmp_path / "crashed"
    cmd = stage_cmd(
        1,
        crashed,
        small_world,
        f"model.init_from={stage0_export}",
        "train.max_steps=8",
        "scaling.max_failures=0",
        "train.val_batches=0",
    )
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    checkpoints = crashed / "checkpoints"
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not complete(checkpoints / "step-00000002"):
            time.sleep(0.02)  # Ray copies a checkpoint's files in no set order: meta.json may land first
        saved = [p for p in sorted(checkpoints.glob("step-*")) if p.is_dir() and not missing_parts(p)]
        for step in (4, 6, 8):  # every later save fails, so the failure comes whichever step the run is at
            blocker = checkpoints / f"step-{step:08d}"
            if not blocker.exists():
                blocker.write_text("not a folder")
        output, _ = proc.communicate(timeout=400)
    finally:
        proc.kill()
    assert proc.returncode == 1 and "stage 1 failed" in output, output[-3000:]
    assert saved and all(not missing_parts(p) for p in saved)
    assert find_checkpoint(crashed) == saved[-1]
    exported = tmp_path / "exported"
    ok(run([str(Path(PYTHON).parent / "vaemo"), "export", "--checkpoint", str(crashed / "checkpoints"), "--out", str(exported)]))
    before, after = weights(stage0_export), weights(exported)
    assert after.keys() == before.keys()
    assert any(not torch.equal(after[k], before[k]) for k in after)  # the trained audio pathway came back


def test_a_killed_worker_is_restarted_and_the_run_finishes(small_world, stage0_export, tmp_path):
    """Rank 1 is killed after step 7 (checkpoint at 5): Ray Train restarts the group from the checkpoint and
    the run ends where `train.stop_after` says, with its checkpoint, on the max_steps schedule."""
    out = tmp_path / "killed"
    cmd = stage_cmd(
        1,
        out,
        small_world,
        f"model.init_from={stage0_export}",
        "train.max_steps=30",
        "train.stop_after=16",
        "train.checkpoint_every=5",
        "train.report_every=1",
        "train.val_batches=0",
        "scaling.max_failures=2",
    )
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)

    def reported_past_checkpoint() -> bool:  # steps 6, 7 reported, checkpoint 5 saved: a restart must redo them
        done = (out / "checkpoints" / "step-00000005" / "meta.json").exists() and (out / "metrics.jsonl").exists()
        return done and any(r["step"] >= 7 for r in metrics(out))

    try:
        deadline = time.time() + 300
        while time.time() < deadline and not reported_past_checkpoint():
            time.sleep(0.05)
        victim = int((out / "workers" / "rank1.pid").read_text())
        os.kill(victim, signal.SIGKILL)
        output, _ = proc.communicate(timeout=400)
    finally:
        proc.kill()
    assert proc.returncode == 0, output[-4000:]
    records = metrics(out)
    steps = [r["step"] for r in records]
    assert steps[-1] == 16 and find_checkpoint(out).name == "step-00000016"
    # a restart from checkpoint 5 happened, and the steps it trained again (6, 7) are recorded once
    starts = [json.loads(line) for line in (out / "workers" / "starts.jsonl").read_text().splitlines()]
    assert [s["step"] for s in starts] == [0, 5] and starts[1]["checkpoint"].endswith("step-00000005")
    assert steps == sorted(set(steps)) and steps[:8] == list(range(1, 9))
    cfg = load_config(out / "config.yaml")
    assert records[-1]["lr"] == pytest.approx(learning_rate(cfg, 16)) and cfg.train.max_steps == 30
    assert learning_rate(cfg, 16) > learning_rate(cfg, 30)  # still mid-schedule: stopped, not shortened
    assert int((out / "workers" / "rank1.pid").read_text()) != victim


STALE_BATON_SCRIPT = """
import os, socket
from pathlib import Path
import torch.distributed
from torch.utils.cpp_extension import _get_build_directory
from vaemo.train.cpu_comm import skip_cpu_shm_op

build_dir = Path(_get_build_directory("deepspeed_shm_comm", verbose=False))
built = lambda: {p.name: p.stat().st_mtime_ns for p in build_dir.iterdir() if p.name != "lock"}
before = built()
baton = build_dir / "lock"
baton.touch()  # what a process killed inside torch's build lock leaves behind: a build would wait forever
try:
    skip_cpu_shm_op()
    import deepspeed
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="gloo")
    from deepspeed import comm
    print("shm op:", comm.comm.cdb.shm_comm_op)
    x = torch.ones(3)
    comm.all_reduce(x)
    print("all_reduce:", x.tolist())
finally:
    baton.unlink(missing_ok=True)
print("compiled:", built() != before)
"""


def test_a_build_lock_left_by_a_killed_process_does_not_hang_the_next_run():
    # DeepSpeed's JIT build of its shm op waits on a left-over lock file forever (a CI run hung so); the
    # workers never build that op, which training does not use.
    result = run([PYTHON, "-c", STALE_BATON_SCRIPT], timeout=300, env={"DS_ACCELERATOR": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "shm op: None" in result.stdout
    assert "all_reduce: [1.0, 1.0, 1.0]" in result.stdout
    assert "compiled: False" in result.stdout


def strict_zero3(tmp_path: Path) -> Path:
    """ZeRO-3 with every parameter partitioned: a rank that skipped a module would hang the others."""
    config = json.loads((ROOT / "ds_configs/zero3.json").read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path / "zero3_strict.json"
    path.write_text(json.dumps(config))
    return path


def test_zero3_ranks_stay_in_step_when_one_ranks_batch_lacks_audio(stage0_export, tmp_path):
    from vaemo.data.synth import Ranges, encode_clips, render_clip

    world = tmp_path / "world"
    for split in ("train", "val"):
        (world / split).mkdir(parents=True)
        for shard in range(2):  # rank 0 reads shard 0 (with soundtracks), rank 1 shard 1 (silent films)
            rendered = [
                render_clip(5, "train", 100 * shard + i + (1000 if split == "val" else 0), Ranges.corner(duration=(2.0, 2.5)))
                for i in range(6)
            ]
            clips = encode_clips([replace(media, audio=media.audio if shard == 0 else None) for media, _ in rendered])
            with wds.TarWriter(str(world / split / f"{split}-{shard}.tar"), encoder=False) as sink:
                for i, (clip, (_, meta)) in enumerate(zip(clips, rendered)):
                    sink.write({"__key__": f"s{shard}-{i}", "mp4": clip, "json": json.dumps(meta).encode()})
    out = tmp_path / "run"
    ok(
        run(
            stage_cmd(
                2,
                out,
                world,
                f"model.init_from={stage0_export}",
                f"deepspeed.config={strict_zero3(tmp_path)}",
                "data.loader_workers=1",
                "train.max_steps=3",
            ),
            timeout=300,
        )
    )
    info = {r: json.loads((out / "workers" / f"rank{r}.json").read_text()) for r in (0, 1)}
    assert all(s.endswith("-0.tar") for s in info[0]["shards_read"])
    assert all(s.endswith("-1.tar") for s in info[1]["shards_read"])
    assert metrics(out)[-1]["step"] == 3
    # what each worker chose for its device (on these CPU workers: SDPA, the preset's fp32)
    assert all((i["attention"], i["dtype"]) == ("sdpa", "float32") for i in info.values())


def ray_env() -> dict:
    return {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "PATH": f"{Path(PYTHON).parent}:{os.environ['PATH']}",
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    }


def ray_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([RAY_CLI, *args], capture_output=True, text=True, env=ray_env(), timeout=timeout, cwd=ROOT)


def start_head(port: int, dashboard: int) -> None:
    """`ray start --head` of one CPU on 127.0.0.1, as a cluster's head."""
    head = ray_cli(
        "start",
        "--head",
        "--num-cpus=1",
        f"--port={port}",
        f"--dashboard-port={dashboard}",
        "--dashboard-host=127.0.0.1",
        "--node-ip-address=127.0.0.1",
        "--disable-usage-stats",
    )
    assert head.returncode == 0, head.stderr


@pytest.mark.own_ray_cluster
def test_ray_job_submit_runs_a_stage_whose_workers_on_two_nodes_read_disjoint_shards(small_world, stage0_export, tmp_path):
    """`ray job submit` to a started head with a second node joined, as on a cluster: the stage's two workers,
    spread one per node, each read their own shards; its progress comes through the job's logs; a job with
    bad input fails with its one line. (Paths relative to where the user runs: the stage chain above.)"""
    port, dashboard = free_port(), free_port()
    start_head(port, dashboard)
    try:
        second = ray_cli(
            "start", f"--address=127.0.0.1:{port}", "--num-cpus=1", "--node-ip-address=127.0.0.1", "--disable-usage-stats"
        )
        assert second.returncode == 0, second.stderr
        out = tmp_path / "job"
        cmd = stage_cmd(
            1,
            out,
            small_world,
            f"model.init_from={stage0_export}",
            "scaling.placement_strategy=STRICT_SPREAD",
            "train.val_batches=0",
            "data.loader_workers=2",
        )
        submit = ["job", "submit", f"--address=http://127.0.0.1:{dashboard}", "--working-dir", str(ROOT)]
        submitted = ray_cli(
            *submit,
            "--runtime-env-json",
            json.dumps({"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}}),
            "--",
            "python",
            *cmd[1:],
            timeout=600,
        )
        assert submitted.returncode == 0, (submitted.stdout[-3000:], submitted.stderr[-3000:])
        assert "succeeded" in submitted.stdout
        assert "stage1 step 4/4" in submitted.stdout  # progress lines come through the job's logs
        assert (out / "export" / "vaemo_config.json").is_file() and metrics(out)[-1]["step"] == 4
        info = [json.loads((out / "workers" / f"rank{r}.json").read_text()) for r in (0, 1)]
        assert info[0]["node_id"] != info[1]["node_id"]
        assert info[0]["shards_read"] and info[1]["shards_read"]
        assert set(info[0]["shards_read"]).isdisjoint(info[1]["shards_read"])
        bad = ["jobs/stage1.py", "--out", str(tmp_path / "bad"), "data.train_shards=/nothing/*.tar"]
        failing = ray_cli(*submit, "--", "python", *bad)
        assert failing.returncode != 0 and "match no file" in failing.stdout + failing.stderr
    finally:
        ray_cli("stop", "--force")


def can_hide_a_folder_from_a_process() -> bool:
    """A private mount namespace (unshare -m) is allowed here: root in the container, or user namespaces."""
    return shutil.which("unshare") is not None and subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


@pytest.mark.own_ray_cluster
@pytest.mark.skipif(not can_hide_a_folder_from_a_process(), reason="needs unshare -m to start a node that lacks a mount")
def test_check_refuses_a_run_folder_another_node_cannot_see_and_one_inside_the_jobs_copy(small_world, stage0_export, tmp_path):
    """A second node started in a mount namespace where a folder is an empty tmpfs, as a node where the shared
    mount failed: `--check` names that node and the path, before any weight loads, instead of the workers
    failing at their first checkpoint; a folder both nodes see is ready. (A relative --out inside the job's
    copy of the project: test_an_output_inside_a_jobs_copy_of_the_project_is_refused.)"""
    port, dashboard = free_port(), free_port()
    shared = tmp_path / "shared"
    shared.mkdir()
    start_head(port, dashboard)
    try:
        join = f"{RAY_CLI} start --address=127.0.0.1:{port} --num-cpus=1 --node-ip-address=127.0.0.1 --disable-usage-stats"
        second = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", f"mount -t tmpfs tmpfs {shared} && exec {join}"],
            capture_output=True,
            text=True,
            env=ray_env(),
            timeout=120,
        )
        assert second.returncode == 0, second.stderr
        submit = ["job", "submit", f"--address=http://127.0.0.1:{dashboard}", "--working-dir", str(ROOT), "--", "python"]

        def check(out: str) -> subprocess.CompletedProcess:
            cmd = stage_cmd(1, Path(out), small_world, f"model.init_from={stage0_export}", "train.val_batches=0")
            return ray_cli(*submit, *cmd[1:], "--check", timeout=300)

        hidden = check(str(shared / "run"))
        # (the job's log, then ray's summary of the failed job, each show the driver's one line)
        lines = {line for line in (hidden.stdout + hidden.stderr).splitlines() if line.startswith("error:")}
        assert hidden.returncode != 0 and len(lines) == 1, (hidden.stdout[-3000:], hidden.stderr[-3000:])
        assert re.match(rf"error: node \S+ \(\S+\) cannot see --out '{re.escape(str(shared / 'run'))}' ", lines.pop())
        assert not list((shared / "run").iterdir())  # the driver's marker removed
        seen = check(str(tmp_path / "visible"))
        assert seen.returncode == 0 and "ready to train" in seen.stdout, (seen.stdout[-3000:], seen.stderr[-3000:])
    finally:
        ray_cli("stop", "--force")


@pytest.mark.parametrize(
    "args,message",
    [
        (["scaling.cpus_per_worker=8"], "the Ray cluster's nodes hold 0 of scaling.num_workers=2 workers of 8 CPU each"),
        (["data.train_shards=/nowhere/*.tar"], "match no file"),
        (["model.init_from=/nowhere/export"], "model.init_from '/nowhere/export' is not a vaemo export"),
        (["model.vlm=/nowhere/qwen"], "model.vlm '/nowhere/qwen' is not a checkpoint folder"),
        (["deepspeed.config=/nowhere.json"], "deepspeed.config '/nowhere.json' does not exist"),
        (["deepspeed.config=ACCUMULATE"], "gradient_accumulation_steps=2 is not supported"),
        (["deepspeed.config=MICRO"], "train_micro_batch_size_per_gpu=3 differs from data.batch_size=4"),
        # shapes the model cannot take: the workers failed on them (exit 1), after --check had said "ready"
        (["data.num_frames=7"], "data.num_frames=7 must be a multiple of the temporal patch size 2"),
        (["data.frame_height=50"], "frame size 50x112 must be a multiple of patch_size x spatial_merge_size = 28"),
        (["model.projector.pool_stride=200"], "model.projector.pool_stride=200 leaves no audio token"),
        (["model.init_from=EXPORT", "model.projector.pool_stride=8"], "model.projector.pool_stride=8 differs from the model"),
    ],
)
def test_preflight_errors_are_one_line_before_any_weight_loads(small_world, tmp_path, request, args, message):
    zero3 = json.loads((ROOT / "ds_configs/zero3.json").read_text())
    (tmp_path / "accumulate.json").write_text(json.dumps({**zero3, "gradient_accumulation_steps": 2}))
    (tmp_path / "micro.json").write_text(json.dumps({**zero3, "train_micro_batch_size_per_gpu": 3}))
    names = {"ACCUMULATE": tmp_path / "accumulate.json", "MICRO": tmp_path / "micro.json"}
    if any("EXPORT" in a for a in args):
        names["EXPORT"] = request.getfixturevalue("stage0_export")
    for name, value in names.items():
        args = [a.replace(name, str(value)) for a in args]
    result = run(stage_cmd(1, tmp_path / "x", small_world, *args), timeout=180)
    assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-2000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.stderr


def test_a_failed_run_ends_on_the_workers_exception_not_on_rays_header():
    from vaemo.train.launch import first_line

    report = (
        "Training failed due to worker errors:\n[Rank 0 Error Snippet]:\nTraceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n    raise ValueError(\nValueError: hidden_size must be divisible by num_heads\n'
    )
    assert first_line(RuntimeError(report)) == "ValueError: hidden_size must be divisible by num_heads"
    chained = report + "\nThe above exception was the direct cause of the following exception:\n\nTraceback (most recent "
    chained += "call last):\n  File ...\nvaemo.errors.TrainingError: the model could not be built\n"
    chained += "[Rank 1 Error Snippet]:\nOSError: another rank's"
    assert first_line(RuntimeError(chained)) == "vaemo.errors.TrainingError: the model could not be built"
    assert first_line(RuntimeError("the run stopped: an error in the loop\nmore")) == "the run stopped: an error in the loop"


def test_a_user_error_in_a_worker_is_its_one_line_and_exit_2(small_world, hf_checkpoints, tmp_path):
    """A checkpoint only loading can judge (weights of other sizes than its config.json) fails in the worker;
    the driver said only 'Training failed due to worker errors:' (exit 1), the cause deep in Ray's output."""
    import shutil

    resized = Path(shutil.copytree(hf_checkpoints["vlm"], tmp_path / "resized"))
    (resized / "config.json").write_text(
        json.dumps({**json.loads((resized / "config.json").read_text()), "intermediate_size": 96})
    )
    result = run(stage_cmd(1, tmp_path / "x", small_world, f"model.vlm={resized}", "scaling.max_failures=1"), timeout=300)
    assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-2000:])
    assert "not loading the model again" in result.stdout + result.stderr  # Ray's retry met the recorded error
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]  # Ray's own log lines aside
    assert len(errors) == 1 and errors[0].startswith("error: stage 1: ") and f"'{resized}' does not match its config" in errors[0]


def test_a_non_finite_loss_stops_every_rank_in_one_line_before_it_reaches_a_checkpoint(small_world, stage0_export, tmp_path):
    """A model gone bad (one NaN in the LLM's final norm of the export stage 1 starts from) gives a NaN loss on
    every rank: the run stops at that step, before the backward pass writes NaN into the weights, saves no
    checkpoint, and Ray's retry meets the recorded error instead of loading the model again."""
    from safetensors.torch import save_file

    bad = Path(shutil.copytree(stage0_export, tmp_path / "nan-export"))
    changed = 0
    for file in bad.rglob("*.safetensors"):
        tensors = load_file(str(file))
        for name in tensors:
            if name == "model.norm.weight":  # the LLM's last norm, in the hub's names
                tensors[name][0] = float("nan")
                changed += 1
        save_file(tensors, str(file), metadata={"format": "pt"})
    assert changed == 1
    result = run(stage_cmd(1, tmp_path / "run", small_world, f"model.init_from={bad}", "scaling.max_failures=1"), timeout=400)
    assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-2000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(
        "error: stage 1: the loss of step 1 is not finite on 2 rank(s) (their clips: rank 0: "
    )
    assert "not loading the model again" in result.stdout + result.stderr
    assert not list((tmp_path / "run" / "checkpoints").glob("step-*"))


ONE_RANK = """
import sys, torch, torch.distributed as dist
from vaemo.errors import UserError
from vaemo.train.trainer import stop_before_a_non_finite_step
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
loss = torch.tensor(float("nan") if rank == 1 else 0.5)
try:
    stop_before_a_non_finite_step(loss, 5, [f"clip-{rank}"], rank)
    print("went on")
except UserError as err:
    print(err)
"""


def test_one_ranks_non_finite_loss_stops_the_ranks_whose_loss_was_finite_too(tmp_path):
    """Only rank 1's loss is NaN: rank 0 must stop as well (it would otherwise wait in the backward pass's
    collectives for a rank that stopped), with the same line, naming rank 1's clips (Ray reports rank 0's)."""
    store = tmp_path / "store"
    ranks = [
        subprocess.Popen([PYTHON, "-c", ONE_RANK, str(rank), str(store)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        for rank in (0, 1)
    ]
    try:
        said = [proc.communicate(timeout=120)[0].strip() for proc in ranks]
    finally:
        for proc in ranks:
            proc.kill()
    assert said[0] == said[1] and said[0].startswith(
        "the loss of step 5 is not finite on 1 rank(s) (their clips: rank 1: clip-1)"
    )


def test_an_output_inside_a_jobs_copy_of_the_project_is_refused(tmp_path, monkeypatch):
    """`ray job submit --working-dir .` runs the driver in a copy of the project on the head alone, which Ray
    deletes: a relative --out there would be lost (and other nodes do not see it)."""
    from vaemo.args import output_folder
    from vaemo.errors import UserError

    unpacked = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    (unpacked / "jobs").mkdir(parents=True)
    monkeypatch.chdir(unpacked / "jobs")
    with pytest.raises(UserError, match=r"lies in the copy of the project .*_ray_pkg_0123\): Ray deletes that copy"):
        output_folder("../runs/stage1")
    assert output_folder(tmp_path / "runs") == tmp_path / "runs"  # a path outside the copy is used as given


def test_an_unwritable_output_is_refused(small_world, tmp_path):
    result = run(stage_cmd(1, Path("/proc/vaemo-run"), small_world))
    assert result.returncode == 2 and "is not writable" in result.stderr


def test_check_stops_before_training_and_touches_no_earlier_run(small_world, stage0_export, tmp_path):
    """--check runs every check a stage makes (config, data, checkpoints, --out, the Ray cluster) and stops.
    (Each check's own message without --check: test_preflight_errors_are_one_line_before_any_weight_loads.)"""
    fresh = ok(run(stage_cmd(1, tmp_path / "fresh", small_world, f"model.init_from={stage0_export}") + ["--check"]))
    assert "ready to train" in fresh.stdout and not list((tmp_path / "fresh").iterdir())
    done = tmp_path / "done"
    done.mkdir()
    (done / "metrics.jsonl").write_text("{}\n")
    refused = run(stage_cmd(1, done, small_world, f"model.init_from={stage0_export}") + ["--check"])
    assert refused.returncode == 2 and "already holds a run" in refused.stderr  # as the stage itself would
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--resume-from" in errors[0] and "Traceback" not in refused.stderr
    ok(run(stage_cmd(1, done, small_world, f"model.init_from={stage0_export}") + ["--check", "--overwrite"]))
    assert (done / "metrics.jsonl").read_text() == "{}\n"  # --overwrite replaces a run only when one trains
    # a group no node holds yet is left to an autoscaler where the config says the cluster has one
    waiting = stage_cmd(1, tmp_path / "fresh", small_world, "scaling.cpus_per_worker=64", "scaling.autoscaling=true")
    waits = ok(run(waiting + ["--check"]))
    assert "nodes hold 0 of scaling.num_workers=2 workers of 64 CPU each" in waits.stdout
    assert "the run waits for the autoscaler" in waits.stdout and "ready to train" in waits.stdout
    # a head that is gone: ray.init would retry it for good; one line instead
    dead = run(stage_cmd(1, tmp_path / "fresh", small_world) + ["--check"], env={"RAY_ADDRESS": f"127.0.0.1:{free_port()}"})
    assert dead.returncode == 2 and "no Ray cluster answers there" in dead.stderr.splitlines()[-1], dead.stderr[-2000:]
