"""Driver side of a training stage: arguments, preflight, Ray, TorchTrainer, progress, summary.

`python jobs/stageN.py ...` runs this on a machine with no Ray running (it starts a local Ray), and
`ray job submit --working-dir . -- python jobs/stageN.py ...` runs the same against a cluster (the job
driver finds the cluster through RAY_ADDRESS).
"""

from __future__ import annotations

import argparse
import json
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from vaemo import progress
from vaemo.args import output_folder
from vaemo.cluster import check_nodes_see, connect_ray, forwarded_env, workers_that_fit
from vaemo.config import Config, config_to_dict, dump_config, load_config, project_root
from vaemo.errors import UserError

STAGE_NAMES = {0: "see", 1: "VG-Align", 2: "EmoAdapter"}
RUN_OUTPUTS = ("metrics.jsonl", "tb", "checkpoints", "export", "curves.png", "workers", "config.yaml", "decoder_hangs")


def add_stage_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=str(project_root() / "configs" / "tiny.yaml"), help="a preset YAML")
    parser.add_argument("--out", required=True, help="run folder: metrics.jsonl, checkpoints/, export/, curves.png")
    parser.add_argument(
        "--resume-from",
        default=None,
        help="a checkpoint folder (RUN/checkpoints/step-N), or a run folder: its newest complete one",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run's outputs in --out")
    parser.add_argument(
        "--check",
        action="store_true",
        help="check the config, data, checkpoint folders, --out and the Ray cluster, then stop before any "
        "weight loads (exit 0: the stage can start; 2: one line naming the problem)",
    )
    parser.add_argument("overrides", nargs="*", help="key=value config overrides (e.g. train.max_steps=10)")


@dataclass
class StageRun:
    cfg: Config
    run_dir: Path
    resume_from: Path | None
    metrics: dict


def run_stage(
    stage: int,
    config: str | Path,
    out: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    resume_from: str | Path | None = None,
    overwrite: bool = False,
    tune_callbacks: list | None = None,
    check_only: bool = False,
) -> StageRun:
    """Resolve the config (a preset plus dotted overrides), check everything that can be checked before
    loading weights, train into `out`; `resume_from`: a checkpoint folder or a run folder (its newest).
    `check_only` stops after the checks (a week-long cluster job should not find a typo at its first step)."""
    from vaemo.train.checkpoint import find_checkpoint, prepare_launch

    cfg = load_config(config, list(overrides), stage=stage)
    run_dir = Path(out).expanduser().resolve()
    resume = find_checkpoint(resume_from) if resume_from else None
    shards = preflight(cfg, run_dir, resume, overwrite)
    connect_ray()
    check_cluster(cfg)
    check_nodes_see(stage_inputs(cfg, shards, resume), ("--out", run_dir), worker_resources(cfg))
    if check_only:
        progress.log(f"stage {stage} ({STAGE_NAMES[stage]}): config, data and cluster checked; ready to train into {run_dir}")
        return StageRun(cfg, run_dir, resume, {})
    if overwrite and resume is None:
        for name in RUN_OUTPUTS:
            target = run_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    removed = prepare_launch(run_dir, resume)
    if removed:
        progress.log(f"removed incomplete checkpoint folder(s) the new steps reuse: {', '.join(removed)}")
    dump_config(cfg, run_dir / "config.yaml")
    progress.log(
        f"stage {stage} ({STAGE_NAMES[stage]}): {cfg.train.max_steps} steps on {cfg.scaling.num_workers} "
        f"worker(s) -> {run_dir}" + (f", resuming from {resume}" if resume else "")
    )
    metrics = fit(cfg, run_dir, resume, shards, tune_callbacks)
    return StageRun(cfg, run_dir, resume, metrics)


def preflight(cfg: Config, run_dir: Path, resume: Path | None, overwrite: bool) -> dict[str, list[str]]:
    """Readable errors (exit 2) before any weight is loaded. Returns the shards, expanded: the workers read
    these lists, not globs of their own that another node or a later moment could expand otherwise (ranks
    split the list by position)."""
    from vaemo.data.stream import expand_shards, train_shard_subset
    from vaemo.model.build import check_checkpoint_folders, check_encoder_layers, check_shapes, choose_dtype
    from vaemo.train.ds_config import deepspeed_config

    output_folder(run_dir)
    earlier = [name for name in ("metrics.jsonl", "checkpoints", "export") if (run_dir / name).exists()]
    if earlier and resume is None and not overwrite:
        raise UserError(
            f"--out '{run_dir}' already holds a run ({', '.join(earlier)}); continue it with "
            f"--resume-from {run_dir}, or pass --overwrite, or choose another --out"
        )
    workers = cfg.scaling.num_workers
    train_urls = expand_shards(cfg.data.train_shards)
    train_shard_subset(train_urls, 0, workers, 0, max(1, cfg.data.loader_workers))
    val_urls: list[str] = []
    if cfg.train.val_batches > 0:
        val_urls = expand_shards(cfg.data.val_shards)
        if len(val_urls) < workers:
            raise UserError(
                f"data.val_shards has {len(val_urls)} shard(s) for {workers} workers; write at least "
                f"{workers} or set train.val_batches=0"
            )
        warn_if_validation_repeats(cfg, val_urls)
    if cfg.stage == 1 and cfg.stage1.teacher.mode == "cache":
        from vaemo.cache_fingerprint import check_cache

        check_cache(cfg, train_urls + val_urls)
    check_checkpoint_folders(cfg.model, cfg.data.audio_seconds)
    check_shapes(cfg.model, cfg.data)
    if cfg.stage == 1:
        check_encoder_layers(cfg.model, cfg.stage1.audio_encoder_top_layers)
    probe_data(cfg, train_urls, val_urls)
    if cfg.model.init_from:
        from vaemo.model.build import check_matches_export
        from vaemo.model.vaemo_llm import ModelSpec

        export = Path(cfg.model.init_from)
        check_matches_export(ModelSpec.read(export), cfg.model, cfg.data, export)
    deepspeed_config(cfg, choose_dtype(cfg.model.dtype))
    if resume is not None:
        from vaemo.train.checkpoint import check_nothing_written_over, check_resume_matches, read_meta

        check_nothing_written_over(run_dir, resume)

        meta = read_meta(resume)
        if int(meta["world_size"]) != workers:
            raise UserError(
                f"checkpoint '{resume}' was written by {meta['world_size']} workers; resume with "
                f"scaling.num_workers={meta['world_size']}"
            )
        if int(meta["stage"]) != cfg.stage:
            raise UserError(f"checkpoint '{resume}' is from stage {meta['stage']}, not stage {cfg.stage}")
        check_resume_matches(cfg, resume, meta, train_urls)
    return {"data.train_shards": train_urls, "data.val_shards": val_urls}


def warn_if_validation_repeats(cfg: Config, val_urls: list[str]) -> None:
    """One line when a validation reads more clips on a worker than that worker's validation shards hold:
    the clips then count more than once, and the metric looks steadier than its clips warrant. Only local
    shards are counted (from their tar headers); a URL leaves it unchecked."""
    from vaemo.data.stream import train_shard_subset
    from vaemo.data.tars import count_samples

    workers, batch = cfg.scaling.num_workers, cfg.data.batch_size
    per_report = cfg.train.val_batches * batch
    held = []
    for rank in range(workers):
        counts = [count_samples(url) for url in train_shard_subset(val_urls, rank, workers, 0, 1)]
        if None in counts:
            return
        held.append(sum(counts))
    fewest = min(held)
    if fewest < per_report:
        progress.log(
            f"warning: data.val_shards: a worker's validation shards hold {fewest} clips, and each validation reads "
            f"train.val_batches={cfg.train.val_batches} x data.batch_size={batch} = {per_report} there, so clips count "
            f"more than once; set train.val_batches={max(1, fewest // batch)} or write more validation clips"
        )


def stage_inputs(cfg: Config, shards: dict[str, list[str]], resume: Path | None) -> list[tuple[str, str]]:
    """(field, path) of everything a worker reads from storage: shards, model folders, the teacher cache,
    the checkpoint resumed from. Hub ids and remote URLs are among them; only paths that exist count."""
    inputs = [(field, url) for field, urls in shards.items() for url in urls]
    inputs += [(f"model.{name}", getattr(cfg.model, name) or "") for name in ("vlm", "audio_encoder", "init_from")]
    if cfg.stage == 1 and cfg.stage1.teacher.mode == "cache":
        inputs.append(("stage1.teacher.cache_dir", cfg.stage1.teacher.cache_dir))
    if resume is not None:
        inputs.append(("--resume-from", str(resume)))
    return inputs


def probe_data(cfg: Config, train_urls: list[str], val_urls: list[str]) -> None:
    """The stage can use at least one sample of its training (and validation) shards, and so can every
    worker of the shards it reads (each training loader worker, each rank's validation); else one line with
    the counts by reason (`data.max_unusable_samples` read in a row, at most). A rank whose validation shards
    hold nothing usable would otherwise stop the run at its first validation, hours in."""
    from vaemo.data.stream import NoUsableData, probe_usable, train_shard_subset
    from vaemo.train.objectives import objective_for

    objective = objective_for(cfg)
    spec = objective.decode_spec()
    cache = cfg.stage1.teacher.cache_dir if objective.cached else ""
    workers, loader_workers = cfg.scaling.num_workers, max(1, cfg.data.loader_workers)
    for field, urls, streams in (("data.train_shards", train_urls, loader_workers), ("data.val_shards", val_urls, 1)):
        if not urls:
            continue
        # the whole list, then each worker's share where workers read different shards (ranks; in training, also
        # their loader workers)
        shares: dict[tuple[str, ...], str] = {tuple(urls): ""}
        for rank in range(workers):
            for stream in range(streams):
                share = tuple(train_shard_subset(urls, rank, workers, stream, streams))
                alone = streams > 1 and len(urls) >= workers * streams  # else its loader workers share its shards
                loader = f" (its loader worker {stream})" if alone else ""
                shares.setdefault(share, f"the {len(share)} shard(s) worker {rank}{loader} reads, e.g. {share[0]}: ")
        for share, reader in shares.items():
            try:
                probe_usable(list(share), spec, cfg.data.max_unusable_samples, cache, cfg.data.decode_timeout_s)
            except NoUsableData as err:
                raise UserError(f"stage {cfg.stage}: {field}: {reader}{NoUsableData.line_in(str(err))}") from None


def check_cluster(cfg: Config) -> None:
    """The worker group fits the cluster's nodes as scaling.placement_strategy places it; else one line (with
    scaling.autoscaling, a line that the run waits for nodes), where Ray would wait for good."""
    import ray

    s = cfg.scaling
    per_worker = worker_resources(cfg)
    nodes = [node for node in ray.nodes() if node["Alive"]]
    fits = workers_that_fit([node["Resources"] for node in nodes], per_worker, s.placement_strategy)
    if fits >= s.num_workers:
        return
    held = ", ".join(
        f"{node['NodeManagerHostname']} {node['Resources'].get('CPU', 0):g} CPU {node['Resources'].get('GPU', 0):g} GPU"
        for node in nodes[:4]
    ) + (f" and {len(nodes) - 4} more" if len(nodes) > 4 else "")
    need = " + ".join(f"{amount:g} {name}" for name, amount in per_worker.items())
    problem = (
        f"the Ray cluster's nodes hold {fits} of scaling.num_workers={s.num_workers} workers of {need} each "
        f"(placement {s.placement_strategy}; nodes: {held or 'none'})"
    )
    if s.autoscaling:
        progress.log(f"{problem}: the run waits for the autoscaler to add nodes (scaling.autoscaling)")
        return
    raise UserError(
        f"{problem}; lower scaling.num_workers or scaling.cpus_per_worker, or set scaling.autoscaling=true where the "
        "cluster adds nodes on demand"
    )


def worker_resources(cfg: Config) -> dict[str, float]:
    return {"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if cfg.scaling.use_gpu else {})}


def worker_env(cfg: Config) -> dict[str, str]:
    env = {"PYTHONPATH": str(project_root()), "PYTHONUNBUFFERED": "1", **forwarded_env()}
    if not cfg.scaling.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
        env["OMP_NUM_THREADS"] = str(max(1, int(cfg.scaling.cpus_per_worker)))
    return env


def fit(
    cfg: Config, run_dir: Path, resume: Path | None, shards: dict[str, list[str]], tune_callbacks: list | None = None
) -> dict:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue

    from vaemo.train.display import TrainingDisplay
    from vaemo.train.trainer import LAUNCH_FILE, train_loop

    s = cfg.scaling
    queue = Queue(maxsize=10_000, actor_options={"num_cpus": 0})  # also fits inside a Tune trial's bundle
    loop_config = {
        "config": config_to_dict(cfg),
        "run_dir": str(run_dir),
        "launch_id": uuid.uuid4().hex,
        "resume_from": str(resume) if resume else None,
        "shards": shards,
        "queue": queue,
    }
    (run_dir / "workers").mkdir(parents=True, exist_ok=True)
    (run_dir / "workers" / LAUNCH_FILE).write_text(json.dumps({"launch_id": loop_config["launch_id"]}))
    resources = worker_resources(cfg)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources, placement_strategy=s.placement_strategy
        ),
        run_config=RunConfig(
            name="checkpoints",
            storage_path=str(run_dir),
            failure_config=FailureConfig(max_failures=s.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            worker_runtime_env={"env_vars": worker_env(cfg)},
            callbacks=tune_callbacks or None,
        ),
    )
    with TrainingDisplay(queue, cfg.stage, cfg.train.max_steps) as display:
        try:
            result = trainer.fit()
        except Exception as err:  # the workers' error, already logged by Ray with its traceback
            from vaemo.data.stream import NoUsableData

            no_data = NoUsableData.line_in(str(err))
            if no_data:  # the data, not the code: the user's to fix (exit 2)
                raise UserError(no_data) from None
            user = user_error_in(str(err))
            if user:  # e.g. a checkpoint the preflight could not judge without loading it
                raise UserError(f"stage {cfg.stage}: {user}") from None
            raise TrainingFailed(f"stage {cfg.stage} failed: {first_line(err)}") from err
    queue.shutdown()
    metrics = dict(result.metrics or display.last or {})
    checkpoint = result.checkpoint.path if result.checkpoint else None
    summary = [f"stage {cfg.stage} done: step {metrics.get('step', '?')}, loss {metrics.get('loss', float('nan')):.4f}"]
    if (run_dir / "export").is_dir():
        summary.append(f"export: {run_dir / 'export'}")
    if checkpoint:
        summary.append(f"last checkpoint: {checkpoint}")
    summary.append(f"metrics: {run_dir / 'metrics.jsonl'} (TensorBoard: {run_dir / 'tb'}), curves: {run_dir / 'curves.png'}")
    for line in summary:
        progress.log(line)
    return metrics


class TrainingFailed(RuntimeError):
    """Training stopped with an error that is not the user's input (exit status 1)."""


def user_error_in(text: str) -> str | None:
    """The message of a vaemo UserError (or subclass) a worker raised, from Ray's report of its traceback."""
    import re

    match = re.search(r"^vaemo\.[\w.]*(?:UserError|ConfigError): (.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else None


def first_line(err: BaseException) -> str:
    """The exception the first failed worker raised (`ValueError: ...`: the last unindented exception line of
    its traceback, after any it was chained from) from Ray's report, whose own first line ("Training failed
    due to worker errors:") names nothing; else the first line that mentions an error."""
    import re

    text = str(err).strip().splitlines()
    raised = []
    for line in text:
        if raised and line.startswith("[Rank "):  # the next worker's report
            break
        if re.match(r"[A-Za-z_][\w.]*(?:Error|Exception|Interrupt)(?::|$)", line):
            raised.append(line.strip()[:300])
    if raised:
        return raised[-1]
    for line in text:
        if "Error" in line or "error" in line:
            return line.strip()[:300]
    return (text[0] if text else type(err).__name__)[:300]
