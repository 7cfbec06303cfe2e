"""Export a training checkpoint as a model folder, offline and in one process (no Ray, no GPU needed).

The checkpoint holds the trained parameters only; the frozen ones come from the starting model the
checkpoint's config names (an export, base checkpoints, or the seeded tiny init), rebuilt here.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from vaemo.args import output_folder
from vaemo.config import load_config
from vaemo.errors import UserError
from vaemo.train import checkpoint as ckpt
from vaemo.train.objectives import build_stage_model, objective_for


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from vaemo.train.trainer import StageModule

    folder = ckpt.find_checkpoint(checkpoint, "--checkpoint")
    out = output_folder(out)  # before the model is built
    cfg = load_config(folder / "config.yaml")
    objective = objective_for(cfg)
    parts = build_stage_model(cfg, objective)
    model, extra, trained = parts.model, parts.extra, parts.trainable
    module = StageModule(model, extra, objective)
    state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=ckpt.TAG, exclude_frozen_parameters=True)
    wanted = {f"model.{name}" if not name.startswith("extra.") else name for name in trained}
    missing = sorted(wanted - set(state))
    if missing:
        raise UserError(f"checkpoint '{folder}' lacks trained weights, e.g. {missing[:3]}")
    shapes = {name: p.shape for name, p in module.named_parameters()}
    wrong = sorted(k for k in state if k in shapes and tuple(state[k].shape) != tuple(shapes[k]))
    if wrong:
        raise UserError(f"checkpoint '{folder}' does not fit its config's model: mis-sized {wrong[:3]}")
    module.load_state_dict(state, strict=False)
    model.save_pretrained(out)
    return out
