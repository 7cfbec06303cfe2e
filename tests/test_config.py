"""The typed config: presets load, overrides apply last, and mistakes give one line naming the field."""

from __future__ import annotations

import dataclasses
import re
import sys

import pytest
from conftest import ROOT, cli, run

from vaemo import config as config_module
from vaemo.config import ConfigError, field_docs, load_config, render_config

PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_presets_load_for_every_stage(preset):
    for stage in (0, 1, 2):
        cfg = load_config(preset, stage=stage)
        assert cfg.stage == stage
        for field in (
            "seed",
            "train.max_steps",
            "train.checkpoint_every",
            "train.report_every",
            "scaling.num_workers",
        ):  # the fields spec/cli.md promises in every preset
            load_config(preset, [f"{field}=3"], stage=stage)


def test_stage_blocks_merge_and_command_line_overrides_win():
    base = load_config(ROOT / "configs/tiny.yaml")
    stage1 = load_config(ROOT / "configs/tiny.yaml", stage=1)
    assert stage1.train.max_steps != base.train.max_steps  # the stage1 block applied
    overridden = load_config(ROOT / "configs/tiny.yaml", ["train.max_steps=7", "train.lr=1e-4"], stage=1)
    assert overridden.train.max_steps == 7 and overridden.train.lr == pytest.approx(1e-4)


def test_a_preset_starts_from_its_base_and_changes_only_what_differs(tmp_path):
    (tmp_path / "sub").mkdir()
    base = tmp_path / "base.yaml"
    base.write_text(
        "seed: 4\ntrain: {max_steps: 9, lr: 1.0e-3}\nstages:\n  stage1:\n    train: {max_steps: 5, warmup_steps: 2}\n"
    )
    child = tmp_path / "sub" / "child.yaml"
    child.write_text("base: ../base.yaml\ntrain: {lr: 2.0e-3}\nstages:\n  stage1:\n    train: {max_steps: 6}\n")
    top, stage1 = load_config(child), load_config(child, stage=1)
    assert (top.seed, top.train.max_steps, top.train.lr) == (4, 9, pytest.approx(2e-3))
    assert (stage1.train.max_steps, stage1.train.warmup_steps, stage1.train.lr) == (6, 2, pytest.approx(2e-3))
    assert load_config(child, ["train.lr=5e-4"], stage=1).train.lr == pytest.approx(5e-4)  # the command line still wins

    base.write_text("base: sub/child.yaml\n")
    with pytest.raises(ConfigError, match="presets starting from each other"):
        load_config(child)
    child.write_text("base: ../missing.yaml\n")
    result = cli("config", "show", "--config", str(child))
    assert result.returncode == 2 and "missing.yaml' does not exist" in result.stderr and "Traceback" not in result.stderr


def test_the_demo_preset_is_the_tiny_preset_with_less_training():
    """`make demo` runs configs/tiny-demo.yaml; everything but the world's size and the step counts must stay
    the science preset's, so the demo shows the same pipeline."""
    for stage in (0, 1, 2):
        demo = dataclasses.asdict(load_config(ROOT / "configs/tiny-demo.yaml", stage=stage))
        tiny = dataclasses.asdict(load_config(ROOT / "configs/tiny.yaml", stage=stage))
        assert demo["train"]["max_steps"] < tiny["train"]["max_steps"]
        assert demo["synth"]["train_clips"] < tiny["synth"]["train_clips"]
        for cfg in (demo, tiny):
            cfg["train"].pop("max_steps")
            cfg["synth"].pop("train_clips")
        assert demo == tiny


def test_config_show_and_help_start_without_torch():
    """`vaemo config show` and `vaemo --help` answer in a fraction of a second: torch and transformers (seconds
    to import) are loaded only by the commands that run models."""
    probe = (
        "import contextlib, io, sys\n"
        "from vaemo.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as shown:\n"
        "    main(['config', 'show', '--stage', '1'])\n"
        "assert 'max_steps' in shown.getvalue()\n"
        "print(sorted(m for m in ('torch', 'transformers', 'ray') if m in sys.modules))\n"
    )
    result = run([sys.executable, "-c", probe], timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
    listed = cli("--help")
    assert listed.returncode == 0
    for command in ("data", "config", "train", "export", "eval", "sweep", "teacher-cache", "ask"):
        assert command in listed.stdout, command


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.max_stepz=3", "unknown config key 'train.max_stepz'; did you mean 'train.max_steps'?"),
        ("train.max_steps=many", "config field 'train.max_steps' must be an integer"),
        ("model.dtype=fp16", "config field 'model.dtype' must be one of"),
        ("scaling.use_gpu=maybe", "config field 'scaling.use_gpu' must be true or false"),
        ("train.max_steps=0", "config field 'train.max_steps' must be >= 1"),
        ("data", "override 'data' must look like key=value"),
    ],
)
def test_bad_values_are_one_clear_line(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs/tiny.yaml", [override], stage=0)
    assert message in str(err.value)
    result = cli("config", "show", "--config", "configs/tiny.yaml", override)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {err.value}"]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.tiny_vlm.num_heads=3"], "'model.tiny_vlm.hidden_size' must be a multiple of num_heads (3)"),
        (["model.tiny_vlm.num_kv_heads=3"], "'model.tiny_vlm.num_heads' must be a multiple of num_kv_heads (3)"),
        (["model.tiny_vlm.hidden_size=12", "model.tiny_vlm.num_heads=4"], "a head's width, 3) must be even"),
        (["model.tiny_vlm.vision_heads=16"], "a head width that is a multiple of 4"),  # 96 / 16: 6 channels
        (["model.tiny_audio.num_heads=5"], "'model.tiny_audio.d_model' must be a multiple of num_heads (5)"),
        (["stage0.questions_per_clip=-1"], "'stage0.questions_per_clip' must be >= 0"),
        (["data.pair_seconds=0"], "'data.pair_seconds' must be > 0"),
        (["stage2.lambda_sup=-5"], "'stage2.lambda_sup' must be >= 0"),
        (["stage2.lambda_lm=0", "stage2.lambda_kd=0", "stage2.use_supervisor=false"], "stage 2 would train nothing"),
        (["model.lora.rank=-1"], "'model.lora.rank' must be >= 0"),
        (["model.lora.rank=4", "model.lora.alpha=0"], "'model.lora.alpha' must be > 0"),
    ],
)
def test_settings_no_model_or_loss_can_use_are_refused_when_the_config_loads(overrides, message):
    """Each of these passed --check and then crashed the workers (exit 1), or trained nothing, or meant
    something else than it said (rank -1: no LoRA)."""
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs/tiny.yaml", overrides, stage=2)
    assert message in str(err.value)


def test_missing_or_broken_config_file(tmp_path):
    result = cli("config", "show", "--config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    result = cli("config", "show", "--config", str(broken))
    assert result.returncode == 2 and "not valid YAML" in result.stderr
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("trian:\n  max_steps: 3\n")
    result = cli("config", "show", "--config", str(unknown))
    assert result.returncode == 2 and "unknown config key 'trian'; did you mean 'train'?" in result.stderr


def test_every_field_is_documented_and_shown():
    import dataclasses

    for name in dir(config_module):
        cls = getattr(config_module, name)
        if isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls.__module__ == config_module.__name__:
            docs = field_docs(cls)
            undocumented = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
            assert not undocumented, f"{name}: {undocumented}"
    text = render_config(load_config(ROOT / "configs/tiny.yaml", stage=2))
    assert "# Optimizer steps of the schedule" in text and "max_steps:" in text


def unread_fields(source: str) -> list[str]:
    """Config fields (dotted) that `source` never reads as `.name` or names as a string."""
    import typing

    from vaemo.config import Config

    unread: list[str] = []

    def walk(cls: type, path: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not re.search(rf"\.{f.name}\b|['\"]{f.name}['\"]", source):
                unread.append(f"{path}{f.name}")
            for inner in (hints[f.name], *typing.get_args(hints[f.name])):
                if dataclasses.is_dataclass(inner):
                    walk(inner, f"{path}{f.name}.")

    walk(Config, "")
    return unread


def test_every_config_field_is_read_outside_the_config_module():
    """A documented field that nothing reads is a promise the code does not keep (validation in config.py
    does not count as reading it)."""
    files = [p for p in (ROOT / "vaemo").rglob("*.py") if p.name != "config.py"] + list((ROOT / "jobs").glob("*.py"))
    source = "\n".join(p.read_text() for p in files)
    assert unread_fields(source) == []
    planted = re.sub(r"\.bench_dir\b|['\"]bench_dir['\"]", ".somewhere_else", source)
    assert "data.bench_dir" in unread_fields(planted)


@pytest.mark.parametrize("on_gpu", [False, True])
def test_zero3_overlaps_and_prefetches_on_gpus_only(on_gpu, monkeypatch):
    """ds_configs/zero3.json leaves overlap_comm and the prefetch bucket "auto": on (streams overlap the
    collectives) where the workers have a GPU, off on CPU, where they only cost bookkeeping."""
    import torch

    from vaemo.train.ds_config import deepspeed_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: on_gpu)
    cfg = load_config(ROOT / "configs/tiny.yaml", ["deepspeed.config=ds_configs/zero3.json"], stage=1)
    zero = deepspeed_config(cfg, torch.float32)["zero_optimization"]
    assert zero["overlap_comm"] is on_gpu
    assert (zero["stage3_prefetch_bucket_size"] > 0) is on_gpu
