"""A 4-trial Ray Tune sweep of the EmoAdapter on the tiny preset (each trial a Ray Train run)."""

from __future__ import annotations

import csv
import sys

import pytest
from conftest import ROOT, ok, run

from vaemo.config import load_config
from vaemo.errors import UserError
from vaemo.tune import load_sweep

pytestmark = pytest.mark.slow


def test_a_four_trial_sweep_writes_trials_and_a_best_config_stage2_accepts(small_world, stage0_export, tmp_path):
    out = tmp_path / "sweep"
    data = [f"data.train_shards={small_world}/train/*.tar", f"data.val_shards={small_world}/val/*.tar",
            "data.batch_size=4", "train.max_steps=4", "train.val_batches=1", f"model.init_from={stage0_export}"]
    ok(run([sys.executable, str(ROOT / "jobs/sweep.py"), "--config", str(ROOT / "configs/tiny.yaml"), "--space",
            str(ROOT / "sweeps/emoadapter.yaml"), "--out", str(out), "--trials", "4", *data], timeout=900))
    rows = list(csv.DictReader(open(out / "trials.csv")))
    assert len(rows) == 4
    assert {"train.lr", "model.enhancer.width", "stage2.lambda_sup", "stage2.lambda_kd", "val_emotion_acc"} <= set(rows[0])
    assert all(r["val_emotion_acc"] for r in rows)
    assert list((out / "tune").rglob("events.out.tfevents.*"))  # TensorBoard reads the trials
    best = load_config(out / "best.yaml", stage=2)
    assert best.stage == 2 and best.model.init_from == str(stage0_export)
    top = max(rows, key=lambda r: float(r["val_emotion_acc"]))
    assert best.train.lr == pytest.approx(float(top["train.lr"]))
    ok(run([sys.executable, str(ROOT / "jobs/stage2.py"), "--config", str(out / "best.yaml"), "--out",
            str(tmp_path / "with-best"), "train.max_steps=2", "train.val_batches=0"]))


def test_a_bad_sweep_file_names_the_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("space:\n  train.lrr: {loguniform: [1.0e-4, 1.0e-3]}\n")
    with pytest.raises(UserError, match="train.lrr"):
        load_sweep(bad, ROOT / "configs/tiny.yaml")
    bad.write_text("space:\n  train.lr: {normal: [0, 1]}\n")
    with pytest.raises(UserError, match="space.train.lr"):
        load_sweep(bad, ROOT / "configs/tiny.yaml")
