"""DeepSpeed JSON from ds_configs/, with the values the run config knows filled in ("auto")."""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import torch

from vaemo.config import Config, resolve_path
from vaemo.errors import UserError, read_user_text


def deepspeed_config(cfg: Config, dtype: torch.dtype) -> dict[str, Any]:
    path = resolve_path(cfg.deepspeed.config)
    if not path.is_file():
        raise UserError(f"deepspeed.config '{cfg.deepspeed.config}' does not exist")
    try:
        ds = json.loads(read_user_text(path, "deepspeed.config"))
    except ValueError as err:
        raise UserError(f"deepspeed.config '{path}' is not valid JSON: {err}") from None
    known = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.train.grad_clip,
    }
    for key, value in known.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    if ds["train_micro_batch_size_per_gpu"] != cfg.data.batch_size:  # the loader's batches are data.batch_size
        raise UserError(
            f"deepspeed.config '{path}': train_micro_batch_size_per_gpu={ds['train_micro_batch_size_per_gpu']} "
            f'differs from data.batch_size={cfg.data.batch_size}; set it to "auto" (data.batch_size is the one used)'
        )
    if ds["gradient_accumulation_steps"] != 1:
        # Each step's loss is normalised over that step's response tokens on all ranks (worker.py); over
        # several micro-batches the normaliser would have to cover tokens not yet seen.
        raise UserError(
            f"deepspeed.config '{path}': gradient_accumulation_steps="
            f"{ds['gradient_accumulation_steps']} is not supported; use 1 and raise data.batch_size "
            f"or scaling.num_workers"
        )
    on_gpu = torch.cuda.is_available()
    zero = ds.get("zero_optimization", {})
    # On GPUs ZeRO overlaps its collectives with compute on side streams and prefetches the next modules'
    # parameters; a CPU has no streams to overlap, and there the bookkeeping costs 10-30% of a small
    # model's ZeRO-3 step (bench/trainer_overhead.py), so "auto" turns both off on CPU.
    for key, gpu_value in (("overlap_comm", True), ("stage3_prefetch_bucket_size", 50_000_000)):
        if zero.get(key) == "auto":
            zero[key] = gpu_value if on_gpu else type(gpu_value)(0)
    ds.setdefault("bf16", {})
    if ds["bf16"].get("enabled", "auto") == "auto":
        ds["bf16"]["enabled"] = dtype == torch.bfloat16
    if "optimizer" in ds:
        params = ds["optimizer"].setdefault("params", {})
        for key, value in (("lr", cfg.train.lr), ("weight_decay", cfg.train.weight_decay)):
            if params.get(key, "auto") == "auto":
                params[key] = value
        if not on_gpu:
            params.setdefault("torch_adam", True)  # avoids a ~70 s JIT build of FusedAdam on CPU
    leftover = _find_auto(ds)
    if leftover:
        raise UserError(f"deepspeed.config '{path}': '{leftover}' is \"auto\" but vaemo has no value for it")
    ds.setdefault("steps_per_print", 10**9)
    return ds


class LeafBlocks(NamedTuple):
    marked: list[str]
    """Block classes ZeRO-3 fetches whole."""
    trainable: list[str]
    """Block classes asked for but left to per-module hooks because they hold trainable parameters."""


def mark_leaf_modules(module: torch.nn.Module, names: list[str]) -> LeafBlocks:
    """Mark the blocks ZeRO-3 fetches whole (`deepspeed.leaf_modules`, "auto" standing for the blocks the
    transformers models in `module` never split). Call after freezing: a block that holds trainable
    parameters keeps DeepSpeed's hooks on every module, because DeepSpeed reduces a leaf block's gradients
    once per backward pass *of the block*, and a block that runs twice in one step (stage 2's LM and KD
    passes through a LoRA-wrapped decoder layer) would have its gradients reduced twice."""
    from deepspeed.utils import set_z3_leaf_module
    from transformers import PreTrainedModel

    wanted = {name for name in names if name != "auto"}
    if "auto" in names:
        wanted |= {n for m in module.modules() if isinstance(m, PreTrainedModel) for n in m._no_split_modules or ()}
    marked, trainable = set(), set()
    for block in module.modules():
        name = type(block).__name__
        if name not in wanted:
            continue
        if any(p.requires_grad for p in block.parameters()):
            trainable.add(name)
        else:
            set_z3_leaf_module(block, True)
            marked.add(name)
    return LeafBlocks(sorted(marked), sorted(trainable))


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def _find_auto(node: Any, path: str = "") -> str | None:
    if isinstance(node, dict):
        for key, value in node.items():
            found = _find_auto(value, f"{path}.{key}" if path else key)
            if found:
                return found
    elif node == "auto":
        return path
    return None
