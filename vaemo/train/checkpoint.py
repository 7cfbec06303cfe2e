"""Checkpoint layout, completeness, and the trainer state saved beside DeepSpeed's shards.

A checkpoint folder (Ray merges every rank's files into it):
    ds/                          DeepSpeed shards of the trained parameters and optimizer (tag "ds"),
    latest                       DeepSpeed's pointer to the tag,
    trainer_state_rank{R}.pt     step, data position, skip counts and RNG states of rank R (tensors and
                                 plain values only: loaded with weights_only=True),
    meta.json                    step, world size, loader workers, stage, ZeRO stage, launch id (rank 0),
    config.yaml                  the resolved config (rank 0).
Frozen weights are not saved: they come back from the starting model, which is fixed (an export, base
checkpoints, or the seeded tiny init). A folder missing any rank's files is incomplete and never
loaded; asked to resume from a run, the newest complete checkpoint is taken.
"""

from __future__ import annotations

import json
import pickle
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
    # ZeRO-1/2/3 write an optimizer shard per rank; a checkpoint from before meta.json recorded the stage
    # is sharded when any rank's optimizer file is there.
    sharded_optimizer = int(meta.get("zero_stage", 0)) > 0 or any((folder / TAG).glob("*optim_states.pt"))
    for rank in range(int(meta["world_size"])):
        if not (folder / f"trainer_state_rank{rank}.pt").is_file():
            missing.append(f"trainer_state_rank{rank}.pt")
        if (
            not list((folder / TAG).glob(f"*zero_pp_rank_{rank}_*model_states.pt"))
            and not list((folder / TAG).glob(f"*rank_{rank:02d}_model_states.pt"))
            and not list((folder / TAG).glob("mp_rank_00_model_states.pt"))
        ):
            missing.append(f"{TAG}/ shard of rank {rank}")
        if sharded_optimizer and not list((folder / TAG).glob(f"*zero_pp_rank_{rank}_*optim_states.pt")):
            missing.append(f"{TAG}/ optimizer shard of rank {rank}")
    return missing


def find_checkpoint(path: str | Path, flag: str = "--resume-from") -> Path:
    """`path` itself when it is a complete checkpoint, else the newest complete one below it. `flag`: the
    argument that named it, for the error."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{flag} '{path}' does not exist")
    if (path / "meta.json").is_file():
        problems = missing_parts(path)
        if problems:
            raise UserError(
                f"checkpoint '{path}' is incomplete (missing {', '.join(problems[:3])}); "
                f"resume from an earlier one or from the run folder to take the newest complete one"
            )
        return path
    candidates = sorted(p for p in path.rglob(f"{STEP_PREFIX}*") if p.is_dir() and (p / "meta.json").is_file())
    for candidate in sorted(candidates, key=lambda p: json.loads((p / "meta.json").read_text())["step"], reverse=True):
        if not missing_parts(candidate):
            return candidate
    raise UserError(f"{flag} '{path}' holds no complete checkpoint")


def read_meta(folder: Path) -> dict:
    return json.loads((folder / "meta.json").read_text())


def rng_state() -> dict:
    """Every RNG's state as tensors and plain values only, so that loading it needs no unpickling."""
    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, torch.tensor(mt_state, dtype=torch.int64), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict) -> None:
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(int(x) for x in mt_state.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


def save_trainer_state(path: Path, step: int, stream: dict) -> None:
    torch.save({"step": step, "stream": stream, "rng": rng_state()}, path)


def load_trainer_state(path: Path) -> dict:
    """A rank's trainer state; `weights_only` refuses anything but tensors and plain containers, so a
    checkpoint folder someone hands you cannot run code through it."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(
            f"'{path}' holds objects other than tensors and plain values; refusing to load it ({str(err).splitlines()[0][:120]})"
        ) from None


def check_deepspeed_files(folder: Path, rank: int) -> None:
    """Refuse DeepSpeed files of this rank that hold more than tensors, plain values and DeepSpeed's own
    records (loss scaler, ZeRO stage, fragment addresses), before DeepSpeed itself unpickles them (it loads with
    weights_only=False)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    files = [
        f
        for f in sorted((folder / TAG).glob("*.pt"))
        if f.name == "mp_rank_00_model_states.pt"
        or f.name.startswith(f"zero_pp_rank_{rank}_")
        or f"_zero_pp_rank_{rank}_" in f.name
    ]
    with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
        for file in files:
            try:
                torch.load(file, weights_only=True, map_location="cpu")
            except pickle.UnpicklingError as err:
                raise UserError(
                    f"'{file}' holds objects other than tensors, plain values and DeepSpeed's own "
                    f"records; refusing to load it ({str(err).splitlines()[0][:120]})"
                ) from None
