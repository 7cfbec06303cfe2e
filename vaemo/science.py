"""`make science`: the whole pipeline over several seeds, reported as distributions.

Each seed writes its own world (train/val/bench, the val split as a bench, and a bench written with other
settings inside the spec) and trains every stage with that seed; the stage-2 ablations run on the same
seeds. The report gives, per model and cell, the mean over seeds, each seed's value and a 95% interval
(Student's t), the issue's targets judged on those means, and a plot with the seed spread:
OUT/report.md, OUT/report.json, OUT/report.png (spec: `make science` in the CLI contract).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np

from vaemo import progress
from vaemo.args import output_folder
from vaemo.config import MODALITIES
from vaemo.demo import AROUSAL_ERROR, HEARING, SEEING, Target
from vaemo.plotting import pyplot

TASKS = ("content", "emotion")


@dataclass
class Spread:
    """One number measured once per seed."""

    values: list[float]

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if self.values else float("nan")

    @property
    def half_width(self) -> float:
        """Half the 95% confidence interval of the mean (t distribution); nan with one seed."""
        from scipy.stats import t

        n = len(self.values)
        if n < 2:
            return float("nan")
        return float(t.ppf(0.975, n - 1) * np.std(self.values, ddof=1) / math.sqrt(n))

    def cell(self) -> str:
        seeds = ", ".join(f"{v:.3f}" for v in self.values)
        return f"{self.mean:.3f} ± {self.half_width:.3f} ({seeds})"

    def to_dict(self) -> dict:
        return {"mean": self.mean, "ci95": [self.mean - self.half_width, self.mean + self.half_width], "seeds": self.values}


def accuracy(report: dict, modality: str, task: str) -> float:
    return report["accuracy"].get(modality, {}).get(task, float("nan"))


def deaf(report: dict, key: str) -> float:
    return report.get("deaf_check", {}).get(key, float("nan"))


def cells(report: dict) -> dict[str, float]:
    """The numbers of one evaluation that the report aggregates."""
    out = {f"{m} {t}": accuracy(report, m, t) for m in MODALITIES for t in TASKS}
    out["deaf check"] = deaf(report, "accuracy")
    out["deaf check vs donor"] = deaf(report, "donor_accuracy")
    for m, tasks in report.get("always_option", {}).items():
        for t, baseline in tasks.items():
            out[f"always one option, {m} {t}"] = baseline["best"]
    return out


def aggregate(per_seed: dict[int, dict[str, dict]]) -> dict[str, dict[str, Spread]]:
    """{model: {cell: Spread over seeds}} for every model every seed reported."""
    models = [name for name in next(iter(per_seed.values())) if all(name in r for r in per_seed.values())]
    table: dict[str, dict[str, Spread]] = {}
    for model in models:
        per_cell: dict[str, list[float]] = {}
        for reports in per_seed.values():
            for name, value in cells(reports[model]).items():
                per_cell.setdefault(name, []).append(value)
        table[model] = {name: Spread(values) for name, values in per_cell.items()}
    return table


def differences(per_seed: dict[int, dict[str, dict]], after: str, before: str, cell: str) -> Spread:
    """after - before, paired by seed."""
    return Spread([cells(r[after])[cell] - cells(r[before])[cell] for r in per_seed.values()])


def targets(per_seed: dict[int, dict[str, dict]]) -> list[Target]:
    """The science targets, judged on means over seeds (intervals and seed values shown)."""
    table = aggregate(per_seed)
    s0, s1 = table["after stage 0"], table["after stage 1"]
    out = [
        Target(f"after stage 0, visual {t} mean >= {SEEING}", s0[f"visual {t}"].cell(), s0[f"visual {t}"].mean >= SEEING)
        for t in TASKS
    ]
    for t in TASKS:
        spread = s1[f"audio {t}"]
        out.append(
            Target(
                f"after stage 1 (no audio labels), audio {t} mean >= {HEARING} and every seed >= 0.8",
                spread.cell(),
                spread.mean >= HEARING and min(spread.values) >= 0.8,
            )
        )
    out.append(Target("after stage 1, deaf check mean <= 0.35", s1["deaf check"].cell(), s1["deaf check"].mean <= 0.35))
    gap = Spread(
        [
            cells(r["after stage 1"])["deaf check vs donor"] - np.mean([cells(r["after stage 1"])[f"audio {t}"] for t in TASKS])
            for r in per_seed.values()
        ]
    )
    out.append(
        Target(
            "after stage 1, deaf check against the donor's answer minus audio accuracy within 0.05",
            gap.cell(),
            abs(gap.mean) <= 0.05,
        )
    )
    gain = differences(per_seed, "after stage 2", "after stage 1", "audio emotion")
    out.append(Target("stage 2 raises audio emotion (mean change > 0)", gain.cell(), gain.mean > 0))
    cost = differences(per_seed, "after stage 2", "after stage 1", "audio content")
    out.append(Target("stage 2 costs at most 0.02 audio content (mean change >= -0.02)", cost.cell(), cost.mean >= -0.02))
    margin = Spread(
        [
            cells(r["after stage 2"])["audio_visual emotion"]
            - max(cells(r["after stage 2"])["audio emotion"], cells(r["after stage 2"])["visual emotion"])
            for r in per_seed.values()
        ]
    )
    out.append(
        Target(
            "after stage 2, audio-visual emotion >= the better single modality (mean margin >= 0)",
            margin.cell(),
            margin.mean >= 0,
        )
    )
    # A constant guess scores about 0.66 on the synthetic bench; without a trained Supervisor there is no value.
    arousal = Spread(
        [r["after stage 2"].get("va", {}).get("audio", {}).get("arousal_mae", float("nan")) for r in per_seed.values()]
    )
    claim = f"after stage 2, audio arousal error (the Supervisor's) mean <= {AROUSAL_ERROR}"
    out.append(Target(claim, arousal.cell(), arousal.mean <= AROUSAL_ERROR))
    if "after stage 2, shifted bench" in table:
        shift = Spread(
            [
                np.mean(
                    [
                        cells(r["after stage 2, shifted bench"])[f"{m} {t}"] - cells(r["after stage 2"])[f"{m} {t}"]
                        for m in MODALITIES
                        for t in TASKS
                    ]
                )
                for r in per_seed.values()
            ]
        )
        out.append(
            Target(
                "the final model on a bench written with other settings (4-8 s, no domain randomisation) "
                "within 0.05 of the bench split (mean over cells)",
                shift.cell(),
                abs(shift.mean) <= 0.05,
            )
        )
    return out


def chart(table: dict[str, dict[str, Spread]], png: Path, models: list[str]) -> None:
    """Bars: the mean per cell for each model, the 95% interval, and each seed as a dot."""
    plt = pyplot()
    names = [f"{m} {t}" for m in MODALITIES for t in TASKS] + ["deaf check"]
    x = np.arange(len(names))
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(12, 4.5))
    for k, model in enumerate(models):
        spreads = [table[model][name] for name in names]
        offset = x + (k - (len(models) - 1) / 2) * width
        ax.bar(
            offset,
            [s.mean for s in spreads],
            width,
            label=model,
            yerr=[0 if math.isnan(s.half_width) else s.half_width for s in spreads],
            capsize=2,
        )
        for xi, spread in zip(offset, spreads):
            ax.scatter([xi] * len(spread.values), spread.values, s=8, color="black", zorder=3)
    ax.axhline(0.25, color="black", linestyle="--", linewidth=1, label="chance (0.25)")
    ax.set_xticks(x, [n.replace("audio_visual", "audio-visual").replace(" ", "\n", 1) for n in names])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.set_title("ArtEmoBench over seeds: mean, 95% interval, each seed")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def write_report(out: Path, per_seed: dict[int, dict[str, dict]], seconds: float) -> list[Target]:
    table = aggregate(per_seed)
    checks = targets(per_seed) if len(table) and "after stage 2" in table else []
    columns = [f"{m} {t}" for m in MODALITIES for t in TASKS] + ["deaf check", "deaf check vs donor"]
    lines = [
        "# vaemo science report",
        "",
        f"Seeds {sorted(per_seed)} (world and training); wall time {seconds / 60:.1f} min. Each cell: mean ± "
        "half the 95% interval (Student's t over seeds), then each seed's value.",
        "",
        "| model | " + " | ".join(c.replace("audio_visual", "audio-visual") for c in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for model, spreads in table.items():
        lines.append(f"| {model} | " + " | ".join(spreads[c].cell() for c in columns) + " |")
    lines += ["", 'Best "always answer option k" per cell (a position bias the model must beat):', ""]
    first = table.get("after stage 2", next(iter(table.values())))
    lines += [
        f"- {name.removeprefix('always one option, ')}: {spread.cell()}"
        for name, spread in first.items()
        if name.startswith("always one option")
    ]
    lines += ["", "Targets (judged on the means):", "", *[f"- {c.line()}" for c in checks], ""]
    (out / "report.md").write_text("\n".join(lines))
    summary = {model: {name: s.to_dict() for name, s in spreads.items()} for model, spreads in table.items()}
    (out / "report.json").write_text(
        json.dumps(
            {
                "seeds": sorted(per_seed),
                "wall_seconds": seconds,
                "summary": summary,
                "targets": [asdict(c) for c in checks],
                "per_seed": per_seed,
            },
            indent=2,
        )
    )
    shown = [m for m in ("after stage 0", "after stage 1", "after stage 2", "stage 2 no-adapter") if m in table]
    if shown:
        chart(table, out / "report.png", shown)
    return checks


# Stage-2 ablations per seed. "adapter" (the default, for the 60-minute budget) compares stage 2 with and
# without the EmoAdapter (the latter trains the preset's LoRA alone, or, without LoRA, fine-tunes the audio
# projector, on the same data and losses).
ABLATION_SETS: dict[str, tuple[str, ...]] = {
    "none": (),
    "adapter": ("no-adapter",),
    "all": ("no-enhancer", "no-supervisor", "no-adapter"),
}


class WorldWriter:
    """Every seed's world, written by one background process at the lowest CPU priority, part by part in the
    order the seeds need them (`WORLD_PARTS`: seed 0's training part, its benches, seed 1's training part...).
    It takes only the time the training leaves idle on the cores (ranks waiting on each other, Ray starting
    workers, actors loading), and when the driver waits for a part, all of it. A world is the same bytes
    whatever shares the machine. Its lines go to OUT/seedN/data.log."""

    def __init__(self, out: Path, config: str, seeds: list[int], fresh: bool):
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self.out = out
        self.written: set[tuple[int, str]] = set()
        self.failed = False
        self.reports, sender = context.Pipe(duplex=False)
        self.process = context.Process(
            target=_write_worlds_quietly, args=(str(out), config, seeds, fresh, sender), name="worlds of the seeds"
        )
        self.process.start()
        sender.close()  # the child's end: once it exits, recv() ends instead of waiting

    def wait(self, seed: int, part: str) -> bool:
        """True once the part is written; False when the writer stopped first (the seed then writes it). The
        writer reports parts in the order seeds wait for them, so a report waiting in the pipe is this one."""
        wanted = (seed, part)
        if not self.failed and wanted not in self.written and not self.reports.poll():
            progress.log(f"science: waiting for {self.out / f'seed{seed}' / 'data'} ({part}), written in the background")
        while not self.failed and wanted not in self.written:
            try:
                self.written.add(self.reports.recv())
            except EOFError:  # the writer ended without writing this part
                self.process.join()
                self.failed = True
                progress.log(
                    f"science: writing the worlds in the background failed (exit {self.process.exitcode}; "
                    f"{self.out / f'seed{seed}' / 'data.log'}); each seed writes what is missing itself"
                )
        return wanted in self.written

    def stop(self) -> None:
        """Stop the writer and its synthesis pool (one process group)."""
        import signal

        if self.process.is_alive():
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:  # not yet in a session of its own
                self.process.terminate()
        self.process.join()


def lowest_priority() -> None:
    """Make this process (and what it starts) run only on CPU time nothing else wants: a session of its own
    (one process group, which stop() ends), SCHED_IDLE, and that session's scheduling group at nice 19. The
    last matters where the kernel groups sessions for scheduling (autogroup): each session then gets an
    equal share of the CPU, whatever the nice of its processes (a plain nice 19 process in a new session
    took half of the cores from the training beside it)."""
    os.setsid()
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    try:
        Path("/proc/self/autogroup").write_text("19")
    except OSError:
        pass  # a kernel without autogroup: SCHED_IDLE alone decides


def _write_worlds_quietly(out: str, config: str, seeds: list[int], fresh: bool, reports) -> None:
    from vaemo.demo import WORLD_PARTS, write_world_part

    lowest_priority()
    for seed in seeds:
        seed_dir = Path(out) / f"seed{seed}"
        seed_dir.mkdir(parents=True, exist_ok=True)
        for part in WORLD_PARTS:
            flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if part == WORLD_PARTS[0] else os.O_APPEND)
            log = os.open(seed_dir / "data.log", flags, 0o644)
            os.dup2(log, 1)  # plain lines (not a terminal) into the log, none over the driver's progress bars
            os.dup2(log, 2)
            os.close(log)
            write_world_part(part, seed_dir / "data", config, seed, fresh, dev_and_shifted=True)
            reports.send((seed, part))


def _world_part(worlds: WorldWriter, data: Path, config: str, seed: int, fresh: bool, part: str) -> None:
    """A seed's part of its world: from the background writer, or, where that stopped, written here."""
    from vaemo.demo import write_world_part

    if not worlds.wait(seed, part):
        write_world_part(part, data, config, seed, fresh, dev_and_shifted=True)


def run_science(
    out: Path,
    config: str,
    seeds: list[int],
    ablations: tuple[str, ...],
    fresh: bool,
    actors: int,
    stage1_teacher: str = "cache",
) -> int:
    from vaemo.demo import run_pipeline

    start = time.time()
    out = output_folder(out).resolve()
    per_seed: dict[int, dict[str, dict]] = {}
    worlds = WorldWriter(out, config, seeds, fresh)
    try:
        for seed in seeds:
            progress.log(f"science: seed {seed} ({len(per_seed) + 1} of {len(seeds)})")
            per_seed[seed] = run_pipeline(
                out / f"seed{seed}",
                config,
                seed,
                ablations,
                fresh,
                actors,
                dev_and_shifted=True,
                stage1_teacher=stage1_teacher,
                world=partial(_world_part, worlds, out / f"seed{seed}" / "data", config, seed, fresh),
            )
            write_report(out, per_seed, time.time() - start)  # a partial report survives an interrupted run
    finally:
        worlds.stop()
    checks = write_report(out, per_seed, time.time() - start)
    progress.console.print((out / "report.md").read_text())
    progress.log(
        f"science finished in {(time.time() - start) / 60:.1f} min: {sum(c.passed for c in checks)}/"
        f"{len(checks)} targets met; {out / 'report.md'}, {out / 'report.png'}"
    )
    return 0
