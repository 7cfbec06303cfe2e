"""A 4-trial Ray Tune sweep of the EmoAdapter on the tiny preset (each trial a Ray Train run)."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT, ok, run

from vaemo.config import load_config
from vaemo.errors import UserError
from vaemo.tune import load_sweep, raised_message

pytestmark = pytest.mark.slow


LIVE_GROUPS = """
import json, ray
ray.init(log_to_driver=False, configure_logging=False)  # the Ray RAY_ADDRESS names (the tests' head)
{before}
print(json.dumps([pg for pg, info in ray.util.placement_group_table().items() if info["state"] != "REMOVED"]))
"""


def live_placement_groups(before: str = "", settle_s: float = 0.0) -> list[str]:
    """The placement groups not removed on the Ray that RAY_ADDRESS names, after running `before` there.
    `settle_s`: look again for that long while some are left (Ray removes a finished job's groups a moment
    after its driver exits; a group kept for good stays)."""
    import json
    import time

    deadline = time.time() + settle_s
    while True:
        script = LIVE_GROUPS.format(before=before)
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        live = json.loads(done.stdout.strip().splitlines()[-1])
        if not live or time.time() > deadline:
            return live
        time.sleep(2)


def test_a_job_removes_the_placement_groups_it_left():
    """What a sweep does after Tune returns: the job's groups go, and with them the CPUs they held."""
    left = live_placement_groups(
        "from vaemo.cluster import remove_placement_groups_of_this_job\n"
        "from ray.util.placement_group import placement_group\n"
        "group = placement_group([{'CPU': 0.5}])\n"
        "ray.get(group.ready(), timeout=60)\n"
        "assert remove_placement_groups_of_this_job() == [group.id.hex()]\n"
        "assert remove_placement_groups_of_this_job() == []"
    )
    assert left == []


def repository_view(tmp_path, small_world, export):
    """A folder laid out like the repository after `make demo`: the README's relative paths work from it."""
    view = tmp_path / "repo"
    (view / "runs" / "demo" / "stage1").mkdir(parents=True)
    for name in ("configs", "sweeps", "jobs", "ds_configs"):
        (view / name).symlink_to(ROOT / name)
    (view / "runs" / "data").symlink_to(small_world)
    (view / "runs" / "demo" / "stage1" / "export").symlink_to(export)
    return view


def test_the_readmes_sweep_command_writes_trials_and_a_best_config_stage2_accepts(small_world, stage0_export, tmp_path):
    """Relative paths (the preset's runs/data/..., model.init_from) resolve where the command runs, not in
    each trial's Tune working directory."""
    view = repository_view(tmp_path, small_world, stage0_export)
    quick = ["data.batch_size=4", "train.max_steps=4", "train.val_batches=1"]
    ok(
        subprocess.run(
            [
                sys.executable,
                "jobs/sweep.py",
                "--config",
                "configs/tiny.yaml",
                "--space",
                "sweeps/emoadapter.yaml",
                "--out",
                "runs/sweep",
                "--trials",
                "2",
                "model.init_from=runs/demo/stage1/export",
                *quick,
            ],
            cwd=view,
            capture_output=True,
            text=True,
            timeout=900,
        )
    )
    out = view / "runs" / "sweep"
    rows = list(csv.DictReader(open(out / "trials.csv")))
    assert len(rows) == 2
    assert {"train.lr", "model.enhancer.width", "stage2.lambda_sup", "stage2.lambda_kd", "val_objective"} <= set(rows[0])
    assert all(not r["error"] and r["steps"] == "4" for r in rows)
    space = yaml.safe_load((ROOT / "sweeps/emoadapter.yaml").read_text())["space"]
    for r in rows:  # the objective is the mean of the task accuracies; each parameter is drawn from its range
        assert float(r["val_objective"]) == pytest.approx((float(r["val_content_acc"]) + float(r["val_emotion_acc"])) / 2)
        low, high = space["train.lr"]["loguniform"]
        assert low <= float(r["train.lr"]) <= high
        assert int(r["model.enhancer.width"]) in space["model.enhancer.width"]["choice"]
    assert rows[0]["train.lr"] != rows[1]["train.lr"]
    assert list((out / "tune").rglob("events.out.tfevents.*"))  # TensorBoard reads the trials
    assert live_placement_groups(settle_s=60) == []  # the sweep left the head's CPUs to the runs after it
    best = load_config(out / "best.yaml", stage=2)
    assert best.stage == 2 and best.model.init_from == str(view / "runs/demo/stage1/export")
    # the config the trial trained with, the sweep file's trial settings named against the preset's
    assert (best.scaling.num_workers, best.train.val_every) == (1, 25)
    header = [line for line in (out / "best.yaml").read_text().splitlines() if line.startswith("#   ")]
    assert "#   scaling.num_workers: 1 (2)" in header and "#   train.val_every: 25 (" in "\n".join(header)
    assert best.data.train_shards == str(view / "runs/data/train/*.tar")
    top = max(rows, key=lambda r: float(r["val_objective"]))
    assert best.train.lr == pytest.approx(float(top["train.lr"]))
    ok(
        run(
            [
                sys.executable,
                str(ROOT / "jobs/stage2.py"),
                "--config",
                str(out / "best.yaml"),
                "--out",
                str(tmp_path / "with-best"),
                "--check",  # every check the stage makes before it trains (tests/test_train.py)
            ]
        )
    )
    again = subprocess.run(
        [sys.executable, "jobs/sweep.py", "--config", "configs/tiny.yaml", "--space", "sweeps/emoadapter.yaml"]
        + ["--out", "runs/sweep", "--trials", "2", "model.init_from=runs/demo/stage1/export", *quick],
        cwd=view,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 2 and "already holds a sweep" in again.stderr.splitlines()[-1] and "--overwrite" in again.stderr


RESUMABLE = """
metric: val_objective
trials: 2
max_concurrent: 1
validate_every: 2
val_batches: 1
scheduler: {type: asha, grace_period: 15}  # one rung, at the last step: no trial stops early
space:
  train.lr: {loguniform: [1.0e-4, 1.0e-3]}
trial_overrides: [scaling.num_workers=1, scaling.cpus_per_worker=1]
"""


def test_an_interrupted_sweep_resumes_its_unfinished_trial_from_its_checkpoint(small_world, stage0_export, tmp_path):
    """`ray job stop` (SIGTERM) while the second trial trains: Tune saves its state, one line says how to continue
    and no best.yaml is written from part of the trials. `--resume` keeps the finished trial as it was,
    continues the other from its newest checkpoint, then chooses among both. A changed command is refused."""
    import json
    import signal
    import time

    from vaemo.asha import saved_reports
    from vaemo.train.checkpoint import missing_parts

    (tmp_path / "sweep.yaml").write_text(RESUMABLE)
    out = tmp_path / "sweep"
    command = [sys.executable, str(ROOT / "jobs/sweep.py"), "--config", str(ROOT / "configs/tiny.yaml")]
    command += ["--space", str(tmp_path / "sweep.yaml"), "--out", str(out), f"model.init_from={stage0_export}"]
    command += [f"data.train_shards={small_world}/train/*.tar", f"data.val_shards={small_world}/val/*.tar"]
    command += ["data.batch_size=4", "train.max_steps=30"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)

    def second_trial_checkpointed() -> bool:
        trials = sorted((out / "trials").glob("*"), key=lambda t: t.stat().st_mtime) if (out / "trials").is_dir() else []
        return len(trials) == 2 and any(not missing_parts(m.parent) for m in (trials[1] / "checkpoints").glob("step-*/meta.json"))

    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None and not second_trial_checkpointed():
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, stderr[-3000:]
    assert "1 of 2 trials unfinished" in errors[0] and "--resume" in errors[0]
    assert not (out / "best.yaml").exists()
    # what a resumed ASHA rebuilds its rungs from: every report Tune saved, the finished trial's to its end
    # (the stopped trial's first report may not have reached Tune yet when its checkpoint was on disk)
    reports = sorted(saved_reports(out / "tune", "step", "val_objective").values(), key=len)
    assert 1 <= len(reports) <= 2 and [step for step, _ in reports[-1]] == list(range(2, 31, 2))

    changed = run(command + ["train.lr=0.5", "--resume"])
    assert changed.returncode == 2 and "--resume: the sweep in --out" in changed.stderr.splitlines()[-1], changed.stderr[-2000:]
    ok(run(command + ["--resume"], timeout=900))
    rows = list(csv.DictReader(open(out / "trials.csv")))
    assert len(rows) == 2 and all(not r["error"] and r["steps"] == "30" for r in rows), rows
    starts = {
        r["trial"]: [json.loads(line)["step"] for line in (out / "trials" / r["trial"] / "workers" / "starts.jsonl").open()]
        for r in rows
    }
    assert sorted(len(s) for s in starts.values()) == [1, 2]  # the finished trial was not trained again
    assert max(starts.values(), key=len)[1] > 0  # the other continued from a checkpoint, not from step 0
    assert load_config(out / "best.yaml", stage=2).train.max_steps == 30


def test_a_sweep_with_data_it_cannot_read_stops_before_any_trial(small_world, stage0_export, tmp_path):
    """The stage's own checks run before Tune starts: one line, and no trial was tried."""
    view = repository_view(tmp_path, small_world, stage0_export)
    result = subprocess.run(
        [
            sys.executable,
            "jobs/sweep.py",
            "--config",
            "configs/tiny.yaml",
            "--space",
            "sweeps/emoadapter.yaml",
            "--out",
            "runs/sweep",
            "--trials",
            "1",
            "model.init_from=runs/demo/stage1/export",
            "data.train_shards=runs/nowhere/*.tar",
        ],
        cwd=view,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-3000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "match no file" in errors[0], errors
    assert "runs/nowhere" in errors[0]
    assert not (view / "runs/sweep/tune").exists()


def test_a_failed_trials_error_is_the_line_it_raised():
    """What the sweep prints for a failed trial, from the traceback text Tune wraps a trial's error in."""
    wrapped = (
        "ray.exceptions.RayTaskError(TrainingFailedError): ray::_Inner.train() (pid=1, ip=10.0.0.1)\n"
        '  File "vaemo/train/launch.py", line 230, in fit\n'
        "vaemo.errors.UserError: stage 2: data.train_shards: 0 usable of 400 samples read: corrupt_clip 400\n"
    )
    assert raised_message(Exception(wrapped)) == "stage 2: data.train_shards: 0 usable of 400 samples read: corrupt_clip 400"
    assert raised_message(Exception("Traceback ...\nRuntimeError: worker died\n")) == "RuntimeError: worker died"
    assert raised_message(Exception("")) == "Exception"


@pytest.mark.parametrize(
    "text,message",
    [
        ("space:\n  train.lrr: {loguniform: [1.0e-4, 1.0e-3]}", "train.lrr"),
        ("space:\n  train.lr: {normal: [0, 1]}", "space.train.lr"),
        ("space:\n  train.lr: {uniform: 0.001}", r"space.train.lr': uniform takes \[low, high\]"),
        ("space:\n  train.lr: {uniform: [x]}", r"uniform takes \[low, high\]"),
        ("space:\n  train.lr: {uniform: [0.1, x]}", "uniform takes two numbers"),
        ("space:\n  train.lr: {loguniform: [0.0, 1.0e-3]}", "loguniform needs low > 0"),
        ("space:\n  train.lr: {loguniform: [1e-3, 1e-4]}", "needs low < high"),  # YAML's strings, read as numbers
        ("space:\n  train.lr: {uniform: [1.0e-3, 1.0e-4]}", "needs low < high"),
        ("space:\n  model.lora.rank: {randint: [8, 2]}", "needs low < high"),
        ("space:\n  model.lora.rank: {randint: [0.5, 4]}", "randint takes two ints"),
        ("space:\n  model.enhancer.width: {choice: []}", "choice takes a non-empty list"),
        ("space:\n  model.enhancer.width: {choice: 4}", "choice takes a non-empty list"),
        ("space:\n  stage2.lambda_sup: {uniform: [0.25, -5.0]}", "needs low < high"),
        ("space:\n  stage2.lambda_sup: {uniform: [-1.0, 1.0]}", "lambda_sup"),  # the config refuses a negative weight
        ("space:\n  model.enhancer.width: {uniform: [128, 512]}", "model.enhancer.width"),  # draws floats for an int
        ("metric: objective\nspace:\n  train.lr: {uniform: [0.1, 0.2]}", "must be a validation metric"),
        ("metric: val_loss\nmode: min\nspace:\n  stage2.lambda_kd: {uniform: [0.0, 1.0]}", "smallest weights would win"),
        ("scheduler: {grace_period: 0}\nspace:\n  train.lr: {uniform: [0.1, 0.2]}", "scheduler.grace_period' must be >= 1"),
        ("scheduler: {reduction_factor: 1}\nspace:\n  train.lr: {uniform: [0.1, 0.2]}", "reduction_factor' must be >= 2"),
        ("trial_cpus: -1\nspace:\n  train.lr: {uniform: [0.1, 0.2]}", "trial_cpus' must be > 0"),
        # the sweep file's own fields are named as such, not as config fields
        ("schedular: {type: fifo}\nspace:\n  train.lr: {uniform: [0.1, 0.2]}", "unknown sweep field 'schedular'"),
        ("- a\n- b", "sweep field 'the whole file' must be a mapping"),
        ("space: [train.lr]", "sweep field 'space' must be a mapping"),
        ("val_batches: -3\nspace:\n  train.lr: {uniform: [0.1, 0.2]}", "sweep field 'val_batches' must be >= 0"),
        ("space:\n  model.lora.rank: {choice: [4, -4]}", r"sweep field 'space.model.lora.rank' draws -4, which the config"),
    ],
)
def test_a_bad_sweep_file_names_the_problem_before_ray_starts(tmp_path, text, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text + "\n")
    with pytest.raises(UserError, match=message):
        load_sweep(bad, ROOT / "configs/tiny.yaml")


def test_a_resumed_asha_judges_new_reports_against_the_rungs_of_the_trials_before_it():
    """Tune restores the search on resume, not the scheduler: with empty rungs the first trial to reach each
    one went through whatever it scored."""
    from types import SimpleNamespace

    from vaemo.asha import ResumableASHA, replay_reports

    def asha():
        return ResumableASHA("/nowhere", time_attr="step", max_t=8, grace_period=2, reduction_factor=2, metric="m", mode="max")

    earlier = {"a": [(2.0, 0.9), (4.0, 0.9)], "b": [(2.0, 0.5)]}
    late = SimpleNamespace(trial_id="c")
    fresh, resumed = asha(), asha()
    replay_reports(resumed._brackets, earlier, resumed._metric_op)
    assert fresh._brackets[0].on_result(late, 2.0, 0.4) == "CONTINUE"  # nothing to compare with
    assert resumed._brackets[0].on_result(late, 2.0, 0.4) == "STOP"  # below the median of 0.9 and 0.5
    assert resumed._brackets[0].on_result(SimpleNamespace(trial_id="b"), 4.0, 0.95) == "CONTINUE"  # b continues at rung 4


def test_a_failed_replay_leaves_the_resumed_sweep_to_go_on(monkeypatch, capsys):
    """Tune restarts a whole sweep from scratch on any error its scheduler raises while the trials are re-added."""
    from types import SimpleNamespace

    import vaemo.asha
    from vaemo.asha import ResumableASHA

    def unreadable(*_):
        raise PermissionError("no access")

    monkeypatch.setattr(vaemo.asha, "saved_reports", unreadable)
    asha = ResumableASHA("/nowhere", time_attr="step", max_t=8, grace_period=2, metric="m", mode="max")
    asha.on_trial_add(None, SimpleNamespace(trial_id="a"))
    asha.on_trial_add(None, SimpleNamespace(trial_id="b"))
    assert set(asha._trial_info) == {"a", "b"} and "could not rebuild its rungs" in capsys.readouterr().out


def test_sigterm_stops_a_sweep_as_tune_does_or_with_one_line_before_tune_listens(tmp_path):
    """`ray job stop` sends SIGTERM: Tune saves and stops on SIGUSR1 only; before Tune listens for that, SIGUSR1's
    default would end the driver silently, skipping the sweep's cleanup. A cut-short saved state is one line too."""
    import signal

    from vaemo.tune import saved_trials, stop_tune

    previous = signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    try:
        with pytest.raises(UserError, match="stopped \\(SIGTERM\\) before its trials started"):
            stop_tune()
        heard = []
        signal.signal(signal.SIGUSR1, lambda *_: heard.append(True))
        stop_tune()
        assert heard == [True]
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert saved_trials(tmp_path) == []  # no state saved: no sweep to resume
    (tmp_path / "experiment_state-2026-12-06_07-00-00.json").write_text('{"trial_data": [["{\\"trial_id')
    with pytest.raises(UserError, match="cannot be read .*remove the newest experiment_state"):
        saved_trials(tmp_path)


def test_a_mistake_in_the_commands_overrides_is_not_blamed_on_the_sweep_file():
    spec = ROOT / "sweeps/emoadapter.yaml"
    with pytest.raises(UserError, match="^unknown config key 'train.max_stepz'"):
        load_sweep(spec, ROOT / "configs/tiny.yaml", ["train.max_stepz=30"])


def test_searched_values_reach_the_config_as_they_were_drawn():
    """Values go to the trials as key=value text: "no" stayed a string only by luck of quoting, null became
    the path "None", and 1e-05 (no decimal point) is a string in YAML 1.1."""
    from vaemo.config import _parse_override
    from vaemo.tune import override

    for value in (1e-05, 2.5e-4, 0.003, "no", "a: b", None, 4, True, [1e-05, "no", None], {"a": [2e-05, "off"]}, []):
        assert _parse_override(override("k", value)) == ("k", value)


def test_asha_measures_trials_in_steps_of_the_resolved_config():
    """ASHA's time axis is the training step: counted in Tune's reports, a command-line train.val_every that
    reports more often than the sweep file's validate_every made ASHA stop every trial halfway, and a resumed
    trial (reporting only from its checkpoint on) would be judged at the wrong rung."""
    from vaemo.tune import asha_steps

    def steps(grace, *overrides):
        return asha_steps(load_config(ROOT / "configs/tiny.yaml", ["train.val_batches=1", *overrides], stage=2), grace)

    assert steps(1, "train.max_steps=4", "train.val_every=2", "train.checkpoint_every=2") == (4, 2)
    assert steps(1, "train.max_steps=4", "train.val_every=1", "train.checkpoint_every=2") == (4, 1)
    assert steps(2, "train.max_steps=10", "train.val_every=3", "train.checkpoint_every=5") == (10, 6)
    assert steps(2, "train.max_steps=10", "train.val_every=3", "train.checkpoint_every=5", "train.stop_after=7") == (7, 6)
    assert steps(9, "train.max_steps=10", "train.val_every=3", "train.checkpoint_every=5") == (10, 10)


def test_a_sweep_file_with_yamls_string_numbers_loads():
    """PyYAML reads 1e-4 (no decimal point) as a string; such sweep files worked, and must still."""
    spec = load_sweep_text("space:\n  train.lr: {loguniform: [1e-4, 1e-3]}\n  model.lora.rank: {randint: [0, 5]}\n")
    assert spec.space["train.lr"] == {"loguniform": ["1e-4", "1e-3"]}


def load_sweep_text(text: str):
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(text)
        f.flush()
        return load_sweep(f.name, ROOT / "configs/tiny.yaml")


def test_the_trials_table_has_every_rows_columns(tmp_path):
    """A failed trial has no accuracies; the columns came from the first row, and a failed first row lost
    every trial's results (csv refused the later rows)."""
    from vaemo.tune import write_trials

    rows = [
        {"trial": "a", "train.lr": None, "val_objective": None, "steps": None, "error": "stage 2: boom"},
        {"trial": "b", "train.lr": 0.001, "val_objective": 0.5, "val_emotion_acc": 0.6, "steps": 4, "error": ""},
    ]
    write_trials(tmp_path / "trials.csv", rows)
    read = list(csv.DictReader(open(tmp_path / "trials.csv")))
    assert [r["trial"] for r in read] == ["a", "b"] and read[1]["val_emotion_acc"] == "0.6" and read[0]["val_emotion_acc"] == ""
