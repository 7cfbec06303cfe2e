"""`make science`'s statistics: means, Student-t intervals over seeds, paired stage differences, targets."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vaemo.science import Spread, aggregate, targets, write_report


def report(audio: float, visual: float, av: float, deaf: float = 0.25, donor: float = 0.9) -> dict:
    accuracy = {
        "audio": {"content": audio, "emotion": audio, "all": audio},
        "visual": {"content": visual, "emotion": visual, "all": visual},
        "audio_visual": {"content": av, "emotion": av, "all": av},
    }
    return {
        "accuracy": accuracy,
        "deaf_check": {"accuracy": deaf, "items": 10, "donor_accuracy": donor},
        "always_option": {
            m: {t: {"best": 0.3, "per_option": [0.3, 0.2, 0.25, 0.25]} for t in ("content", "emotion")} for m in accuracy
        },
    }


def seeds(stage1_audio: list[float], stage2_audio: list[float]) -> dict[int, dict[str, dict]]:
    return {
        seed: {
            "after stage 0": report(0.25, 0.95, 0.95),
            "after stage 1": report(a1, 0.95, 0.95, donor=a1),
            "after stage 2": {**report(a2, 0.95, 0.97, donor=a2), "va": {"audio": {"valence_mae": 0.2, "arousal_mae": 0.25}}},
        }
        for seed, (a1, a2) in enumerate(zip(stage1_audio, stage2_audio))
    }


def test_a_spread_gives_the_mean_and_a_students_t_interval():
    spread = Spread([0.8, 0.9, 1.0])
    assert spread.mean == pytest.approx(0.9)
    assert spread.half_width == pytest.approx(4.302653 * 0.1 / np.sqrt(3), rel=1e-5)  # t(0.975, 2) * sd / sqrt(n)
    assert spread.cell() == "0.900 ± 0.248 (0.800, 0.900, 1.000)"
    assert np.isnan(Spread([0.5]).half_width)


def test_targets_are_judged_on_means_and_every_seed():
    good = targets(seeds([0.9, 0.88, 0.92], [0.93, 0.9, 0.95]))
    assert all(t.passed for t in good), [t.line() for t in good if not t.passed]
    # The same mean with one seed under 0.8 misses stage 1's target; a stage 2 that loses audio misses its own.
    bad = {t.claim: t.passed for t in targets(seeds([0.95, 0.99, 0.76], [0.8, 0.8, 0.8]))}
    assert not bad["after stage 1 (no audio labels), audio content mean >= 0.85 and every seed >= 0.8"]
    assert not bad["stage 2 raises audio emotion (mean change > 0)"]
    assert not bad["stage 2 costs at most 0.02 audio content (mean change >= -0.02)"]
    untrained = seeds([0.9, 0.88, 0.92], [0.93, 0.9, 0.95])
    for reports in untrained.values():  # a stage 2 without a trained Supervisor predicts no valence/arousal
        del reports["after stage 2"]["va"]
    checks = {t.claim: t.passed for t in targets(untrained)}
    assert not checks["after stage 2, audio arousal error (the Supervisor's) mean <= 0.3"]


def test_the_report_lists_every_seed_and_the_intervals(tmp_path):
    per_seed = seeds([0.9, 0.88, 0.92], [0.93, 0.9, 0.95])
    write_report(tmp_path, per_seed, 60.0)
    text = (tmp_path / "report.md").read_text()
    assert "| after stage 1 | 0.900 ± 0.050 (0.900, 0.880, 0.920)" in text
    summary = json.loads((tmp_path / "report.json").read_text())
    cell = summary["summary"]["after stage 2"]["audio emotion"]
    assert cell["seeds"] == [0.93, 0.9, 0.95] and cell["ci95"][0] < cell["mean"] < cell["ci95"][1]
    assert set(aggregate(per_seed)) == {"after stage 0", "after stage 1", "after stage 2"}
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_the_demos_targets_fail_when_stage_2_does_nothing():
    """Issue 13: 'change >= 0' targets passed when stage 2 changed nothing; the Supervisor's valence/arousal
    only exist when stage 2 trained it."""
    from vaemo.demo import targets as demo_targets

    stage1 = report(0.9, 0.95, 0.95, donor=0.9)
    stage1["counts"] = {"audio": {"content": 192, "emotion": 192}}
    unchanged = {
        "after stage 0": {**report(0.25, 0.95, 0.95), "counts": stage1["counts"]},
        "after stage 1": stage1,
        "after stage 2": stage1,
    }
    checks = {t.claim: t.passed for t in demo_targets(unchanged)}
    assert not checks["after stage 2, audio arousal error (the Supervisor's) <= 0.35"]
    trained = {**unchanged, "after stage 2": {**stage1, "va": {"audio": {"valence_mae": 0.2, "arousal_mae": 0.2}}}}
    assert all(t.passed for t in demo_targets(trained)), [t.line() for t in demo_targets(trained) if not t.passed]
