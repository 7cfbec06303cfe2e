"""The per-worker training loop that Ray Train runs on every rank, for every stage.

setup (DeepSpeed over Ray's process group, the model, what trains) -> resume (Ray's checkpoint after a
worker restart, else --resume-from) -> loop (data, step, report, validate, checkpoint) -> export.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from vaemo.config import Config, config_from_dict, render_config
from vaemo.data.stream import NoUsableData, StreamState, TrainBatches, TrainStream, make_loader
from vaemo.data.watchdog import UNNAMED, StuckSample
from vaemo.errors import UserError
from vaemo.losses import chunk_count
from vaemo.model import VAEmotionLLM, choose_dtype
from vaemo.model.freezing import replicate_frozen
from vaemo.train import checkpoint as ckpt
from vaemo.train.cpu_comm import skip_cpu_shm_op
from vaemo.train.ds_config import LeafBlocks, deepspeed_config, mark_leaf_modules, zero_stage
from vaemo.train.objectives import StageObjective, StepInputs, build_stage_model, objective_for
from vaemo.train.reporting import Accumulator, MetricsWriter, Stopwatch, collective_device, interval_record, plot_curves


class StageModule(nn.Module):
    """What DeepSpeed wraps: the model, the stage's own heads, and the objective's loss as its forward."""

    def __init__(self, model: VAEmotionLLM, extra: nn.Module | None, objective: StageObjective):
        super().__init__()
        self.model = model
        self.extra = extra
        self.objective = objective
        self.last_sums: dict[str, float] = {}

    def forward(self, step: StepInputs, mode: str = "train") -> torch.Tensor:
        if mode == "score":
            self.last_sums = self.objective.score(self.model, step)
            return torch.zeros(())
        result = self.objective.loss(self.model, self.extra, step)
        self.last_sums = result.sums
        return result.loss


def teacher_cache(cfg: Config, objective: StageObjective) -> str:
    """The teacher-cache folder the streams merge into samples ('' when the teacher runs online)."""
    return cfg.stage1.teacher.cache_dir if objective.cached else ""


def learning_rate(cfg: Config, step: int) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio of the peak: a pure function of the step."""
    t = cfg.train
    if t.warmup_steps and step <= t.warmup_steps:
        return t.lr * step / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def synchronize(step: StepInputs, world_size: int, chunk_size: int) -> None:
    """All-reduce the step's normalisers (SUM) and response positions (MAX -> chunk counts); in a process
    group of one rank too, so that one GPU runs the collectives a cluster runs."""
    counts = sorted(step.counts)
    positions = sorted(step.positions)
    sums = torch.tensor([float(step.counts[k]) for k in counts], dtype=torch.float64)
    maxima = torch.tensor([step.positions[k] for k in positions], dtype=torch.int64)
    if dist.is_available() and dist.is_initialized():
        sums, maxima = sums.to(collective_device()), maxima.to(collective_device())
        dist.all_reduce(sums)
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
    step.global_counts = dict(zip(counts, sums.tolist()))
    step.chunks = {k: chunk_count(int(m), chunk_size) for k, m in zip(positions, maxima.tolist())}
    step.world_size = world_size


def stop_before_a_non_finite_step(loss: torch.Tensor, step: int, keys: list[str], rank: int) -> None:
    """Stop every rank, one line, when any rank's loss is NaN or infinite: its backward pass would write NaN
    into the weights, and into every checkpoint after it. Stopped here, the newest checkpoint is as it was.
    The ranks learn of it together (one all-reduce), so none waits in a collective for one that stopped;
    a UserError, so Ray's retries (which would repeat this exact step) do not start."""
    finite_here = bool(torch.isfinite(loss.detach()).all())
    ranks = torch.tensor([0 if finite_here else 1], dtype=torch.int64)
    distributed = dist.is_available() and dist.is_initialized()
    if distributed:
        ranks = ranks.to(collective_device())
        dist.all_reduce(ranks)
    if not int(ranks.item()):
        return
    # Every rank raises the same line (Ray reports rank 0's first): the clips of each rank whose loss was not finite.
    mine = (
        None if finite_here else f"rank {rank}: " + ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
    )
    named = [mine]
    if distributed:
        named = [None] * dist.get_world_size()
        dist.all_gather_object(named, mine)
    clips = "; ".join(n for n in named if n)
    raise UserError(
        f"the loss of step {step} is not finite on {int(ranks.item())} rank(s) (their clips: {clips}): stopped before it "
        "reached the weights, the newest checkpoint is intact. Usual causes: a learning rate too high for this model "
        "(train.lr), or bf16 overflow (model.dtype=float32 to check); resume from the checkpoint with --resume-from once fixed"
    )


def quiet_libraries() -> None:
    warnings.filterwarnings("ignore", message=r".*torch.distributed.(all_gather_into_tensor|reduce_scatter_tensor).*")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.utils\.checkpoint")
    for name in ("DeepSpeed", "deepspeed", "torch.distributed", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)


class StageEngine(NamedTuple):
    engine: Any
    """DeepSpeed's engine around `module`."""
    module: StageModule
    model: VAEmotionLLM
    objective: StageObjective
    ds_config: dict
    replicated: dict[str, torch.Tensor]
    """Frozen weights kept whole on every rank, outside ZeRO-3 (deepspeed.frozen_weights: replicated)."""
    held_vision: dict[str, torch.Tensor]
    """Rank 0's host copy of a vision tower dropped for a teacher cache (for the export)."""
    leaves: LeafBlocks


def build_engine(cfg: Config, rank: int, use_gpu: bool) -> StageEngine:
    """The stage's model, what trains, and its DeepSpeed engine; torch.distributed is already initialised
    (on a GPU, with the rank's device set)."""
    import deepspeed

    objective = objective_for(cfg)
    dtype = choose_dtype(cfg.model.dtype)
    check_ranks_chose_alike(dtype)
    ds_config = deepspeed_config(cfg, dtype)
    # From a teacher cache no rank runs the vision tower: it is dropped before ZeRO-3 partitions the model;
    # rank 0 keeps its weights on the host for the export.
    device = torch.device("cuda", torch.cuda.current_device()) if use_gpu else None
    parts = build_stage_model(cfg, objective, drop_vision=objective.cached, device=device)
    model, extra = parts.model, parts.extra
    replicated = {}
    if zero_stage(ds_config) == 3 and cfg.deepspeed.frozen_weights == "replicated":
        threshold = ds_config["zero_optimization"].get("stage3_param_persistence_threshold", 100_000)
        replicated = replicate_frozen(model, above_numel=int(threshold))
    module = StageModule(model, extra, objective)
    leaves = mark_leaf_modules(module, cfg.deepspeed.leaf_modules if zero_stage(ds_config) == 3 else [])
    if use_gpu:
        module = module.cuda()
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = (
        None if "optimizer" in ds_config else torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    )
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=params, optimizer=optimizer, config=ds_config)
    held_vision = parts.held_vision if rank == 0 else {}
    return StageEngine(engine, module, model, objective, ds_config, replicated, held_vision, leaves)


def train_loop(loop_config: dict) -> None:
    """Ray Train's per-worker function. `loop_config`: config, run_dir, launch_id, resume_from, the shards
    (the driver's expanded lists, by field), queue.

    A UserError (the user's to fix: the data, a checkpoint) is recorded for the launch: Ray retries a failed
    worker group (scaling.max_failures), and each retry then fails with it at once instead of loading the
    model again (minutes at 7B) to meet the same error."""
    recorded = Path(loop_config["run_dir"]) / "workers" / "user_error.json"
    if recorded.is_file():
        earlier = json.loads(recorded.read_text())
        if earlier.get("launch_id") == loop_config["launch_id"]:
            print(f"vaemo: {earlier['message']} (as in this launch's earlier attempt; not loading the model again)", flush=True)
            raise UserError(earlier["message"])
    try:
        train_worker(loop_config)
    except UserError as err:
        recorded.parent.mkdir(parents=True, exist_ok=True)
        recorded.write_text(json.dumps({"launch_id": loop_config["launch_id"], "message": str(err)}))
        raise


def train_worker(loop_config: dict) -> None:
    """One attempt of a worker: set up, train, export."""
    import ray.train

    cfg = config_from_dict(loop_config["config"])
    run_dir = Path(loop_config["run_dir"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    check_this_node_sees(run_dir, loop_config, rank, world_size, cfg.data.loader_workers)
    quiet_libraries()
    use_gpu = cfg.scaling.use_gpu and torch.cuda.is_available()
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    import deepspeed

    if not use_gpu:
        skip_cpu_shm_op()
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")
    if use_gpu:
        torch.cuda.set_device(context.get_local_rank())
    (run_dir / "workers").mkdir(parents=True, exist_ok=True)
    (run_dir / "workers" / f"rank{rank}.pid").write_text(str(os.getpid()))

    # -- setup ----------------------------------------------------------------------------------
    built = build_engine(cfg, rank, use_gpu)
    engine, module, model, objective = built.engine, built.module, built.model, built.objective

    # -- resume --------------------------------------------------------------------------------
    start_step, stream_state = 0, StreamState(num_workers=cfg.data.loader_workers)
    accumulator = Accumulator()  # a resume's first report also counts the steps before its checkpoint
    source = resume_source(ray.train.get_checkpoint(), loop_config)
    if source is not None:
        start_step, stream_state, carried = load_checkpoint(engine, source, rank, world_size, cfg)
        accumulator.add(carried)
    # Clips a loader worker was stopped on, also after the newest checkpoint (or before the first): noted in this
    # run's folder and in that of the run resumed from (RUN/checkpoints/step-N).
    resumed_run = [source.parent.parent] if source is not None and source.parent.name == "checkpoints" else []
    noted = [entry for folder in dict.fromkeys([run_dir, *resumed_run]) for entry in noted_decoder_hangs(folder, rank)]
    stream_state.passed_over = list(dict.fromkeys(stream_state.passed_over + noted))

    # -- data ----------------------------------------------------------------------------------
    # A random window per clip in training (validation keeps the middle one); from a teacher cache, the
    # window the cache's teacher saw (the middle one). data.audio_phase applies either way: the teacher sees
    # frames only.
    spec = dataclasses.replace(
        objective.decode_spec(), window="middle" if objective.cached else "random", audio_phase=cfg.data.audio_phase
    )
    urls = loop_config["shards"]["data.train_shards"]
    stream = TrainBatches(
        lambda resume: TrainStream(
            urls,
            spec,
            cfg.data.batch_size,
            seed=cfg.seed,
            rank=rank,
            world_size=world_size,
            shuffle_buffer=cfg.data.shuffle_buffer,
            resume=resume,
            teacher_cache=teacher_cache(cfg, objective),
            give_up_after=cfg.data.max_unusable_samples,
            recycle_buffers=cfg.data.prefetch_batches + 2,
            decoded_cache_bytes=cfg.data.decoded_cache_mb * 2**20,
            decode_limit_s=cfg.data.decode_timeout_s,  # with data.loader_workers 0 (decoding in this process)
        ),
        stream_state,
        workers=cfg.data.loader_workers,
        prefetch_batches=cfg.data.prefetch_batches,
        limit_s=cfg.data.decode_timeout_s,
        name=f"stage {cfg.stage}, rank {rank}",
        on_stop=lambda sample: note_decoder_hang(run_dir, rank, sample),
    )
    batches = named_stream(stream, f"stage {cfg.stage}: data.train_shards", rank)
    start = {"launch_id": loop_config["launch_id"], "checkpoint": str(source) if source else None}
    writer = MetricsWriter(run_dir, loop_config.get("queue"), start_step, start) if rank == 0 else None

    # -- loop ----------------------------------------------------------------------------------
    interval, started = Stopwatch(), time.perf_counter()
    last_metrics: dict = {}
    latest_validation: dict = {}  # carried into later Ray reports: Tune ranks trials by it
    shards_read: set[str] = set()
    final_step = cfg.train.stop_after or cfg.train.max_steps
    if source is not None and start_step >= final_step:
        # Resumed at its last step (a sweep's trial started again after it had saved its end): a Tune trial
        # needs the final report, which went with that checkpoint; a stage run only exports again.
        ray.train.report(ckpt.read_meta(source).get("metrics", {}))
    for step in range(start_step + 1, final_step + 1):
        waited = time.perf_counter()
        batch = next(batches)
        data_wait = time.perf_counter() - waited
        stream_state.update(batch)
        shards_read.update(batch.sources)
        computed = time.perf_counter()
        lr = learning_rate(cfg, step)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        inputs = objective.prepare(model, batch, np.random.default_rng([cfg.seed, 104729, rank, step]))
        inputs.step = step
        synchronize(inputs, world_size, objective.chunk)
        loss = engine(inputs)
        stop_before_a_non_finite_step(loss, step, batch.keys, rank)
        engine.backward(loss)
        engine.step()
        stream.release(batch)  # its tensors were consumed by the step: the loader worker may reuse them
        accumulator.add(
            {
                **module.last_sums,
                "loss": float(loss.detach()),
                "clips": inputs.clips,
                "tokens": inputs.tokens,
                "data_wait_s": data_wait,
                "steps": 1,
                "compute_s": time.perf_counter() - computed,
            }
        )

        last = step == final_step
        validate_now = cfg.train.val_batches > 0 and (last or (cfg.train.val_every and step % cfg.train.val_every == 0))
        if step % cfg.train.report_every == 0 or last or validate_now:
            accumulator.add({f"skip/{k}": v for k, v in stream_state.skips().items()} if rank == 0 else {})
            totals = accumulator.reduce()
            record = interval_record(
                step, totals, objective.metrics(totals), world_size, lr, interval.lap(), time.perf_counter() - started
            )
            record["stage"] = cfg.stage
            if validate_now:
                latest_validation = validate(
                    engine, module, objective, cfg, loop_config["shards"]["data.val_shards"], rank, world_size
                )
                record.update(latest_validation)
            if writer:
                writer.write(record)
            accumulator.reset()
            last_metrics = {**latest_validation, **record}
        if step % cfg.train.checkpoint_every == 0 or last:
            kept = accumulator.unreported()
            save_checkpoint(engine, step, stream_state, kept, cfg, rank, world_size, loop_config, last_metrics)
        elif validate_now:
            ray.train.report(last_metrics)

    stream.close()
    llm = built.model.vlm.model.language_model.config
    placement = {
        "zero3_leaf_modules": built.leaves.marked,
        "zero3_trainable_blocks_hooked": built.leaves.trainable,
        # chosen by each worker for its own GPU: a cluster of mixed nodes shows here
        "attention": llm._attn_implementation,
        "dtype": str(choose_dtype(cfg.model.dtype)).removeprefix("torch."),
    }
    record_worker(run_dir, rank, shards_read, {**weight_placement(engine, built.replicated), **placement})

    # -- export --------------------------------------------------------------------------------
    if cfg.train.export:
        held = built.held_vision | ({name: t.detach().cpu() for name, t in built.replicated.items()} if rank == 0 else {})
        export(engine, model, run_dir / "export", rank, built.ds_config, held)
    if writer:
        writer.close()
        plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png", title=f"stage {cfg.stage}")


def named_stream(batches: Iterator, name: str, rank: int) -> Iterator:
    """The batches, with a stream that can get no usable sample reported under its stage and config field, and
    the rank and node that read it (ranks read disjoint shards; a node may see other files than the driver).
    The DataLoader re-raises a worker's error with its traceback as the message: keep the one line (which
    ends with no bracket: `line_in` strips those of the wrappers)."""
    import socket

    try:
        yield from batches
    except NoUsableData as err:
        line = NoUsableData.line_in(str(err)) or err
        raise NoUsableData(f"{NoUsableData.MARKER}{name}: {line}; read by rank {rank} on node {socket.gethostname()}") from None


def check_this_node_sees(run_dir: Path, loop_config: dict, rank: int, world_size: int, loader_workers: int) -> None:
    """This worker's node sees the run folder the driver wrote into and the local shards this rank reads,
    before the model loads; else one line naming the node. The driver checks every node it can reach
    (check_nodes_see); this covers the nodes it could not: those an autoscaler starts for the group."""
    import socket

    from vaemo.data.stream import train_shard_subset

    try:
        seen = json.loads((run_dir / "workers" / LAUNCH_FILE).read_text()).get("launch_id")
    except (OSError, ValueError):
        seen = None
    if seen != loop_config["launch_id"]:
        raise UserError(
            f"node {socket.gethostname()} cannot see --out '{run_dir}' (the file the driver wrote there is missing): "
            "every node must see the run folder at the same path (shared storage)"
        )
    for field, urls in loop_config["shards"].items():
        if not urls:  # (no validation)
            continue
        # (this rank's shards alone: thousands of shards times every rank would be millions of lookups)
        workers = max(1, loader_workers) if field == "data.train_shards" else 1
        mine = {url for worker in range(workers) for url in train_shard_subset(urls, rank, world_size, worker, workers)}
        unseen = sorted(url for url in mine if "://" not in url and not url.startswith("pipe:") and not os.path.exists(url))
        if unseen:
            raise UserError(
                f"node {socket.gethostname()} cannot see {field} '{unseen[0]}'"
                + (f" (and {len(unseen) - 1} more)" if len(unseen) > 1 else "")
                + ": every node must see the data at the same paths (shared storage)"
            )


# What the driver writes into RUN/workers before a launch: {"launch_id": ...}; workers check they see it.
LAUNCH_FILE = "launch.json"


def weight_placement(engine, replicated: dict[str, torch.Tensor]) -> dict[str, int]:
    """Elements ZeRO-3 partitions (and so gathers every pass), elements it keeps whole, and frozen elements
    replicated outside it (deepspeed.frozen_weights): what a step's communication grows with."""
    zero3 = [p for p in engine.module.parameters() if hasattr(p, "ds_numel")]
    return {
        "zero3_partitioned_numel": sum(p.ds_numel for p in zero3 if not p.ds_persist),
        "zero3_persistent_numel": sum(p.ds_numel for p in zero3 if p.ds_persist),
        "replicated_frozen_numel": sum(t.numel() for t in replicated.values()),
    }


def check_ranks_chose_alike(dtype: torch.dtype) -> None:
    """Every rank chose the same dtype: `model.dtype=auto` is decided per GPU, and a cluster that mixes GPUs
    with and without bf16 arithmetic would run ranks in different precisions under one DeepSpeed config."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    bf16 = torch.tensor([float(dtype == torch.bfloat16)], device=collective_device())
    lowest, highest = bf16.clone(), bf16.clone()
    dist.all_reduce(lowest, op=dist.ReduceOp.MIN)
    dist.all_reduce(highest, op=dist.ReduceOp.MAX)
    if lowest.item() != highest.item():
        raise UserError(
            "model.dtype=auto chose bf16 on some ranks' GPUs and float32 on others (GPUs without bf16 arithmetic "
            "among them): set model.dtype=float32, or run on GPUs alike"
        )


# In the run folder: one JSON line per sample a loader worker of rank R was stopped on (rank{R}.jsonl).
DECODER_HANGS = "decoder_hangs"


def note_decoder_hang(run_dir: Path, rank: int, sample: StuckSample) -> None:
    """Noted at once, not only in the next checkpoint: while this rank replays its stream without the sample,
    the other ranks wait in a collective, and should that time out, Ray restarts every worker from the newest
    checkpoint, saved before the stop. The restart must pass over the sample too (noted_decoder_hangs)."""
    folder = run_dir / DECODER_HANGS
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"rank{rank}.jsonl", "a") as f:
        f.write(json.dumps([sample.stream, sample.position, sample.key, sample.url]) + "\n")


def noted_decoder_hangs(run_dir: Path, rank: int) -> list[tuple[int, int, str, str]]:
    """The samples note_decoder_hang noted in this run folder, as StreamState.passed_over entries: every
    rank's named ones (a shard and key name a sample anywhere), and this rank's UNNAMED ones (a position is
    only its own streams')."""
    entries = []
    for path in sorted((run_dir / DECODER_HANGS).glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                stream, position, key, url = json.loads(line)
            except ValueError:  # a line cut short by a crash
                continue
            if key != UNNAMED or path.stem == f"rank{rank}":
                entries.append((int(stream), int(position), str(key), str(url)))
    return entries


def record_worker(run_dir: Path, rank: int, shards_read: set[str], placement: dict) -> None:
    """RUN_DIR/workers/rankR.json: where the rank ran, which shards it read (data-plan debugging), and where
    its weights lived."""
    import socket

    import ray

    info = {
        "rank": rank,
        "node_id": ray.get_runtime_context().get_node_id(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "shards_read": sorted(shards_read),
        **placement,
    }
    (run_dir / "workers" / f"rank{rank}.json").write_text(json.dumps(info, indent=1))


def resume_source(ray_checkpoint, loop_config: dict) -> Path | None:
    """After a worker-group restart Ray hands back this launch's latest checkpoint: that wins. A
    checkpoint Ray finds from an earlier launch in the same folder is not ours to resume from."""
    if ray_checkpoint is not None:
        folder = Path(ray_checkpoint.path)
        if (folder / "meta.json").is_file() and ckpt.read_meta(folder).get("launch_id") == loop_config["launch_id"]:
            return folder
    return Path(loop_config["resume_from"]) if loop_config.get("resume_from") else None


def load_checkpoint(engine, folder: Path, rank: int, world_size: int, cfg: Config) -> tuple[int, StreamState, dict]:
    """Load a checkpoint into the engine and this process's RNGs; returns the step, the data stream's state and
    the step statistics not yet reported when it was saved."""
    meta = ckpt.read_meta(folder)
    if int(meta["world_size"]) != world_size:
        raise ValueError(
            f"checkpoint {folder} was written by {meta['world_size']} workers; resume with "
            f"scaling.num_workers={meta['world_size']}"
        )
    ckpt.check_deepspeed_files(folder, rank)
    load_path, _ = engine.load_checkpoint(str(folder), tag=ckpt.TAG, load_module_strict=False)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {folder}")
    state = ckpt.load_trainer_state(folder / f"trainer_state_rank{rank}.pt")
    ckpt.set_rng_state(state["rng"])
    stream = StreamState.from_state_dict(state["stream"], cfg.data.loader_workers)
    return int(state["step"]), stream, dict(state.get("unreported", {}))


def save_checkpoint(
    engine,
    step: int,
    stream_state: StreamState,
    unreported: dict[str, float],
    cfg: Config,
    rank: int,
    world_size: int,
    loop_config: dict,
    metrics: dict,
) -> None:
    """Every rank writes its shard into a local folder; Ray merges and persists them as step-N. `unreported`:
    this rank's step statistics since its last report (a checkpoint between two reports)."""
    import ray.train

    local = Path(tempfile.mkdtemp(prefix="vaemo-ckpt-"))
    try:
        engine.save_checkpoint(str(local), tag=ckpt.TAG, exclude_frozen_parameters=True)
        ckpt.save_trainer_state(local / f"trainer_state_rank{rank}.pt", step, stream_state.state_dict(), unreported)
        if rank == 0:
            (local / "config.yaml").write_text(render_config(cfg))
            meta = {
                "step": step,
                "world_size": world_size,
                "stage": cfg.stage,
                "loader_workers": cfg.data.loader_workers,
                "train_shards": ckpt.shard_list_digest(loop_config["shards"]["data.train_shards"]),
                "train_shard_count": len(loop_config["shards"]["data.train_shards"]),
                "zero_stage": engine.zero_optimization_stage(),
                "launch_id": loop_config["launch_id"],
                "metrics": {**metrics, "step": step},  # reported again by a resume that has no step left
            }
            (local / "meta.json").write_text(json.dumps(meta))
        ray.train.report(
            {**metrics, "step": step},
            checkpoint=ray.train.Checkpoint.from_directory(str(local)),
            checkpoint_dir_name=ckpt.step_dir_name(step),
        )
    finally:
        shutil.rmtree(local, ignore_errors=True)


@torch.no_grad()
def validate(
    engine, module: StageModule, objective: StageObjective, cfg: Config, val_urls: list[str], rank: int, world_size: int
) -> dict:
    """Validation loss (and, where the objective scores, accuracies) on the same batches every time: the rank's
    validation shards read in order from their first clip, the same number of batches on every rank (ZeRO-3)."""
    stream = TrainStream(
        val_urls,
        objective.decode_spec(),
        cfg.data.batch_size,
        seed=cfg.seed + 1,
        rank=rank,
        world_size=world_size,
        shuffle_buffer=1,
        in_order=True,
        teacher_cache=teacher_cache(cfg, objective),
        give_up_after=cfg.data.max_unusable_samples,
        decode_limit_s=cfg.data.decode_timeout_s,
    )
    batches = named_stream(iter(make_loader(stream, 0)), f"stage {cfg.stage}: data.val_shards", rank)
    engine.eval()
    accumulator = Accumulator()
    scores = hasattr(objective, "score")
    for index in range(cfg.train.val_batches):
        batch = next(batches)
        for mode in ("train", "score") if scores else ("train",):
            kwargs = {"score": True} if mode == "score" else {}
            inputs = objective.prepare(module.model, batch, np.random.default_rng([cfg.seed, 7919, rank, index]), **kwargs)
            inputs.step = cfg.train.max_steps  # the objective the stage ends on (stage 0's warm-up trains its heads alone)
            synchronize(inputs, world_size, objective.chunk)
            loss = engine(inputs, mode=mode)
            accumulator.add(module.last_sums | ({"loss": float(loss)} if mode == "train" else {}))
    engine.train()
    totals = accumulator.reduce()
    metrics = objective.metrics(totals)
    out = {"val_loss": totals["loss"] / (world_size * cfg.train.val_batches)}
    out.update({k if k.startswith("val_") else f"val_{k}": v for k, v in metrics.items()})
    return out


def write_into_place(out_dir: Path, write) -> None:
    """`write(folder)` into a folder beside `out_dir`, then that folder renamed to `out_dir`: a process
    stopped while writing leaves `out_dir` as it was (absent, or the earlier whole folder)."""
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    write(partial)
    if out_dir.exists():  # a restarted group's earlier export: replaced only once the new one is whole
        replaced = out_dir.with_name(out_dir.name + ".replaced")
        shutil.rmtree(replaced, ignore_errors=True)
        out_dir.rename(replaced)
        partial.rename(out_dir)
        shutil.rmtree(replaced)
    else:
        partial.rename(out_dir)


def export(
    engine, model: VAEmotionLLM, out_dir: Path, rank: int, ds_config: dict, held: dict[str, torch.Tensor] | None = None
) -> None:
    """Gather the full weights on rank 0 and write a folder `VAEmotionLLM.from_pretrained` loads
    (`held`: frozen weights kept outside the engine, e.g. a vision tower detached for a teacher cache).
    It is written beside `out_dir` and renamed into place: a run stopped while writing it (gigabytes at 7B)
    leaves no half-written folder that would load."""
    if zero_stage(ds_config) == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # collective: every rank takes part
    else:
        state = engine.module.state_dict() if rank == 0 else None
    if rank == 0:
        model_state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
        model_state.update(held or {})
        write_into_place(out_dir, lambda folder: model.save_pretrained(folder, state_dict=model_state))
    if dist.is_initialized():
        dist.barrier()
