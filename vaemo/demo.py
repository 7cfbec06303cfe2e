"""The whole story on the synthetic world: see (stage 0), hear by seeing (stage 1), feel (stage 2).

data -> stage 0 -> eval -> teacher cache -> stage 1 -> eval -> stage 2 -> eval [-> stage-2 ablations -> eval],
then a report: accuracy per modality x task after each stage (a table, report.md, report.png) and the
targets the story must show, each marked PASS or MISS with its measured number. One Ray instance
serves every stage and evaluation. Stages already finished in OUT are reused (pass --fresh to redo).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vaemo import progress
from vaemo.args import non_negative_int, output_folder
from vaemo.config import STAGES, load_config, project_root
from vaemo.errors import UserError
from vaemo.eval.report import baseline_reports, chart, deaf_cell, table
from vaemo.eval.run import evaluate_runs, write_outputs

ABLATIONS = {
    "no-enhancer": ["stage2.use_enhancer=false"],
    "no-supervisor": ["stage2.use_supervisor=false"],
    "no-adapter": ["stage2.use_enhancer=false", "stage2.use_supervisor=false"],
}


@dataclass
class Target:
    """A claim the run checks, what was measured (a number, or a cell such as "0.81 +- 0.04 (...)"), and
    whether the claim holds."""

    claim: str
    measured: float | str
    passed: bool

    def line(self) -> str:
        shown = f"{self.measured:.3f}" if isinstance(self.measured, float) else self.measured
        return f"{'PASS' if self.passed else 'MISS'}  {self.claim}: {shown}"


def stage_done(run_dir: Path, cfg) -> bool:
    """A finished run of this very stage: the same resolved config, all its steps, and an export newer
    than the model it started from (a retrained earlier stage makes every later one stale)."""
    export = run_dir / "export" / "vaemo_config.json"
    metrics, saved = run_dir / "metrics.jsonl", run_dir / "config.yaml"
    if not (export.is_file() and metrics.is_file() and saved.is_file()):
        return False
    try:
        if load_config(saved) != cfg:
            return False
    except UserError:
        return False
    start = Path(cfg.model.init_from) / "vaemo_config.json" if cfg.model.init_from else None
    if start is not None and (not start.is_file() or start.stat().st_mtime > export.stat().st_mtime):
        return False
    lines = metrics.read_text().strip().splitlines()
    return bool(lines) and json.loads(lines[-1])["step"] == cfg.train.max_steps


def train(stage: int, out: Path, config: str, overrides: list[str], fresh: bool) -> Path:
    from vaemo.train.launch import run_stage

    cfg = load_config(config, overrides, stage=stage)
    if not fresh and stage_done(out, cfg):
        progress.log(f"stage {stage}: reusing {out / 'export'}")
        return out / "export"
    run_stage(stage, config, out, overrides, overwrite=True)
    return out / "export"


def score(model: Path, bench: Path, out: Path, label: str, actors: int) -> dict:
    return score_runs({label: (model, bench, out)}, actors)[label]


def score_runs(evals: dict[str, tuple[Path, Path, Path]], actors: int) -> dict[str, dict]:
    """Score exports on benches {label: (export, bench, output folder)} with one actor pool; each folder
    gets the outputs of `jobs/eval.py`. Returns {label: report}."""
    scored = evaluate_runs({label: (model, bench) for label, (model, bench, _) in evals.items()}, actors=actors)
    reports = {}
    for label, (report, results) in scored.items():
        write_outputs(evals[label][2], report, results, baseline_reports(report))
        reports[label] = report
    return reports


def emotion(report: dict, modality: str) -> float:
    return report["accuracy"].get(modality, {}).get("emotion", float("nan"))


# One run is one draw: the demo's thresholds sit below `make science`'s targets (means over seeds) by about
# the spread between seeds (README, "What the pipeline shows, over seeds"), so a healthy run passes on any machine.
MARGIN = 0.05
# `make demo` trains less than `make science` (configs/tiny-demo.yaml: half the clips, 1000 / 1200 / 100 steps)
# to fit 15 minutes. Over seeds 0-2 (`jobs/science.py --config configs/tiny-demo.yaml`, 2026-12-04) its means
# sat below science's by 0.02 (visual content after stage 0: 0.922), 0.08 (audio emotion after stage 1: 0.802
# against 0.884; seeds 0.812, 0.802, 0.792), 0.08 in the Supervisor's arousal error (0.336 against 0.254) and
# 0.02 in the audio-visual margin (-0.014 against +0.003). The levels and that margin give this much more away;
# stage 2's changes, the deaf check and chance are judged as in science, with MARGIN.
SHORT_SCHEDULE = 0.05
# Issue 13's science targets (means over seeds): visual accuracy after stage 0, audio accuracy after stage 1
# and the Supervisor's mean absolute arousal error on audio. The demo's thresholds give MARGIN and
# SHORT_SCHEDULE away from each.
SEEING = 0.9
HEARING = 0.85
AROUSAL_ERROR = 0.3


def targets(reports: dict[str, dict]) -> list[Target]:
    s0, s1, s2 = reports["after stage 0"], reports["after stage 1"], reports["after stage 2"]
    acc = lambda r, m, t: r["accuracy"][m][t]  # noqa: E731
    allowance = MARGIN + SHORT_SCHEDULE
    seeing = SEEING - allowance
    out = [
        Target(f"after stage 0, visual {t} >= {seeing:.2f}", acc(s0, "visual", t), acc(s0, "visual", t) >= seeing)
        for t in ("content", "emotion")
    ]
    for task in ("content", "emotion"):  # chance: within ~2 standard errors of 0.25 on these item counts
        n = s0["counts"]["audio"][task]
        value = acc(s0, "audio", task)
        out.append(
            Target(
                f"before stage 1, audio {task} at chance (0.25 +- {2 * (0.1875 / n) ** 0.5:.2f})",
                value,
                abs(value - 0.25) <= 2 * (0.1875 / n) ** 0.5,
            )
        )
    for task in ("content", "emotion"):
        out.append(
            Target(
                f"after stage 1 (no audio labels), audio {task} >= {HEARING - allowance:.2f}",
                acc(s1, "audio", task),
                acc(s1, "audio", task) >= HEARING - allowance,
            )
        )
    deaf = s1.get("deaf_check", {})
    out.append(
        Target(
            "after stage 1, deaf check (shuffled soundtracks) <= 0.35",
            deaf.get("accuracy", float("nan")),
            deaf.get("accuracy", 1.0) <= 0.35,
        )
    )
    gap = deaf.get("donor_accuracy", float("nan")) - acc(s1, "audio", "all")
    out.append(
        Target(
            f"after stage 1, deaf check against the donor's answer within {0.05 + MARGIN:.2f} of audio accuracy",
            gap,
            abs(gap) <= 0.05 + MARGIN,
        )
    )
    change = emotion(s2, "audio") - emotion(s1, "audio")
    out.append(Target(f"stage 2 audio emotion change >= {-MARGIN:.2f}", change, change >= -MARGIN))
    cost = acc(s2, "audio", "content") - acc(s1, "audio", "content")
    out.append(
        Target(f"stage 2 audio content change >= {-0.02 - MARGIN:.2f} (keeps what stage 1 taught)", cost, cost >= -0.02 - MARGIN)
    )
    # Only a trained Emotion Supervisor predicts valence and arousal: this fails when stage 2 does nothing
    # (a constant guess: about 0.66). Over seeds 0-2 the demo's schedule measured 0.320-0.346.
    arousal = s2.get("va", {}).get("audio", {}).get("arousal_mae", float("nan"))
    limit = AROUSAL_ERROR + allowance
    out.append(Target(f"after stage 2, audio arousal error (the Supervisor's) <= {limit:.2f}", arousal, arousal <= limit))
    best_single = max(emotion(s2, "audio"), emotion(s2, "visual"))
    margin = emotion(s2, "audio_visual") - best_single
    out.append(
        Target(
            f"after stage 2, audio-visual emotion minus the better single modality >= {-allowance:.2f}",
            margin,
            margin >= -allowance,
        )
    )
    return out


# A world is written in two parts, each when the pipeline first needs it: "training" (the train and val
# shards, before stage 0) and "eval" (the benches, before the first evaluation). `make science` writes
# them ahead in the background, in the order its seeds need them.
WORLD_PARTS = ("training", "eval")
TRAINING_WRITTEN = "splits.json"  # written last by the training part: its counts


def write_world_part(part: str, data: Path, config: str, seed: int, fresh: bool, dev_and_shifted: bool) -> None:
    """One part of the world in DATA, unless it is already complete. "training": train and val shards.
    "eval": the bench; with `dev_and_shifted` also val-bench (the val split's clips asked as a bench: the dev
    split settings are chosen on) and shifted-bench (clips written with other settings inside the spec than
    training used: 4-8 s long, the renderer without domain randomisation)."""
    from vaemo.data.synth import Ranges, bench_from_shards, synthesize, write_world

    synth = load_config(config).synth
    # The bench is written after the training part (and was written last by runs before there were parts),
    # so it marks that part done too.
    bench_written = (data / "bench" / "items.jsonl").is_file()
    if part == "training" and (fresh or not ((data / TRAINING_WRITTEN).is_file() or bench_written)):
        counts = write_world(data, synth, seed, splits=("train", "val"))
        (data / TRAINING_WRITTEN).write_text(json.dumps({k: counts[k] for k in ("train", "val")}))
    if part != "eval":
        return
    if fresh or not bench_written:
        write_world(data, synth, seed, splits=("bench",))
    if dev_and_shifted and (fresh or not (data / "val-bench" / "items.jsonl").is_file()):
        bench_from_shards(sorted((data / "val").glob("*.tar")), data / "val-bench", seed)
    if dev_and_shifted and (fresh or not (data / "shifted" / "bench" / "items.jsonl").is_file()):
        shifted = Ranges(
            short_side=tuple(synth.short_side),
            aspect_ratio=tuple(synth.aspect_ratio),
            fps=tuple(synth.fps),
            duration=(4.0, 8.0),
            jitter=False,
        )
        synthesize(
            data / "shifted",
            train_clips=0,
            val_clips=0,
            bench_clips=synth.bench_clips,
            seed=seed + 1000,
            ranges=shifted,
            workers=synth.workers,
        )


def stage1_teacher_cache(out: Path, config: str, overrides: list[str], fresh: bool, actors: int) -> list[str]:
    """Run the frozen stage-0 teacher once over the train and val clips (`vaemo teacher-cache`) and return the
    overrides that make stage 1 read it. On 2 CPU cores a cached stage-1 run takes 4.8 min against 8.2 online,
    plus about 1 min for the cache. A cache whose fingerprint (starting model, prompts, frames, k,
    temperature) still matches is reused."""
    from vaemo.cache_fingerprint import fingerprint
    from vaemo.data.teacher_records import MANIFEST
    from vaemo.teacher_cache import build_cache, cache_config, default_shards

    cache = out / "teacher-cache"
    cfg = cache_config(config, overrides)
    manifest = cache / MANIFEST
    if not fresh and manifest.is_file() and json.loads(manifest.read_text()).get("fingerprint") == fingerprint(cfg)[0]:
        progress.log(f"stage 1: reusing the teacher cache {cache}")
    else:
        shutil.rmtree(cache, ignore_errors=True)
        build_cache(cfg, default_shards(cfg), cache, actors)
    return ["stage1.teacher.mode=cache", f"stage1.teacher.cache_dir={cache}"]


def run_pipeline(
    out: Path,
    config: str,
    seed: int | None,
    ablations: tuple[str, ...],
    fresh: bool,
    actors: int,
    dev_and_shifted: bool = False,
    stage1_teacher: str = "cache",
    world: Callable[[str], None] | None = None,
) -> dict[str, dict]:
    """data -> stage 0 -> [teacher cache ->] stage 1 -> stage 2 [-> the named ABLATIONS] -> every export
    scored; returns the reports. `seed`: world and training seed (None: the preset's). `stage1_teacher`:
    `cache` (the frozen teacher runs once per clip) or `online` (every step). `world(part)`: returns once
    that part of OUT/data (`WORLD_PARTS`) is written; by default the run writes it itself, when it needs it."""
    out = out.resolve()
    seed_overrides = [] if seed is None else [f"seed={seed}"]
    data = out / "data"
    world_seed = load_config(config, seed_overrides).seed
    world = world or (lambda part: write_world_part(part, data, config, world_seed, fresh, dev_and_shifted))
    world("training")
    data_overrides = [
        *seed_overrides,
        f"data.train_shards={data}/train/*.tar",
        f"data.val_shards={data}/val/*.tar",
        f"data.bench_dir={data}/bench",
    ]
    bench = data / "bench"
    # Every export is scored at the end, by one actor pool: each pool's start (processes, imports) costs
    # seconds, and nothing here needs a score before the next stage.
    evals: dict[str, tuple[Path, Path, Path]] = {}
    exports: dict[int, Path] = {}
    for stage in STAGES:
        start = [f"model.init_from={exports[stage - 1]}"] if stage else []
        if stage == 1 and stage1_teacher == "cache":
            start += stage1_teacher_cache(out, config, [*data_overrides, *start], fresh, actors)
        exports[stage] = train(stage, out / f"stage{stage}", config, [*data_overrides, *start], fresh)
        evals[f"after stage {stage}"] = (exports[stage], bench, out / f"eval-stage{stage}")
        if dev_and_shifted:
            evals[f"after stage {stage}, val split"] = (exports[stage], data / "val-bench", out / f"eval-stage{stage}-val")
        if dev_and_shifted and stage == 2:
            evals["after stage 2, shifted bench"] = (exports[stage], data / "shifted" / "bench", out / "eval-stage2-shifted")
    for name in ablations:
        switches = ABLATIONS[name]
        export = train(2, out / f"stage2-{name}", config, [*data_overrides, f"model.init_from={exports[1]}", *switches], fresh)
        evals[f"stage 2 {name}"] = (export, bench, out / f"eval-stage2-{name}")
    world("eval")
    return score_runs(evals, actors)


def run_demo(out: Path, config: str, ablations: bool, fresh: bool, actors: int, stage1_teacher: str = "cache") -> int:
    start = time.time()
    output_folder(out)
    reports = run_pipeline(out, config, None, tuple(ABLATIONS) if ablations else (), fresh, actors, stage1_teacher=stage1_teacher)
    return report(out.resolve(), reports, time.time() - start)


def report(out: Path, reports: dict[str, dict], seconds: float) -> int:
    rows = {
        **baseline_reports(reports["after stage 2"]),
        **reports,
    }
    progress.console.print(table(rows, title="ArtEmoBench accuracy per stage (4 options; chance 0.25)"))
    chart(rows, out / "report.png", title="VAEmotionLLM on ArtEmo-Synth: what each stage adds")
    checks = targets(reports)
    for check in checks:
        progress.log(check.line())
    lines = [
        "# vaemo demo report",
        "",
        f"Wall time of this run: {seconds / 60:.1f} min.",
        "",
        "| model | "
        + " | ".join(f"{m} {t}" for m in ("audio", "visual", "audio_visual") for t in ("content", "emotion"))
        + " | deaf check (vs donor) |",
        "|---|" + "---|" * 7,
    ]
    for name, r in rows.items():
        cells = [
            f"{r['accuracy'].get(m, {}).get(t, float('nan')):.3f}"
            for m in ("audio", "visual", "audio_visual")
            for t in ("content", "emotion")
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {deaf_cell(r)} |")
    lines += ["", "Targets:", "", *[f"- {c.line()}" for c in checks], ""]
    (out / "report.md").write_text("\n".join(lines))
    (out / "report.json").write_text(
        json.dumps({"reports": reports, "wall_seconds": seconds, "targets": [c.__dict__ for c in checks]}, indent=2)
    )
    progress.log(
        f"demo finished in {seconds / 60:.1f} min: {sum(c.passed for c in checks)}/{len(checks)} targets met; "
        f"{out / 'report.md'}, {out / 'report.png'}, final evaluation {out / 'eval-stage2' / 'results.json'}"
    )
    return 0


def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument(
        "--config",
        default=str(project_root() / "configs" / "tiny-demo.yaml"),
        help="the preset (default: the tiny preset's shorter demo schedule; configs/tiny.yaml is what make science runs)",
    )
    p.add_argument("--ablations", action="store_true", help="also run stage 2 without Enhancer / Supervisor / both")
    p.add_argument("--fresh", action="store_true", help="redo every step instead of reusing finished ones")
    add_pipeline_args(p)


def add_pipeline_args(p: argparse.ArgumentParser) -> None:
    """What `make demo` and `make science` share."""
    p.add_argument("--actors", type=non_negative_int, default=2, help="evaluation and teacher-cache actors (0: in this process)")
    p.add_argument(
        "--stage1-teacher",
        choices=("cache", "online"),
        default="cache",
        help="stage 1 reads the frozen teacher's top-k from a cache written once (default) or runs it every step",
    )
