"""ASHA for sweeps that can be resumed: its rungs rebuilt from what Tune saved of the sweep's trials.

Tune restores a sweep's searcher on `Tuner.restore`, but not its scheduler: ASHA would start with empty
rungs and let the first trial to reach each rung through, whatever it scored. (Its own module: it
subclasses Ray's scheduler, so it imports Ray, which the sweep-file checks before Ray starts do not need.)
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from ray.tune import ExperimentAnalysis
from ray.tune.schedulers import ASHAScheduler

from vaemo import progress
from vaemo.errors import UserError


class ResumableASHA(ASHAScheduler):
    """ASHA that, before its first trial, replays the reports Tune saved in `tune_dir` for the sweep's trials
    into its rungs (a fresh sweep has none). Tune pickles the scheduler when the sweep starts and unpickles
    that copy on resume, so the replay happens again there, from the reports saved by then."""

    def __init__(self, tune_dir: str, **kwargs):
        super().__init__(**kwargs)
        self.tune_dir = tune_dir
        self.replayed = False

    def on_trial_add(self, tune_controller, trial) -> None:
        if not self.replayed:
            self.replayed = True
            # the folder Tune restored from (an --out moved since the start is not the path pickled then)
            tune_dir = getattr(getattr(trial, "storage", None), "experiment_fs_path", None) or self.tune_dir
            try:
                reports = saved_reports(Path(tune_dir), self._time_attr, self._metric)
                replay_reports(self._brackets, reports, self._metric_op)
            except Exception as err:  # noqa: BLE001 (Tune would restart the whole sweep on any error raised here)
                progress.log(f"ASHA could not rebuild its rungs from {tune_dir} ({err}): later trials meet empty rungs")
            else:
                if reports:
                    progress.log(f"ASHA rebuilt its rungs from the saved reports of {len(reports)} trial(s)")
        super().on_trial_add(tune_controller, trial)


def replay_reports(brackets: list, reports: dict[str, list[tuple[float, float]]], metric_op: float) -> None:
    """Record earlier trials' reports in ASHA's rungs as ASHA itself did when they came (the decisions were
    made then). With one bracket only, which vaemo's sweeps use: with several, ASHA draws each trial's
    bracket at random, and which one a trial had is not saved."""
    if len(brackets) != 1:
        return
    for trial_id, rows in reports.items():
        trial = SimpleNamespace(trial_id=trial_id)  # all a bracket reads of a trial
        for time_value, value in rows:
            brackets[0].on_result(trial, time_value, metric_op * value)


def saved_analysis(tune_dir: Path) -> ExperimentAnalysis | None:
    """Tune's saved state of a sweep; None when it saved none (a sweep stopped before its first trial)."""
    try:
        return ExperimentAnalysis(str(tune_dir))
    except json.JSONDecodeError as err:  # a save cut short (a driver killed while Tune wrote it)
        raise UserError(
            f"Tune's saved state in {tune_dir} cannot be read ({err}): remove the newest experiment_state-*.json "
            "there (Tune then takes the one before) and resume again"
        ) from None
    except (ValueError, FileNotFoundError):  # Tune's "no experiment snapshot file"
        return None


def saved_reports(tune_dir: Path, time_attr: str, metric: str) -> dict[str, list[tuple[float, float]]]:
    """Every trial's reports of `metric` in Tune's saved results, by trial id: [(time, value)] in time order."""
    analysis = saved_analysis(tune_dir)
    reports = {}
    for frame in analysis.trial_dataframes.values() if analysis else ():
        if {"trial_id", time_attr, metric} <= set(frame.columns):
            # (stable: a resumed trial's steps between its checkpoint and the stop come twice; the first counted)
            rows = frame[[time_attr, metric, "trial_id"]].dropna().sort_values(time_attr, kind="stable")
            if len(rows):
                reports[str(rows["trial_id"].iloc[0])] = [(float(t), float(v)) for t, v in zip(rows[time_attr], rows[metric])]
    return reports
