"""The GPU paths, skipped without a CUDA device: DeepSpeed ZeRO-3 over NCCL with ZeRO's GPU settings (comm
overlap, prefetch) in bf16, through the trainer's own `build_engine`, for every stage of the tiny preset and for
the 7B preset's settings on checkpoint folders in the hub's layout read straight onto the GPU.

One rank (world size 1): the collectives still run through NCCL. Each step's loss is checked against the same
step computed without DeepSpeed on the CPU in the same precision, and a few steps on one batch must lower it.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from conftest import ROOT, free_port
from test_model import real_format_config
from test_stages import labelled_batch

from vaemo.config import Config, load_config
from vaemo.train.objectives import build_stage_model, objective_for
from vaemo.train.reporting import Accumulator
from vaemo.train.trainer import StageEngine, build_engine, synchronize

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
STEPS = 4


def tiny(stage: int) -> Config:
    overrides = ["model.dtype=bfloat16", "train.warmup_steps=0", "deepspeed.config=ds_configs/zero3.json"]
    return load_config(ROOT / "configs/tiny.yaml", overrides, stage=stage)


def runs(hf_checkpoints) -> dict[str, tuple[Config, Config]]:
    """Each run's config, and the same run's config as the CPU computes it (dtype spelled out)."""
    out = {f"tiny stage {stage}": (tiny(stage), tiny(stage)) for stage in (0, 1, 2)}
    overrides = ("train.warmup_steps=0", "train.lr=1e-3")
    out["7B preset stage 1"] = (
        real_format_config(hf_checkpoints, *overrides),
        real_format_config(hf_checkpoints, *overrides, "model.dtype=bfloat16"),
    )
    return out


def first_step(cfg: Config) -> int:
    """Stage 0's steps start past its vision warm-up, so that the vision tower trains too."""
    return cfg.stage0.vision_warmup_steps + 1 if cfg.stage == 0 else 1


def first_loss_without_deepspeed(cfg: Config) -> float:
    """The first step on the CPU without DeepSpeed or a process group, in the same precision."""
    objective = objective_for(cfg)
    parts = build_stage_model(cfg, objective, drop_vision=objective.cached)
    inputs = objective.prepare(parts.model, labelled_batch(cfg), np.random.default_rng([0, 104729, 0, first_step(cfg)]))
    inputs.step = first_step(cfg)
    synchronize(inputs, 1, objective.chunk)
    with torch.no_grad():
        return float(objective.loss(parts.model, parts.extra, inputs).loss)


@pytest.fixture(scope="module")
def cpu_first_losses(hf_checkpoints) -> dict[str, float]:
    """Computed before the NCCL group exists: the CPU's tensors cannot go through NCCL's collectives."""
    return {name: first_loss_without_deepspeed(cpu_cfg) for name, (_, cpu_cfg) in runs(hf_checkpoints).items()}


@pytest.fixture(scope="module")
def nccl(cpu_first_losses):
    """A one-rank NCCL process group, as Ray Train's workers set up on GPUs (the suite defaults DeepSpeed
    to its CPU accelerator: this module wants CUDA's)."""
    import deepspeed
    from deepspeed.accelerator import set_accelerator
    from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator

    os.environ["DS_ACCELERATOR"] = "cuda"
    set_accelerator(CUDA_Accelerator())
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    torch.cuda.set_device(0)
    deepspeed.init_distributed(dist_backend="nccl")
    assert torch.distributed.get_backend() == "nccl"
    yield
    torch.distributed.destroy_process_group()


def train_steps(built: StageEngine, batch, first: int, steps: int) -> list[float]:
    """The trainer's step (trainer.train_loop) on one batch, `steps` times, with its collectives: the
    normalisers' all-reduce and the metrics' sums over ranks."""
    losses, accumulator = [], Accumulator()
    for step in range(first, first + steps):
        inputs = built.objective.prepare(built.model, batch, np.random.default_rng([0, 104729, 0, step]))
        inputs.step = step
        synchronize(inputs, 1, built.objective.chunk)
        assert inputs.global_counts == {k: float(v) for k, v in inputs.counts.items()}  # one rank: its own
        loss = built.engine(inputs)
        built.engine.backward(loss)
        built.engine.step()
        losses.append(float(loss.detach()))
        accumulator.add({**built.module.last_sums, "loss": losses[-1]})
    assert accumulator.reduce() == pytest.approx(dict(accumulator.sums))
    return losses


def check_run(cfg: Config, reference: float) -> list[float]:
    """`cfg` through the trainer's engine; `reference`: its first loss on the CPU."""
    built = build_engine(cfg, rank=0, use_gpu=True)
    zero = built.ds_config["zero_optimization"]
    assert zero["stage"] == 3 and built.ds_config["bf16"]["enabled"] is True
    assert zero["overlap_comm"] is True and zero["stage3_prefetch_bucket_size"] > 0  # ZeRO's GPU settings
    assert all(p.device.type == "cuda" for p in built.engine.module.parameters())
    assert all(t.device.type == "cuda" for t in built.replicated.values())
    assert all(p.dtype == torch.bfloat16 for p in built.model.parameters() if not p.requires_grad)
    losses = train_steps(built, labelled_batch(cfg), first_step(cfg), STEPS)
    print(f"stage {cfg.stage}: losses {losses}; the first step on the CPU without DeepSpeed {reference}")
    assert all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < losses[0], losses
    # bf16 kernels differ between the CPU and the GPU: a few percent, not a different computation
    assert losses[0] == pytest.approx(reference, rel=0.1, abs=5e-4)
    return losses


@pytest.mark.parametrize("name", ["tiny stage 0", "tiny stage 1", "tiny stage 2", "7B preset stage 1"])
def test_each_stage_trains_under_zero3_over_nccl_in_bf16_as_on_the_cpu(nccl, hf_checkpoints, cpu_first_losses, name):
    """The 7B preset's settings on checkpoint folders in the hub's layout: weights read straight onto the GPU
    (device_map), frozen weights replicated outside ZeRO-3, activation checkpointing, dtype and attention
    "auto" (bf16 and the GPU's attention)."""
    cfg, _ = runs(hf_checkpoints)[name]
    check_run(cfg, cpu_first_losses[name])


def test_a_checkpoint_keeps_the_cuda_generator_so_dropout_on_a_gpu_resumes_alike():
    from vaemo.train.checkpoint import rng_state, set_rng_state

    torch.cuda.manual_seed(5)
    torch.rand(3, device="cuda")
    saved = rng_state()
    expected = torch.rand(4, device="cuda")
    torch.rand(100, device="cuda")
    set_rng_state(saved)
    assert "cuda" in saved and torch.equal(torch.rand(4, device="cuda"), expected)
