"""Checkpoint layout, completeness, and the trainer state saved beside DeepSpeed's shards.

A checkpoint folder (Ray merges every rank's files into it):
    ds/                          DeepSpeed shards of the trained parameters and optimizer (tag "ds"),
    latest                       DeepSpeed's pointer to the tag,
    trainer_state_rank{R}.pt     step, data position, skip counts and RNG states of rank R,
    meta.json                    step, world size, loader workers, stage, launch id (rank 0),
    config.yaml                  the resolved config (rank 0).
Frozen weights are not saved: they come back from the starting model, which is fixed (an export, base
checkpoints, or the seeded tiny init). A folder missing any rank's files is incomplete and never
loaded; asked to resume from a run, the newest complete checkpoint is taken.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from vaemo.errors import UserError

TAG = "ds"
STEP_PREFIX = "step-"


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def missing_parts(folder: Path) -> list[str]:
    """What a checkpoint folder lacks; empty when it is complete."""
    meta_file = folder / "meta.json"
    if not meta_file.is_file():
        return ["meta.json"]
    meta = json.loads(meta_file.read_text())
    missing = [name for name in ("config.yaml", "latest") if not (folder / name).is_file()]
    for rank in range(int(meta["world_size"])):
        if not (folder / f"trainer_state_rank{rank}.pt").is_file():
            missing.append(f"trainer_state_rank{rank}.pt")
        if not list((folder / TAG).glob(f"*zero_pp_rank_{rank}_*model_states.pt")) and \
                not list((folder / TAG).glob(f"*rank_{rank:02d}_model_states.pt")) and \
                not list((folder / TAG).glob("mp_rank_00_model_states.pt")):
            missing.append(f"{TAG}/ shard of rank {rank}")
    return missing


def find_checkpoint(path: str | Path) -> Path:
    """`path` itself when it is a complete checkpoint, else the newest complete one below it."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"--resume-from '{path}' does not exist")
    if (path / "meta.json").is_file():
        problems = missing_parts(path)
        if problems:
            raise UserError(f"checkpoint '{path}' is incomplete (missing {', '.join(problems[:3])}); "
                            f"resume from an earlier one or from the run folder to take the newest complete one")
        return path
    candidates = sorted(p for p in path.rglob(f"{STEP_PREFIX}*") if p.is_dir() and (p / "meta.json").is_file())
    for candidate in sorted(candidates, key=lambda p: json.loads((p / "meta.json").read_text())["step"], reverse=True):
        if not missing_parts(candidate):
            return candidate
    raise UserError(f"--resume-from '{path}' holds no complete checkpoint")


def read_meta(folder: Path) -> dict:
    return json.loads((folder / "meta.json").read_text())


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
