"""Evaluate an export on an ArtEmoBench folder with a pool of Ray actors (or in-process).

Each actor holds one replica loaded from the export (never under ZeRO-3; one GPU each on a cluster,
CPUs here) and scores chunks of items; the driver gathers item results and writes OUT/results.json,
OUT/predictions.jsonl and OUT/accuracy.png, and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from vaemo import progress
from vaemo.args import output_folder
from vaemo.config import EvalConfig, load_config
from vaemo.data.bench import read_bench
from vaemo.errors import UserError
from vaemo.eval.report import BASELINE_ROWS, baseline_reports, chart, summarize, table
from vaemo.eval.scoring import ItemResult, Scorer, plan


class ScorerActor:
    """A Ray actor around Scorer (kept a plain class so the in-process path runs the same code). It holds one
    model at a time, loaded on the first chunk that asks for it: one pool can score several exports, and the
    driver hands out chunks grouped by export so that each actor loads each export at most once."""

    def __init__(self, threads: int, dtype: str = "auto"):
        """`threads`: torch's CPU threads (0: leave them as they are, as a scorer in the driver does)."""
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.dtype = dtype
        self.loaded: tuple[str, Scorer] | None = None

    def score_tagged(self, tagged: tuple[str, str, list]):
        """(run name, export folder, tasks) -> (run name, their results): the driver tells the runs apart."""
        name, model_dir, tasks = tagged
        if self.loaded is None or self.loaded[0] != model_dir:
            self.loaded = None  # the previous replica goes before the next one loads
            self.loaded = (model_dir, Scorer(model_dir, dtype=self.dtype))
        return name, self.loaded[1].score(tasks)


def check_model_dir(model_dir: str | Path, flag: str = "--model") -> Path:
    """The export folder, absolute: actors run in their own working directories."""
    path = Path(model_dir).expanduser().resolve()
    if not (path / "vaemo_config.json").is_file():
        raise UserError(f"{flag} '{model_dir}' is not a vaemo export (no vaemo_config.json)")
    return path


def evaluate(model_dir: str | Path, bench_dir: str | Path, label: str = "", **options) -> tuple[dict, list[ItemResult]]:
    """Score every item of one bench; `options` are those of `evaluate_runs` (actors=0 scores in this
    process). Returns (report, item results)."""
    name = label or str(model_dir)
    return evaluate_runs({name: (model_dir, bench_dir)}, **options)[name]


def evaluate_runs(
    runs: dict[str, tuple[str | Path, str | Path]],
    actors: int = 2,
    batch_items: int = 16,
    deaf_check: bool = True,
    max_items: int = 0,
    seed: int = 0,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float | None = None,
    dtype: str = "auto",
    autoscaling: bool = False,
) -> dict[str, tuple[dict, list[ItemResult]]]:
    """Score several (export, bench) runs {name: (export folder, bench folder)} with one pool of `actors`
    replicas (0: in this process). Starting an actor costs seconds (a process, its imports, then the model);
    one pool for every run pays that once, and each actor loads each export once (about 10 s on a CPU here
    for both). The chunks, and so the results, are exactly those of scoring each run alone. `dtype`: auto
    (bf16 on a GPU that has it, else fp32), fp32 or bf16. Returns {name: (report, item results)}."""
    models = {name: str(check_model_dir(model_dir)) for name, (model_dir, _) in runs.items()}
    exports = list(dict.fromkeys(models.values()))
    tagged = []
    for name in sorted(runs, key=lambda name: exports.index(models[name])):  # each export's chunks together
        items = read_bench(runs[name][1])
        if max_items:
            items = items[:max_items]
        tagged += [(name, models[name], chunk) for chunk in plan(items, deaf_check, batch_items, seed)]
    results: dict[str, list[ItemResult]] = {name: [] for name in runs}
    description = f"scoring {', '.join(runs)}" if len(runs) <= 3 else f"scoring {len(runs)} (export, bench) pairs"
    if actors == 0:
        local = ScorerActor(0, dtype)
        parts = (local.score_tagged(task) for task in tagged)
    else:
        from vaemo.cluster import map_on_actors

        init = (max(1, int(cpus_per_actor)), dtype)
        parts = map_on_actors(ScorerActor, init, "score_tagged", tagged, actors, cpus_per_actor, gpus_per_actor, autoscaling)
    with progress.task(description, len(tagged)) as update:
        for done, (name, part) in enumerate(parts, 1):
            results[name].extend(part)
            update(done)
    out = {}
    for name, scored in results.items():
        scored.sort(key=lambda r: (r.id, r.deaf))
        out[name] = (summarize(scored), scored)
    return out


def write_outputs(out: Path, report: dict, results: list[ItemResult], baselines: dict[str, dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    full = dict(report)
    if baselines:
        full["baselines"] = baselines
    (out / "results.json").write_text(json.dumps(full, indent=2))
    with open(out / "predictions.jsonl", "w") as f:
        for r in results:
            f.write(json.dumps(r.to_dict()) + "\n")
    rows = {**{name: b for name, b in baselines.items()}, "model": report}
    chart(rows, out / "accuracy.png")
    progress.console.print(table(rows))
    if report["skipped"]:
        progress.log(f"{report['skipped']} item(s) skipped: their media could not be used (see predictions.jsonl)")


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a model export folder (RUN_DIR/export)")
    p.add_argument("--bench", help="an ArtEmoBench folder (items.jsonl + media/); default: --config's data.bench_dir")
    p.add_argument("--out", required=True, help="output folder: results.json, predictions.jsonl, accuracy.png")
    p.add_argument("--config", help="a preset whose `eval` section gives the defaults of the options below")
    p.add_argument("--actors", type=int, help="Ray actors, one model replica each (0: in-process); default 2")
    p.add_argument("--batch-items", type=int, help="items per scoring batch; default 16")
    p.add_argument("--max-items", type=int, help="score only the first N items (smoke runs)")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], help="replica precision (auto: bf16 on a GPU that has it)")
    p.add_argument("--no-deaf-check", action="store_true", help="skip the shuffled-soundtrack deaf check")
    p.add_argument(
        "--baseline",
        action="append",
        default=[],
        metavar="NAME=EXPORT",
        help="also score this export and show it beside the model (e.g. before-stage1=RUN0/export)",
    )
    p.add_argument("--cpus-per-actor", type=float, help="CPUs Ray reserves per actor; default 1")
    p.add_argument(
        "--gpus-per-actor",
        type=float,
        help="GPUs Ray reserves per actor; default: 1 when the cluster has a GPU when scoring starts, or when "
        "--config's cluster starts GPU nodes on demand (scaling.use_gpu and scaling.autoscaling), else 0",
    )


def eval_settings(args: argparse.Namespace) -> tuple[EvalConfig, bool]:
    """The preset's `eval` section (or the defaults), with the flags given on the command line on top, and
    whether the preset's cluster adds nodes on demand (scaling.autoscaling); fills in `args.bench` from the
    preset's data.bench_dir when it was not given."""
    cfg = load_config(args.config) if args.config else None
    settings = cfg.eval if cfg else EvalConfig()
    if not args.bench:
        if cfg is None or not cfg.data.bench_dir:
            raise UserError("--bench is required (or --config with a data.bench_dir)")
        args.bench = cfg.data.bench_dir
    for flag in ("actors", "batch_items", "max_items", "dtype", "cpus_per_actor", "gpus_per_actor"):
        if getattr(args, flag) is not None:
            setattr(settings, flag, getattr(args, flag))
    if args.no_deaf_check:
        settings.deaf_check = False
    if settings.actors < 0:
        raise UserError("--actors must be >= 0")
    if settings.batch_items < 1:
        raise UserError("--batch-items must be >= 1")
    if settings.max_items < 0:
        raise UserError("--max-items (eval.max_items) must be >= 0 (0: every item)")
    if settings.cpus_per_actor <= 0:
        raise UserError("--cpus-per-actor (eval.cpus_per_actor) must be > 0")
    if settings.gpus_per_actor is not None and settings.gpus_per_actor < 0:
        raise UserError("--gpus-per-actor (eval.gpus_per_actor) must be >= 0")
    autoscaling = bool(cfg and cfg.scaling.autoscaling)
    if settings.gpus_per_actor is None and autoscaling and cfg.scaling.use_gpu:
        settings.gpus_per_actor = 1.0  # GPU nodes that start on demand are not there yet to be counted
    return settings, autoscaling


def run_eval(args: argparse.Namespace) -> int:
    settings, autoscaling = eval_settings(args)
    named: dict[str, Path] = {}
    for spec in args.baseline:
        if "=" not in spec:
            raise UserError(f"--baseline '{spec}' must look like NAME=EXPORT_DIR")
        name, path = (part.strip() for part in spec.split("=", 1))
        if not name or not path:
            raise UserError(f"--baseline '{spec}' must look like NAME=EXPORT_DIR (a name and a folder)")
        if name in named or name == "model" or name in BASELINE_ROWS:
            raise UserError(f"--baseline '{spec}': the name '{name}' is taken; give each baseline a name of its own")
        named[name] = check_model_dir(path, "--baseline")
    check_model_dir(args.model)
    read_bench(args.bench)  # a malformed benchmark fails here, before any actor starts
    output_folder(args.out)  # and an unwritable --out, not after the scoring
    options = dict(
        actors=settings.actors,
        batch_items=settings.batch_items,
        deaf_check=settings.deaf_check,
        max_items=settings.max_items,
        cpus_per_actor=settings.cpus_per_actor,
        gpus_per_actor=settings.gpus_per_actor,
        dtype=settings.dtype,
        autoscaling=autoscaling,
    )
    # The model and its baselines in one pool: its actors start once.
    runs = {"model": (args.model, args.bench), **{name: (path, args.bench) for name, path in named.items()}}
    scored = evaluate_runs(runs, **options)
    report, results = scored["model"]
    if not report["counts"]:  # a wrong media folder, or media none of whose streams the items ask for
        reasons = ", ".join(f"{reason} {n}" for reason, n in report["skipped_by_reason"].items())
        raise UserError(f"--bench '{args.bench}': none of its {report['skipped']} items could be scored: {reasons}")
    baselines = baseline_reports(report) | {name: scored[name][0] for name in named}
    write_outputs(Path(args.out), report, results, baselines)
    progress.log(f"wrote {Path(args.out) / 'results.json'} and {Path(args.out) / 'accuracy.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from vaemo.args import ArgParser
    from vaemo.errors import exit_on_user_error

    parser = ArgParser(prog="jobs/eval.py", description="Score an export on ArtEmoBench with a Ray actor pool.")
    add_eval_args(parser)
    return exit_on_user_error(run_eval)(parser.parse_args(argv))


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
