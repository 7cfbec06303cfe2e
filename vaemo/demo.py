"""The whole story on the synthetic world: see (stage 0), hear by seeing (stage 1), feel (stage 2).

data -> stage 0 -> eval -> stage 1 -> eval -> stage 2 -> eval [-> stage-2 ablations -> eval], then a
report: accuracy per modality x task after each stage (a table, report.md, report.png) and the
targets the story must show, each marked PASS or MISS with its measured number. One Ray instance
serves every stage and evaluation. Stages already finished in OUT are reused (pass --fresh to redo).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

from vaemo import progress
from vaemo.config import load_config, project_root
from vaemo.errors import UserError
from vaemo.eval.report import chance_report, chart, table
from vaemo.eval.run import evaluate, write_outputs

ABLATIONS = {"no-enhancer": ["stage2.use_enhancer=false"], "no-supervisor": ["stage2.use_supervisor=false"],
             "no-adapter": ["stage2.use_enhancer=false", "stage2.use_supervisor=false"]}


@dataclass
class Target:
    claim: str
    measured: float
    passed: bool

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'MISS'}  {self.claim}: {self.measured:.3f}"


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
    args = argparse.Namespace(config=config, out=str(out), resume_from=None, overwrite=True, overrides=overrides)
    run_stage(stage, args)
    return out / "export"


def score(model: Path, bench: Path, out: Path, label: str, actors: int) -> dict:
    report, results = evaluate(model, bench, actors=actors, label=label)
    write_outputs(out, report, results, {"chance": chance_report(report)})
    return report


def emotion(report: dict, modality: str) -> float:
    return report["accuracy"].get(modality, {}).get("emotion", float("nan"))


def targets(reports: dict[str, dict]) -> list[Target]:
    s0, s1, s2 = reports["after stage 0"], reports["after stage 1"], reports["after stage 2"]
    acc = lambda r, m, t: r["accuracy"][m][t]  # noqa: E731
    out = [Target("after stage 0, visual content >= 0.9", acc(s0, "visual", "content"), acc(s0, "visual", "content") >= 0.9),
           Target("after stage 0, visual emotion >= 0.9", acc(s0, "visual", "emotion"), acc(s0, "visual", "emotion") >= 0.9)]
    for task in ("content", "emotion"):  # chance: within ~2 standard errors of 0.25 on these item counts
        n = s0["counts"]["audio"][task]
        value = acc(s0, "audio", task)
        out.append(Target(f"before stage 1, audio {task} at chance (0.25 +- {2 * (0.1875 / n) ** 0.5:.2f})", value,
                          abs(value - 0.25) <= 2 * (0.1875 / n) ** 0.5))
    for task in ("content", "emotion"):
        out.append(Target(f"after stage 1 (no audio labels), audio {task} >= 0.8", acc(s1, "audio", task),
                          acc(s1, "audio", task) >= 0.8))
    deaf = s1.get("deaf_check", {}).get("accuracy", float("nan"))
    out.append(Target("after stage 1, deaf check (shuffled soundtracks) <= 0.35", deaf, deaf <= 0.35))
    for modality in ("audio", "visual", "audio_visual"):
        gain = emotion(s2, modality) - emotion(s1, modality)
        out.append(Target(f"stage 2 emotion change on {modality} >= 0", gain, gain >= 0))
    best_single = max(emotion(s2, "audio"), emotion(s2, "visual"))
    margin = emotion(s2, "audio_visual") - best_single
    out.append(Target("after stage 2, audio-visual emotion minus the better single modality >= 0", margin, margin >= 0))
    return out


def run_demo(out: Path, config: str, ablations: bool, fresh: bool, actors: int) -> int:
    start = time.time()
    out = out.resolve()
    cfg = load_config(config)
    data = out / "data"
    if fresh or not (data / "bench" / "items.jsonl").is_file():
        from vaemo.data.synth import write_world

        write_world(data, cfg.synth, cfg.seed)
    data_overrides = [f"data.train_shards={data}/train/*.tar", f"data.val_shards={data}/val/*.tar",
                      f"data.bench_dir={data}/bench"]
    bench = data / "bench"
    reports: dict[str, dict] = {}
    export0 = train(0, out / "stage0", config, data_overrides, fresh)
    reports["after stage 0"] = score(export0, bench, out / "eval-stage0", "after stage 0", actors)
    export1 = train(1, out / "stage1", config, [*data_overrides, f"model.init_from={export0}"], fresh)
    reports["after stage 1"] = score(export1, bench, out / "eval-stage1", "after stage 1", actors)
    export2 = train(2, out / "stage2", config, [*data_overrides, f"model.init_from={export1}"], fresh)
    report2, results2 = evaluate(export2, bench, actors=actors, label="after stage 2")
    reports["after stage 2"] = report2
    write_outputs(out / "eval", report2, results2, {"chance": chance_report(report2), "after stage 0": reports["after stage 0"],
                                                     "after stage 1": reports["after stage 1"]})
    if ablations:
        for name, switches in ABLATIONS.items():
            export = train(2, out / f"stage2-{name}", config, [*data_overrides, f"model.init_from={export1}", *switches],
                           fresh)
            reports[f"stage 2 {name}"] = score(export, bench, out / f"eval-stage2-{name}", name, actors)
    return report(out, reports, time.time() - start)


def report(out: Path, reports: dict[str, dict], seconds: float) -> int:
    rows = {"chance": chance_report(reports["after stage 2"]), **reports}
    progress.console.print(table(rows, title="ArtEmoBench accuracy per stage (4 options; chance 0.25)"))
    chart(rows, out / "report.png", title="VAEmotionLLM on ArtEmo-Synth: what each stage adds")
    checks = targets(reports)
    for check in checks:
        progress.log(check.line())
    lines = ["# vaemo demo report", "", f"Wall time of this run: {seconds / 60:.1f} min.", "",
             "| model | " + " | ".join(f"{m} {t}" for m in ("audio", "visual", "audio_visual")
                                       for t in ("content", "emotion")) + " | deaf check |",
             "|---|" + "---|" * 7]
    for name, r in rows.items():
        cells = [f"{r['accuracy'].get(m, {}).get(t, float('nan')):.3f}" for m in ("audio", "visual", "audio_visual")
                 for t in ("content", "emotion")]
        deaf = r.get("deaf_check", {}).get("accuracy")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'-' if deaf is None else f'{deaf:.3f}'} |")
    lines += ["", "Targets:", "", *[f"- {c.line()}" for c in checks], ""]
    (out / "report.md").write_text("\n".join(lines))
    (out / "report.json").write_text(json.dumps({"reports": reports, "wall_seconds": seconds,
                                                 "targets": [c.__dict__ for c in checks]}, indent=2))
    progress.log(f"demo finished in {seconds / 60:.1f} min: {sum(c.passed for c in checks)}/{len(checks)} targets met; "
                 f"{out / 'report.md'}, {out / 'report.png'}, final evaluation {out / 'eval' / 'results.json'}")
    return 0


def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--config", default=str(project_root() / "configs" / "tiny.yaml"), help="the preset")
    p.add_argument("--ablations", action="store_true", help="also run stage 2 without Enhancer / Supervisor / both")
    p.add_argument("--fresh", action="store_true", help="redo every step instead of reusing finished ones")
    p.add_argument("--actors", type=int, default=2, help="evaluation actors")
