"""Ray Tune sweeps of the EmoAdapter: each trial is a stage-2 Ray Train run inside a Tune trial.

A sweep file (sweeps/*.yaml) names the search space over config fields, the scheduler and the metric.
Train workers report validation metrics; TuneReportCallback hands them to Tune, so ASHA can stop weak
trials early. Outputs: DIR/trials.csv (one row per trial), DIR/best.yaml (a stage-2 config), Tune's own
results under DIR/tune (TensorBoard reads them; the Ray dashboard shows the trials while they run).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import re
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from vaemo import progress
from vaemo.config import (
    ConfigError,
    build_dataclass,
    check_tree,
    config_to_dict,
    differing_fields,
    dump_config,
    load_config,
    render_config,
)
from vaemo.errors import UserError, read_user_text

SAMPLERS = ("loguniform", "uniform", "choice", "randint")
SWEEP_OUTPUTS = ("tune", "trials", "trials.csv", "best.yaml", "trial_base.yaml", "sweep.json")
STARTED_WITH = "sweep.json"  # what a sweep started with (resolved config, sweep file, trials): --resume checks it


@dataclass
class SchedulerSpec:
    type: str = "asha"
    """`asha` (early stopping on validation reports) or `fifo` (every trial runs to the end)."""
    grace_period: int = 1
    """Validation reports a trial gets before ASHA may stop it (ASHA counts in steps: this many times
    `validate_every`; its later rungs at reduction_factor times that, and so on)."""
    reduction_factor: int = 2
    """ASHA keeps 1/reduction_factor of the trials at each rung."""


@dataclass
class SweepSpec:
    metric: str = "val_objective"
    """The validation metric trials are ranked by (reported by the stage-2 trainer): val_objective is the mean
    of emotion and content accuracy (content where prompts.questions names an answer_field)."""
    mode: str = "max"
    """`max` or `min`."""
    trials: int = 8
    """Trials to sample (--trials overrides it)."""
    max_concurrent: int = 2
    """Trials running at once."""
    validate_every: int = 5
    """Steps between validation reports in each trial (also its checkpoint interval)."""
    val_batches: int = 0
    """Validation batches per report (0: the preset's train.val_batches); enough to rank trials apart."""
    trial_cpus: float = 0.5
    """CPUs the Tune trial process itself reserves (its Train workers reserve their own)."""
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    """Early stopping."""
    space: dict[str, Any] = field(default_factory=dict)
    """Config field -> {loguniform|uniform: [low, high]} | {choice: [...]} | {randint: [low, high]}."""
    trial_overrides: list[str] = field(default_factory=list)
    """key=value overrides applied to every trial (e.g. a smaller scaling for sweeps)."""
    seed: Optional[int] = None
    """Seed of the search (which values the trials draw); None: the config's seed. The same sweep command
    then draws the same trials."""

    def check(self, path: str) -> None:
        if self.mode not in ("max", "min"):
            raise ConfigError(f"sweep field 'mode' must be max or min, got {self.mode!r}")
        if not self.metric.startswith("val_"):
            raise ConfigError(f"sweep field 'metric' must be a validation metric (val_...), got {self.metric!r}")
        if self.scheduler.type not in ("asha", "fifo"):
            raise ConfigError(f"sweep field 'scheduler.type' must be asha or fifo, got {self.scheduler.type!r}")
        if self.val_batches < 0:
            raise ConfigError("sweep field 'val_batches' must be >= 0 (0: the preset's train.val_batches)")
        counts = {
            "trials": self.trials,
            "max_concurrent": self.max_concurrent,
            "validate_every": self.validate_every,
            "scheduler.grace_period": self.scheduler.grace_period,
        }
        for name, count in counts.items():
            if count < 1:
                raise ConfigError(f"sweep field '{name}' must be >= 1")
        if self.scheduler.reduction_factor < 2:
            raise ConfigError("sweep field 'scheduler.reduction_factor' must be >= 2")
        if self.trial_cpus <= 0:
            raise ConfigError("sweep field 'trial_cpus' must be > 0")
        if not self.space:
            raise ConfigError("sweep field 'space' must name at least one config field")
        weights = [key for key in self.space if key.startswith("stage2.lambda_")]
        if self.metric == "val_loss" and weights:
            raise ConfigError(
                f"sweep field 'metric': val_loss weighs its terms by {', '.join(weights)}, which the sweep searches: "
                "the smallest weights would win; rank by val_objective or a val_*_acc"
            )
        for key, sampler in self.space.items():
            if not isinstance(sampler, dict) or len(sampler) != 1 or next(iter(sampler)) not in SAMPLERS:
                raise ConfigError(f"sweep field 'space.{key}' must be one of {', '.join(SAMPLERS)}: <values>")
            check_sampler(f"space.{key}", *next(iter(sampler.items())))


def check_sampler(field_name: str, name: str, values: Any) -> None:
    """The values as Tune will read them: a non-empty list for choice, two numbers low < high for the ranges
    (low > 0 for loguniform; randint's high is never drawn, as in Python's range)."""
    where = f"sweep field '{field_name}'"
    if name == "choice":
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: choice takes a non-empty list of values, got {values!r}")
        return
    kind = "ints" if name == "randint" else "numbers"
    if not isinstance(values, list) or len(values) != 2:
        raise ConfigError(f"{where}: {name} takes [low, high], got {values!r}")
    try:
        if any(isinstance(v, bool) for v in values):
            raise ValueError
        low, high = bounds(values)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {name} takes two {kind}, got {values!r}") from None
    if name == "randint" and not (low.is_integer() and high.is_integer()):
        raise ConfigError(f"{where}: {name} takes two {kind}, got {values!r}")
    if not low < high:
        raise ConfigError(f"{where}: {name} needs low < high, got {values!r}")
    if name == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: loguniform needs low > 0, got {values!r}")


def bounds(values: list) -> tuple[float, float]:
    """A range's [low, high] as numbers: YAML reads 1e-4 (no decimal point) as a string, a number all the same."""
    return float(values[0]), float(values[1])


def load_sweep(path: str | Path, config_path: str | Path, overrides: list[str] | None = None) -> SweepSpec:
    """The sweep file, checked: its fields, each sampler's values, and every searched field with values as
    Tune draws them (choice: each; ranges: both ends and a fraction between) in the config with the
    command's overrides."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"--space '{path}' is a folder; give a sweep file (sweeps/*.yaml)")
    if not p.is_file():
        raise UserError(f"--space '{path}' does not exist")
    try:
        data = yaml.safe_load(read_user_text(p, "--space")) or {}
    except yaml.YAMLError as err:
        raise UserError(f"--space '{path}' is not valid YAML: {str(err).splitlines()[0]}") from None
    try:
        spec = build_dataclass(SweepSpec, data)
        check_tree(spec)
    except ConfigError as err:  # the config's own checks read the sweep file: name it as what it is
        text = str(err).replace("config field '", "sweep field '").replace("unknown config key '", "unknown sweep field '")
        raise ConfigError(f"--space '{path}': {text.replace('<root>', 'the whole file')}") from None
    # the preset with the sweep's and the command's overrides first: their own mistakes are named as such
    load_config(config_path, [*spec.trial_overrides, *(overrides or [])], stage=2)
    for key, sampler in spec.space.items():  # every searched field must exist and accept the values
        name, values = next(iter(sampler.items()))
        # as Tune will draw them: a uniform range draws fractions (an integer field refuses 300.5, not 128.0)
        if name == "choice":
            drawn = values
        else:
            low, high = bounds(values)
            drawn = [int(low), int(high) - 1] if name == "randint" else [low, high, low + (high - low) * 0.37]
        for value in drawn:
            try:
                load_config(config_path, [*spec.trial_overrides, *(overrides or []), override(key, value)], stage=2)
            except ConfigError as err:
                refused = f"sweep field 'space.{key}' draws {value!r}, which the config refuses"
                raise ConfigError(f"--space '{path}': {refused}: {err}") from None
    return spec


def override(key: str, value: Any) -> str:
    """key=value as the config reads it back (YAML 1.1)."""
    return f"{key}={yaml_text(value)}"


def yaml_text(value: Any) -> str:
    """`value` as YAML 1.1 reads it back, inside lists and mappings too: a string stays a string ("no" is not
    False, "a: b" not a mapping), None stays None, and a float stays a float (1e-05 alone reads as a string)."""
    if value is None or isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and "e" in repr(value) and "." not in repr(value):
        return repr(value).replace("e", ".0e")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_text(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {yaml_text(v)}" for k, v in value.items()) + "}"
    return str(value)


def asha_steps(cfg, grace_reports: int) -> tuple[int, int]:
    """ASHA's (max_t, grace_period) in training steps, from the resolved config: a command-line train.val_every
    or checkpoint_every changes how often a trial reports, not how far it trains. (Counted in Tune's reports,
    a trial that reported more often was stopped halfway, and a resumed trial, which reports only from its
    checkpoint on, would be judged at the wrong rung.)"""
    t = cfg.train
    every = min([t.checkpoint_every] + ([t.val_every] if t.val_batches > 0 and t.val_every else []))
    last = t.stop_after or t.max_steps
    return last, min(last, grace_reports * every)


def tune_space(space: dict) -> dict[str, Any]:
    from ray import tune

    out = {}
    for key, sampler in space.items():
        name, values = next(iter(sampler.items()))
        out[key] = {
            "loguniform": lambda v: tune.loguniform(*bounds(v)),
            "uniform": lambda v: tune.uniform(*bounds(v)),
            "randint": lambda v: tune.randint(*(int(b) for b in bounds(v))),
            "choice": tune.choice,
        }[name](values)
    return out


def run_trial(params: dict, config_path: str, overrides: list[str], out_root: str) -> None:
    """One Tune trial: the stage-2 trainer with the trial's parameters, its reports forwarded to Tune. A trial
    started again (a resumed sweep, a restart after a lost node) continues from its newest complete checkpoint."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from vaemo.errors import UserError
    from vaemo.train.checkpoint import find_checkpoint
    from vaemo.train.launch import run_stage

    trial_dir = Path(out_root) / "trials" / tune.get_context().get_trial_id()
    try:
        resume = find_checkpoint(trial_dir) if (trial_dir / "checkpoints").is_dir() else None
    except UserError:  # no complete checkpoint yet: the trial starts over
        resume = None
    run_stage(
        2,
        config_path,
        trial_dir,
        [*overrides, *(override(k, v) for k, v in params.items())],
        resume_from=resume,
        overwrite=resume is None,
        tune_callbacks=[TuneReportCallback()],
    )


def sweep(
    config_path: str,
    space_path: str,
    out: str | Path,
    trials: int | None = None,
    overrides: list[str] | None = None,
    overwrite: bool = False,
    resume: bool = False,
) -> dict:
    """Run the sweep (`resume`: continue the one in `out`); returns {"best": params, "metric": value, "trials": rows}."""
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    from vaemo.asha import ResumableASHA
    from vaemo.cluster import check_nodes_see, connect_ray, remove_placement_groups_of_this_job
    from vaemo.train.launch import check_cluster, preflight, stage_inputs, worker_resources

    out = Path(out).expanduser().resolve()
    spec = load_sweep(space_path, config_path, overrides)
    earlier = [name for name in SWEEP_OUTPUTS if (out / name).exists()]
    if resume and overwrite:
        raise UserError("--resume continues the sweep in --out and --overwrite replaces it: pass one of them")
    if resume and not (saved_trials(out / "tune") and (out / STARTED_WITH).is_file()):
        raise UserError(
            f"--out '{out}' holds no sweep to resume (no trial in Tune's state in {out / 'tune'}); start it afresh "
            "with --overwrite"
        )
    if earlier and not (overwrite or resume):
        raise UserError(
            f"--out '{out}' already holds a sweep ({', '.join(earlier)}); continue it with --resume, replace it with "
            "--overwrite, or choose another --out"
        )
    per_trial = [
        *spec.trial_overrides,
        f"train.val_every={spec.validate_every}",
        f"train.checkpoint_every={spec.validate_every}",
        *([f"train.val_batches={spec.val_batches}"] if spec.val_batches else []),
        *(overrides or []),
    ]
    base = load_config(config_path, per_trial, stage=2)  # relative paths resolve here, where the command runs
    if base.train.val_batches < 1:
        raise UserError("a sweep needs validation: set train.val_batches >= 1")
    # The stage's own checks (data, starting model, DeepSpeed config) before any trial starts: otherwise each
    # trial fails alike, and the sweep says so only after the last one.
    shards = preflight(base, out, resume=None, overwrite=True)  # which also makes --out and checks it is writable
    seed = base.seed if spec.seed is None else spec.seed
    started_with = {
        "config": config_to_dict(base),
        "sweep": dataclasses.asdict(spec),
        "trials": trials or spec.trials,
        "seed": seed,
    }
    if resume:
        check_same_sweep(json.loads((out / STARTED_WITH).read_text()), json.loads(json.dumps(started_with)), out)
    else:
        for name in earlier:
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
    # Trials run in Tune's own working directories: they start from this resolved config (paths absolute)
    # and add only their sampled parameters.
    trial_config = out / "trial_base.yaml"
    dump_config(base, trial_config)
    connect_ray()
    # once for all trials: a group the cluster cannot hold, or a node that cannot see --out or the data,
    # would fail each trial in turn
    check_cluster(base)
    check_nodes_see(stage_inputs(base, shards, None), ("--out", out), worker_resources(base))
    max_t, grace = asha_steps(base, spec.scheduler.grace_period)
    scheduler = (
        ResumableASHA(
            str(out / "tune"), time_attr="step", max_t=max_t, grace_period=grace, reduction_factor=spec.scheduler.reduction_factor
        )
        if spec.scheduler.type == "asha"
        else FIFOScheduler()
    )
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, config_path=str(trial_config), overrides=[], out_root=str(out)), {"cpu": spec.trial_cpus}
    )
    if resume:  # the searcher and every trial's state as the interrupted sweep left them (ASHA: ResumableASHA)
        tuner = tune.Tuner.restore(str(out / "tune"), trainable, resume_unfinished=True)
        progress.log(f"resuming the sweep in {out}: finished trials keep their results, the others continue")
    else:
        (out / STARTED_WITH).write_text(json.dumps(started_with, indent=1))
        tuner = tune.Tuner(
            trainable,
            param_space=tune_space(spec.space),
            tune_config=tune.TuneConfig(
                metric=spec.metric,
                mode=spec.mode,
                num_samples=trials or spec.trials,
                scheduler=scheduler,
                # Tune's max_concurrent_trials limits a Searcher only: this generator takes its own limit.
                search_alg=BasicVariantGenerator(max_concurrent=spec.max_concurrent, random_state=seed),
            ),
            run_config=tune.RunConfig(name="tune", storage_path=str(out), verbose=1),
        )
    # `ray job stop` sends SIGTERM (then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S): Tune saves its state and
    # stops on SIGINT or SIGUSR1 alone, and a job's driver may have SIGINT blocked
    previous = signal.signal(signal.SIGTERM, stop_tune)
    try:
        grid = tuner.fit()
    finally:  # a failed or interrupted sweep must not keep the head's CPUs either
        signal.signal(signal.SIGTERM, previous)
        remove_placement_groups_of_this_job()
    from vaemo.train.reporting import task_accuracies

    rows = []
    for result in grid:
        params = {k: (result.config or {}).get(k) for k in spec.space}  # a trial whose process died has none
        metrics = result.metrics or {}
        per_task = {f"val_{task}_acc": value for task, value in sorted(task_accuracies(metrics))}  # what the objective averages
        rows.append(
            {
                "trial": metrics.get("trial_id", Path(result.path).name),
                **params,
                spec.metric: metrics.get(spec.metric),
                **per_task,
                "steps": metrics.get("step"),
                "error": raised_message(result.error) if result.error else "",
            }
        )
    write_trials(out / "trials.csv", rows)
    for row in rows:
        if row["error"]:
            progress.log(f"trial {row['trial']} failed: {row['error']}")
    unfinished = unfinished_trials(out / "tune", started_with["trials"])
    if unfinished:  # stopped (Ctrl-C, a lost driver): no best.yaml from part of the trials
        raise UserError(
            f"the sweep stopped with {unfinished} of {started_with['trials']} trials unfinished ({out / 'trials.csv'} has "
            "the others); continue it with the same command and --resume"
        )
    # Only a trial that trained its whole budget can be the best: an early ASHA stop is judged on a model
    # that never finished training.
    last_step = base.train.stop_after or base.train.max_steps
    ranked = [r for r in rows if r[spec.metric] is not None and r["steps"] == last_step]
    if not ranked:
        reason = next((r["error"] for r in rows if r["error"]), "none trained all its steps")
        raise UserError(f"no trial reported {spec.metric} after {last_step} steps: {reason} (all trials: {out / 'trials.csv'})")
    best = (max if spec.mode == "max" else min)(ranked, key=lambda r: r[spec.metric])
    best_params = {k: best[k] for k in spec.space}
    # The trial's own config: the one that scored best[metric]. What the sweep set for its trials (a smaller
    # scaling, the validation cadence) is listed, against the preset with the command's overrides.
    best_cfg = load_config(trial_config, [override(k, v) for k, v in best_params.items()], stage=2)
    plain = load_config(config_path, [*(overrides or []), *(override(k, v) for k, v in best_params.items())], stage=2)
    changed = differing_fields(config_to_dict(plain), config_to_dict(best_cfg))
    header = [
        f"# Best of {len(rows)} trials by {spec.metric} ({spec.mode}): {best[spec.metric]:.4f}, trial {best['trial']}"
        f" (search seed {seed}).",
        "# This is the config that trial trained with, the sweep's trial settings included (listed below when it",
        "# set any: override them for your own run's scaling). Train stage 2 with it:",
        f"#   python jobs/stage2.py --config {out / 'best.yaml'} --out RUN",
    ]
    if changed:
        header.append("# The sweep set these for its trials (the preset with your overrides has the value in brackets):")
        header += [f"#   {key}: {mine} ({theirs})" for key, (mine, theirs) in changed.items()]
        header.append("# data.batch_size is per worker: with another scaling.num_workers, the learning rate meets another batch.")
    (out / "best.yaml").write_text("\n".join(header) + "\n" + render_config(best_cfg))
    return {"best": best_params, "metric": best[spec.metric], "trials": rows}


def stop_tune(*_) -> None:
    """SIGTERM's handler during a sweep: Tune's own stop (SIGUSR1), which saves its state; before Tune has set
    that up, one line (and the cleanup in `sweep`'s finally) instead of SIGUSR1's default, a silent exit."""
    if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None):
        raise UserError("the sweep was stopped (SIGTERM) before its trials started")
    os.kill(os.getpid(), signal.SIGUSR1)


def unfinished_trials(tune_dir: Path, expected: int) -> int:
    """Trials of the sweep that neither finished nor failed, as Tune's saved state has them. After a Ctrl-C Tune
    ends the running trials, which then look finished in the results it returns, but it saves them first, as
    pending; trials the search had not drawn yet are in neither."""
    return expected - sum(trial.status in ("TERMINATED", "ERROR") for trial in saved_trials(tune_dir))


def saved_trials(tune_dir: Path) -> list:
    """The trials in Tune's saved state of a sweep; none when it saved none (a sweep stopped before its first)."""
    from vaemo.asha import saved_analysis

    analysis = saved_analysis(tune_dir)
    return list(analysis.trials) if analysis else []


def check_same_sweep(started: dict, now: dict, out: Path) -> None:
    """A resumed sweep continues with the settings it started with: the trials already run were judged
    under them (Tune keeps its own copy of the search, which a new sweep file would not reach)."""
    for part in ("config", "sweep", "trials", "seed"):
        changed = differing_fields(started[part], now[part]) if isinstance(now[part], dict) else {}
        if started[part] != now[part]:
            field_name, (mine, theirs) = next(iter(changed.items()), (part, (now[part], started[part])))
            where = {"config": "the config (with the command's overrides)", "sweep": "the sweep file"}.get(part, "--trials")
            raise UserError(
                f"--resume: the sweep in --out '{out}' started with {field_name}={theirs!r} in {where}, now {mine!r}: "
                "resume with the same command, or start another sweep"
            )


def write_trials(path: Path, rows: list[dict]) -> None:
    """One row per trial; the columns are every row's (a failed trial has no accuracies)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for row in rows for k in row)), restval="")
        writer.writeheader()
        writer.writerows(rows)


def raised_message(err: BaseException) -> str:
    """The message a failed trial raised, from the traceback text Tune wraps it in: the last `Type: message`
    line (a user error's message alone, anything else with its type)."""
    text = str(err)
    raised = re.findall(r"^\s*([\w.]*(?:Error|Exception|NoUsableData)): (.+)$", text, flags=re.MULTILINE)
    if not raised:
        return text.strip().splitlines()[0][:300] if text.strip() else type(err).__name__
    kind, message = raised[-1]
    user = kind.rsplit(".", 1)[-1] in ("UserError", "ConfigError", "NoUsableData")
    return (message if user else f"{kind.rsplit('.', 1)[-1]}: {message}")[:300]


def add_sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="the preset whose stage-2 settings trials start from")
    p.add_argument("--space", required=True, help="a sweep file (sweeps/*.yaml)")
    p.add_argument("--out", required=True, help="output folder: trials.csv, best.yaml, tune/, trials/")
    p.add_argument("--trials", type=int, default=None, help="trials to sample (default: the sweep file's)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier sweep's outputs in --out")
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep in --out (the same command)")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every trial (e.g. model.init_from=...)")


def run_sweep(args: argparse.Namespace) -> int:
    if args.trials is not None and args.trials < 1:
        raise UserError("--trials must be >= 1")
    result = sweep(args.config, args.space, args.out, args.trials, args.overrides, args.overwrite, args.resume)
    progress.log(
        f"best {result['metric']:.4f} with {result['best']}; wrote {Path(args.out) / 'trials.csv'} and "
        f"{Path(args.out) / 'best.yaml'}"
    )
    return 0
