"""results.json (docs/data-formats.md), the rich table and the PNG chart of an evaluation."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from vaemo.config import MODALITIES
from vaemo.eval.scoring import ItemResult
from vaemo.plotting import drawing


def summarize(results: list[ItemResult]) -> dict:
    """accuracy[modality][task|all], accuracy[all], counts, skipped, va[modality], deaf_check."""
    scored = [r for r in results if not r.skipped and not r.deaf]
    accuracy: dict = {}
    counts: dict = {}
    for modality in MODALITIES:
        rows = [r for r in scored if r.modality == modality]
        if not rows:
            continue
        by_task = defaultdict(list)
        for r in rows:
            by_task[r.task].append(r.correct)
        accuracy[modality] = {task: float(np.mean(v)) for task, v in sorted(by_task.items())}
        accuracy[modality]["all"] = float(np.mean([r.correct for r in rows]))
        counts[modality] = {task: len(v) for task, v in sorted(by_task.items())}
    accuracy["all"] = float(np.mean([r.correct for r in scored])) if scored else 0.0
    skipped = Counter(r.reason for r in results if r.skipped and not r.deaf)
    out = {
        "accuracy": accuracy,
        "counts": counts,
        "skipped": sum(skipped.values()),
        "skipped_by_reason": dict(skipped.most_common()),
    }
    va = {}
    for modality in MODALITIES:
        seen: dict[str, ItemResult] = {}
        for r in scored:  # one prediction per clip and modality (both tasks share the pooled tokens)
            if r.modality == modality and r.valence_pred is not None and r.valence is not None:
                seen.setdefault(r.media, r)
        if seen:
            # results.json is JSON: a number that cannot be measured (no item carries arousal) is left out, not NaN
            arousal = [abs(r.arousal_pred - r.arousal) for r in seen.values() if r.arousal is not None]
            va[modality] = {
                "valence_mae": float(np.mean([abs(r.valence_pred - r.valence) for r in seen.values()])),
                **({"arousal_mae": float(np.mean(arousal))} if arousal else {}),
                "clips": len(seen),
            }
    if va:
        out["va"] = va
    # The deaf check covers the audio items that were scored: a clip with no soundtrack of its own (a
    # painting asked to be heard) is skipped, and hearing another clip's instead would still be scored.
    unheard = {r.id for r in results if r.skipped and not r.deaf}
    deaf = [r for r in results if r.deaf and not r.skipped and r.id not in unheard]
    if deaf:
        # A listening model answers for the clip it heard: donor accuracy near its normal audio accuracy.
        donors = [r.donor_correct for r in deaf if r.donor_answer >= 0]
        out["deaf_check"] = {
            "accuracy": float(np.mean([r.correct for r in deaf])),
            "items": len(deaf),
            **({"donor_accuracy": float(np.mean(donors))} if donors else {}),
        }
    out["always_option"] = always_option(scored)
    guesses: dict = {}  # what guessing scores on each item (1 / its options), by modality and task
    for r in scored:
        guesses.setdefault(r.modality, {}).setdefault(r.task, []).append(1.0 / r.options)
    out["chance"] = {m: float(np.mean(sum(guesses[m].values(), []))) for m in MODALITIES if m in guesses}
    out["chance_by_task"] = {m: {t: float(np.mean(v)) for t, v in sorted(tasks.items())} for m, tasks in guesses.items()}
    return out


def always_option(scored: list[ItemResult]) -> dict:
    """Per modality and task, what answering always the k-th option scores, for each k, and the best k:
    a model must beat a position bias, not only chance."""
    out: dict = {}
    for r in scored:
        out.setdefault(r.modality, {}).setdefault(r.task, []).append(r)
    baseline: dict = {}
    for modality, tasks in out.items():
        for task, rows in tasks.items():
            k_max = max(r.options for r in rows)
            per_option = [float(np.mean([r.answer == k for r in rows])) for k in range(k_max)]
            baseline.setdefault(modality, {})[task] = {"best": max(per_option), "per_option": per_option}
    return baseline


def columns(report: dict) -> list[tuple[str, str]]:
    cols = []
    for modality in MODALITIES:
        for task in report["accuracy"].get(modality, {}):
            if task != "all":
                cols.append((modality, task))
    return cols


def table(rows: dict[str, dict], title: str = "ArtEmoBench accuracy"):
    """A rich table: one row per model/baseline, one column per modality x task, plus the deaf check."""
    from rich.table import Table

    first = next(iter(rows.values()))
    cols = columns(first)
    out = Table(title=title)
    out.add_column("model")
    for modality, task in cols:
        out.add_column(f"{modality.replace('_', '-')}\n{task}", justify="right")
    out.add_column("all", justify="right")
    out.add_column("deaf check\n(vs donor)", justify="right")
    for name, report in rows.items():
        cells = [f"{report['accuracy'].get(m, {}).get(t, float('nan')):.3f}" for m, t in cols]
        out.add_row(name, *cells, f"{report['accuracy'].get('all', float('nan')):.3f}", deaf_cell(report))
    return out


def deaf_cell(report: dict) -> str:
    deaf = report.get("deaf_check")
    if not deaf:
        return "-"
    return f"{deaf['accuracy']:.3f} ({deaf.get('donor_accuracy', float('nan')):.3f})"


def chance_report(report: dict) -> dict:
    """What answering at random scores, in the shape of a report: per cell (a results.json written before
    `chance_by_task` existed has the modality's mean only)."""
    accuracy = {}
    for m, tasks in report["accuracy"].items():
        if m != "all":
            by_task = report.get("chance_by_task", {}).get(m, {})
            accuracy[m] = {t: by_task.get(t, report["chance"][m]) for t in tasks} | {"all": report["chance"][m]}
    accuracy["all"] = float(np.mean(list(report["chance"].values()))) if report["chance"] else 0.0
    return {"accuracy": accuracy, "counts": report["counts"], "skipped": 0}


def position_report(report: dict) -> dict:
    """The best "always answer option k" per cell, in the shape of a report."""
    accuracy = {m: {t: cell["best"] for t, cell in tasks.items()} for m, tasks in report["always_option"].items()}
    cells = [v for tasks in accuracy.values() for v in tasks.values()]
    accuracy["all"] = float(np.mean(cells)) if cells else 0.0  # results.json is JSON: never NaN
    return {"accuracy": accuracy, "counts": report["counts"], "skipped": 0}


BASELINE_ROWS = ("chance", "always one option")


def baseline_reports(report: dict) -> dict[str, dict]:
    """The rows a model must beat, named as every table shows them (BASELINE_ROWS): random answers and one
    fixed option."""
    return dict(zip(BASELINE_ROWS, (chance_report(report), position_report(report))))


def chart(rows: dict[str, dict], png: Path, title: str = "ArtEmoBench") -> None:
    """Grouped bars: accuracy per modality x task for each model, chance line, deaf check."""
    first = next(iter(rows.values()))
    cols = columns(first) + [("deaf", "check")]
    labels = [f"{m.replace('_', '-')}\n{t}" for m, t in cols]
    # A user's bench may name its tasks, and a user their baselines, in any script.
    with drawing([*labels, *rows, title]) as plt:
        x = np.arange(len(cols))
        width = 0.8 / max(1, len(rows))
        fig, ax = plt.subplots(figsize=(max(7, 1.3 * len(cols) + 2), 4))
        for k, (name, report) in enumerate(rows.items()):
            values = [report["accuracy"].get(m, {}).get(t, np.nan) for m, t in cols[:-1]]
            values.append(report.get("deaf_check", {}).get("accuracy", np.nan))
            ax.bar(x + (k - (len(rows) - 1) / 2) * width, values, width, label=name)
        # The baseline rows come first and carry no "chance" of their own: the line is the bench's, read
        # from a scored model's report (0.5 on a bench of two-option questions).
        scored = next((report["chance"] for report in rows.values() if report.get("chance")), None)
        if scored:
            chance = float(np.mean(list(scored.values())))
            ax.axhline(chance, color="black", linestyle="--", linewidth=1, label=f"chance ({chance:.2f})")
        ax.set_xticks(x, labels)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("accuracy")
        ax.set_title(title)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(png, dpi=110)
        plt.close(fig)
