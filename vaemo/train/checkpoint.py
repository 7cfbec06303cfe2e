"""Checkpoint layout, completeness, and the trainer state saved beside DeepSpeed's shards.

A checkpoint folder (Ray merges every rank's files into it):
    ds/                          DeepSpeed shards of the trained parameters and optimizer (tag "ds"),
    latest                       DeepSpeed's pointer to the tag,
    trainer_state_rank{R}.pt     step, data position, skip counts, RNG states and the step statistics
                                 not yet reported of rank R (tensors and plain values only: loaded with
                                 weights_only=True),
    meta.json                    step, world size, loader workers, the shard list's digest, stage, ZeRO
                                 stage, launch id (rank 0),
    config.yaml                  the resolved config (rank 0).
Frozen weights are not saved: they come back from the starting model, which is fixed (an export, base
checkpoints, or the seeded tiny init). A folder missing any rank's files, or holding one cut short, is
incomplete and never loaded; asked to resume from a run, the newest complete checkpoint is taken.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch

from vaemo import progress
from vaemo.config import Config, config_to_dict, differing_fields
from vaemo.errors import UserError

TAG = "ds"
STEP_PREFIX = "step-"


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def missing_parts(folder: Path) -> list[str]:
    """What a checkpoint folder lacks, or holds cut short; empty when it is complete. Ray copies each rank's
    files to their final names, so a run stopped mid-copy (a preempted node) leaves every name there and
    some file short: each torch file is a zip archive, whose directory is its last record."""
    meta_file = folder / "meta.json"
    if not meta_file.is_file():
        return ["meta.json"]
    try:
        meta = json.loads(meta_file.read_text())
    except ValueError:
        return ["meta.json (cut short)"]
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
    missing += [f"{f.relative_to(folder)} (cut short)" for f in sorted(folder.glob("**/*.pt")) if cut_short(f)]
    return missing


def cut_short(file: Path) -> bool:
    """A torch file shorter than any archive (a copy stopped before its first bytes), or a zip archive (a
    torch file: its first bytes say so) whose end lacks the archive's directory. Files in another format
    (a checkpoint engine of DeepSpeed's that writes its own) are not judged further."""
    with open(file, "rb") as f:
        head = f.read(ZIP_END_RECORD_BYTES)
    if len(head) < ZIP_END_RECORD_BYTES:
        return True
    return head[:4] == b"PK\x03\x04" and not zipfile.is_zipfile(file)


# The smallest zip archive (an empty one) is its end-of-directory record alone.
ZIP_END_RECORD_BYTES = 22


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
    for candidate in sorted(candidates, key=recorded_step, reverse=True):
        if not missing_parts(candidate):
            return candidate
    raise UserError(f"{flag} '{path}' holds no complete checkpoint")


def read_meta(folder: Path) -> dict:
    return json.loads((folder / "meta.json").read_text())


def recorded_step(folder: Path) -> int:
    """The step meta.json records; -1 when it was cut short (the folder is then incomplete anyway)."""
    try:
        return int(read_meta(folder)["step"])
    except (ValueError, KeyError, OSError):
        return -1


def step_folders(run_dir: Path) -> dict[int, Path]:
    """RUN/checkpoints/step-N folders by step (from the name: meta.json may be missing)."""
    folders = {}
    for folder in (run_dir / "checkpoints").glob(f"{STEP_PREFIX}*"):
        step = folder.name.removeprefix(STEP_PREFIX)
        if folder.is_dir() and step.isdigit():
            folders[int(step)] = folder
    return folders


def check_nothing_written_over(run_dir: Path, resume: Path) -> None:
    """A launch writes its checkpoints as RUN/checkpoints/step-N: a complete checkpoint of a later step
    already there (resuming from an earlier step after a divergence) would be written over, its files mixed
    with the new launch's. Refused, with the way out."""
    start = recorded_step(resume)
    later = [folder.name for step, folder in sorted(step_folders(run_dir).items()) if step > start and not missing_parts(folder)]
    if later:
        raise UserError(
            f"--out '{run_dir}' holds checkpoint(s) {', '.join(later[:3])}, later than --resume-from '{resume}' "
            f"(step {start}): its new checkpoints would be written over them; resume into another --out (or "
            "delete those)"
        )


# What decides which clips a run reads after a given step: a resume with other values continues the weights
# and the step, but not the data an uninterrupted run would have read.
STREAM_FIELDS = ("seed", "data.batch_size", "data.shuffle_buffer")
# What decides which parameters a stage trains and their shapes, by stage: a checkpoint's weights and
# optimizer state fit only the same (prefixes of dotted fields).
TRAINED_FIELDS = {
    0: ("model.tiny_vlm.", "prompts.questions", "stage2.emotions"),  # stage 0's heads: one per labelled set
    1: ("model.tiny_audio.", "model.projector.", "stage1.train_audio_encoder", "stage1.audio_encoder_top_layers"),
    2: (
        "model.projector.",
        "model.enhancer.",
        "model.supervisor.",
        "model.lora.",
        "stage2.use_enhancer",
        "stage2.use_supervisor",
        "stage2.emotions",
    ),
}
# Where the frozen weights come from (a checkpoint holds only the trained ones).
MODEL_FIELDS = ("model.vlm", "model.audio_encoder", "model.init_from")


def shard_list_digest(urls: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(urls).encode()).hexdigest()[:16]


def has_field(config: dict, dotted: str) -> bool:
    """Whether a saved config names the field (one written before the field existed does not)."""
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def check_resume_matches(cfg: Config, resume: Path, meta: dict, train_urls: list[str]) -> None:
    """A resume continues the checkpoint's run: the same trained parameters (else one line, here rather than
    an error of DeepSpeed's in every worker after the model loads), the same loader workers (each one's place
    in the data is saved), and for an exact continuation the same seed, batch size, shuffle buffer, shard
    list and starting model (else a line says what differs, and the run goes on)."""
    saved_workers = int(meta.get("loader_workers", cfg.data.loader_workers))
    if saved_workers != cfg.data.loader_workers:
        raise UserError(
            f"checkpoint '{resume}' was written with data.loader_workers={saved_workers}; resume with the same "
            f"value (got {cfg.data.loader_workers}): each loader worker's place in the data is saved"
        )
    import yaml

    saved = yaml.safe_load((resume / "config.yaml").read_text()) if (resume / "config.yaml").is_file() else None
    changed = differing_fields(saved, config_to_dict(cfg)) if isinstance(saved, dict) else {}
    trained = [name for name in changed if name.startswith(TRAINED_FIELDS[cfg.stage]) and has_field(saved, name)]
    if trained:
        now, then = changed[trained[0]]
        raise UserError(
            f"checkpoint '{resume}' was trained with {trained[0]}={then!r} (now {now!r}): it holds the weights and "
            "optimizer state of other parameters; resume with the checkpoint's value, or start a new run"
        )
    notes = [f"{name}={changed[name][0]!r} (the checkpoint's: {changed[name][1]!r})" for name in STREAM_FIELDS if name in changed]
    if meta.get("train_shards") not in (None, shard_list_digest(train_urls)):
        then = meta.get("train_shard_count", "?")
        notes.append(f"another data.train_shards list ({len(train_urls)} shard(s); the checkpoint's had {then})")
    if notes:
        progress.log(
            f"resuming with {'; '.join(notes)}: the weights and the step continue, but the clips read from here on "
            "are not those an uninterrupted run would have read"
        )
    moved = [f"{name}={changed[name][0]!r} (the checkpoint's: {changed[name][1]!r})" for name in MODEL_FIELDS if name in changed]
    if moved:
        progress.log(
            f"resuming with {'; '.join(moved)}: the frozen weights come from there (a checkpoint holds only the "
            "trained ones), so it must be the same model"
        )


def prepare_launch(run_dir: Path, resume: Path | None) -> list[str]:
    """Before a launch into a run folder that holds an earlier launch's checkpoints: forget Ray's record of
    them, and remove the incomplete step folders the new steps would be written into. Returns what was
    removed.

    Ray Train restores its list of an earlier launch's checkpoints from the run folder and prunes them as if
    they were this launch's (`train.keep_checkpoints`); a step folder deleted by hand then makes Ray refuse
    the folder ("corrupted run directory"). vaemo resumes from what it names (`--resume-from`), so each
    launch starts Ray's list afresh: Ray prunes only the launch's own checkpoints, and the earlier launch's
    stay where they are."""
    (run_dir / "checkpoints" / "checkpoint_manager_snapshot.json").unlink(missing_ok=True)
    start = recorded_step(resume) if resume is not None else 0
    removed = []
    for step, folder in sorted(step_folders(run_dir).items()):
        if step > start and missing_parts(folder):
            shutil.rmtree(folder)
            removed.append(folder.name)
    return removed


def rng_state() -> dict:
    """Every RNG's state as tensors and plain values only, so that loading it needs no unpickling: the CUDA
    generator's too (dropout on a GPU draws from it), that of the device this rank trains on."""
    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, torch.tensor(mt_state, dtype=torch.int64), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(int(x) for x in mt_state.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():  # a checkpoint of a CPU run resumed on a GPU has none
        torch.cuda.set_rng_state(state["cuda"])


def save_trainer_state(path: Path, step: int, stream: dict, unreported: dict[str, float] | None = None) -> None:
    """`unreported`: the rank's step statistics since its last report, which a resume's first report adds."""
    torch.save({"step": step, "stream": stream, "rng": rng_state(), "unreported": dict(unreported or {})}, path)


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
