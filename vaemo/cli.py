"""The `vaemo` console script: the same operations as jobs/*.py, calling the same functions.

vaemo data synth --out runs/data --clips 2400
vaemo data synth --out runs/other --clips 192 synth.fps=[24,24] synth.formats=[mkv] synth.min_duration=5
vaemo data pack my_clips/ --out shards/ --manifest labels.jsonl
vaemo data inspect 'shards/*.tar' --json
vaemo config show --config configs/tiny.yaml --stage 1 train.max_steps=10
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from vaemo.args import ArgParser, non_negative_int, output_folder, positive_int
from vaemo.errors import EXIT_USER_ERROR, exit_on_user_error

# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------


def add_synth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder: OUT/train/*.tar, OUT/val/*.tar, OUT/bench/")
    p.add_argument("--clips", type=positive_int, default=None, help="training clips (default: the config's)")
    p.add_argument(
        "--val-clips",
        type=positive_int,
        default=None,
        help="validation clips (default: the config's; with --clips, clips/12 rounded up to a multiple of 16)",
    )
    p.add_argument(
        "--bench-clips",
        type=positive_int,
        default=None,
        help="benchmark clips (default: the config's; with --clips, clips/12 rounded up to a multiple of 16)",
    )
    p.add_argument("--seed", type=int, default=0, help="world seed; the same seed writes the same data")
    p.add_argument("--config", default=None, help="a preset whose `synth` section gives sizes (optional)")
    p.add_argument("--shard-size", type=positive_int, default=None, help="clips per shard")
    p.add_argument("--workers", type=non_negative_int, default=None, help="processes (default, or 0: one per core)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="synth.FIELD=VALUE",
        help="other settings inside the spec, e.g. synth.fps=[24,24] synth.formats=[mkv]",
    )


def run_synth(args: argparse.Namespace) -> dict:
    from vaemo.config import load_config
    from vaemo.data.synth import write_world

    synth = load_config(args.config, args.overrides).synth
    return write_world(
        output_folder(args.out),
        synth,
        args.seed,
        train=args.clips,
        val=args.val_clips,
        bench=args.bench_clips,
        shard_size=args.shard_size,
        workers=args.workers,
    )


def run_pack(args: argparse.Namespace) -> None:
    from vaemo import progress
    from vaemo.data.decode import CLIP_EXTENSIONS
    from vaemo.data.shards import pack

    r = pack(args.src, output_folder(args.out), args.manifest, args.shard_size, args.val_fraction, args.workers)
    for split in ("train", "val"):
        progress.log(
            f"{split}: {r.split_clips.get(split, 0)} clips in {r.shards.get(split, 0)} shard(s) ({args.out}/{split}-*.tar)"
        )
    progress.log(f"packed {r.clips} clips ({r.labelled} labelled)")
    if r.ignored_files:
        kinds = ", ".join(f"{kind} {n}" for kind, n in r.ignored_types.most_common())
        progress.log(
            f"ignored {r.ignored_files} file(s) that are not clips ({kinds}): pack takes {', '.join(CLIP_EXTENSIONS)}; "
            "put another container's streams into one as they are, e.g. `ffmpeg -i clip.avi -c copy clip.mkv`"
        )
    val_shards = r.shards.get("val", 0)
    if val_shards == 0:
        progress.log(
            "no validation shard: a run validates on one per training worker; give clips `split: val` or a "
            "--val-fraction above 0, or train with train.val_batches=0"
        )
    elif val_shards < args.workers:
        progress.log(
            f"only {val_shards} validation shard(s): a run needs one per training worker; use "
            f"scaling.num_workers<={val_shards}, or train.val_batches=0, or more clips in val"
        )
    for what, names in (
        ("without an audio stream (stage 1 skips them; stage 2 asks them about their frames only)", r.without_audio),
        ("without a video stream (every stage skips them)", r.without_video),
        ("that FFmpeg cannot open (packed as they are; every stage skips them and counts them)", r.unreadable),
        ("left out: their split is test or bench (pack writes train and val)", r.held_out),
        ("left out: links to nothing", r.broken_links),
    ):
        if names:
            progress.log(f"{len(names)} clip(s) {what}, e.g. {names[0]}")
    if r.unmatched_manifest:
        progress.log(f"{len(r.unmatched_manifest)} manifest entries name no clip, e.g. {r.unmatched_manifest[0]}")


def run_inspect(args: argparse.Namespace) -> int:
    from rich.table import Table

    from vaemo.data.decode import SKIP_REASONS
    from vaemo.data.shards import inspect_shards
    from vaemo.progress import console

    stage_spec = None
    if args.stage is not None:
        from vaemo.config import load_config
        from vaemo.train.objectives import objective_for

        # what the stage's training stream asks of a sample (the online teacher: shards, not a cache)
        cfg = load_config(args.config, ["stage1.teacher.mode=online"], stage=args.stage)
        stage_spec = objective_for(cfg).decode_spec()
    report = inspect_shards(args.shards, workers=args.workers or 0, stage_spec=stage_spec)
    if not args.json:
        table = Table(title=f"{report['shards']} shard(s)")
        table.add_column("what")
        table.add_column("count", justify="right")
        table.add_row("samples", str(report["samples"]))
        table.add_row("decodable", str(report["ok"]))
        for name, n in sorted(report["modalities"].items()):
            table.add_row(f"  {name}", str(n))
        for reason, n in sorted(report["skipped"].items()):
            table.add_row(f"skipped: {reason}", str(n), end_section=False)
        console.print(table)
        if "stage" in report:
            stage = Table(title=f"stage {args.stage} ({args.config or 'default config'})")
            stage.add_column("what")
            stage.add_column("count", justify="right")
            stage.add_row("usable", str(report["stage"]["usable"]))
            for reason, n in sorted(report["stage"]["skipped"].items()):
                stage.add_row(f"skipped: {reason}", str(n))
            console.print(stage)
        for reason in sorted(set(report["skipped"]) | set(report.get("stage", {}).get("skipped", {}))):
            console.print(f"  {reason}: {SKIP_REASONS[reason]}")
            for example in report["examples"].get(reason, []):
                console.print(f"    e.g. {example}")
    if args.json:
        summary = {
            "samples": report["samples"],
            "ok": report["ok"],
            "skipped": report["skipped"],
            "modalities": report["modalities"],
            "shards": report["shards"],
        }
        if "stage" in report:
            summary["stage"] = {"stage": args.stage, **report["stage"]}
        print(json.dumps(summary))
    if report["samples"] == 0:
        print(f"error: nothing could be read from {', '.join(args.shards)}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


def run_config_show(args: argparse.Namespace) -> None:
    from vaemo.config import load_config, render_config

    print(render_config(load_config(args.config, args.overrides, stage=args.stage)), end="")


# ----------------------------------------------------------------------------------------------
# The parser; later sections (train, eval, sweep, ...) register themselves through COMMANDS.
# ----------------------------------------------------------------------------------------------


def build_parser(command: str | None = None) -> ArgParser:
    """The whole command line; with `command` (the first word the user typed) `data` or `config`, only those:
    the other commands' modules import torch and transformers, seconds that `vaemo config show` should not wait."""
    parser = ArgParser(prog="vaemo", description="Train and evaluate VAEmotionLLM (learning to hear by seeing).")
    groups = parser.add_subparsers(dest="group", required=True, parser_class=ArgParser)

    data = groups.add_parser("data", help="make, pack and inspect clip shards")
    data_cmds = data.add_subparsers(dest="command", required=True, parser_class=ArgParser)
    p = data_cmds.add_parser("synth", help="write the ArtEmo-Synth world (train/val shards + a benchmark)")
    add_synth_args(p)
    p.set_defaults(func=run_synth)
    p = data_cmds.add_parser("pack", help="pack a folder of clips (+ labels) into webdataset shards")
    p.add_argument("src", help="folder of clips (mp4/mkv/webm/mov), searched recursively")
    p.add_argument("--out", required=True, help="output folder for train-NNNNNN.tar and val-NNNNNN.tar")
    p.add_argument("--manifest", default=None, help='labels.jsonl: {"clip": relative path, ...fields}')
    p.add_argument("--shard-size", type=positive_int, default=100, help="clips per shard (at most)")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.05,
        help="share of the clips without a `split` field that go to val-*.tar (default 0.05)",
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        default=2,
        help="training workers the shards must serve: each split gets at least this many shards",
    )
    p.set_defaults(func=run_pack)
    p = data_cmds.add_parser("inspect", help="count samples, decodable ones, modalities, and skips by reason")
    p.add_argument("shards", nargs="+", help="shard paths, globs or brace patterns")
    p.add_argument("--json", action="store_true", help="end with one JSON line of counts")
    p.add_argument("--workers", type=non_negative_int, default=0, help="processes (default, or 0: one per core)")
    p.add_argument(
        "--stage",
        type=int,
        choices=[0, 1, 2],
        default=None,
        help="also count the samples this stage can use, and why it would skip the others",
    )
    p.add_argument("--config", default=None, help="with --stage: the preset the stage runs (default: built-ins)")
    p.set_defaults(func=run_inspect)

    cfg = groups.add_parser("config", help="show a resolved config with every field documented")
    cfg_cmds = cfg.add_subparsers(dest="command", required=True, parser_class=ArgParser)
    p = cfg_cmds.add_parser("show", help="print the resolved config")
    p.add_argument("--config", default=None, help="a preset YAML (default: built-in defaults)")
    p.add_argument("--stage", type=int, choices=[0, 1, 2], default=None, help="merge this stage's block")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.set_defaults(func=run_config_show)

    if command not in ("data", "config"):
        for register in COMMANDS:
            register(groups)
    return parser


def _register_train(groups) -> None:
    from vaemo.train.cli import register

    register(groups)


def _register_eval(groups) -> None:
    from vaemo.eval.run import add_eval_args, run_eval

    p = groups.add_parser("eval", help="score an export on ArtEmoBench (same as jobs/eval.py)")
    add_eval_args(p)
    p.set_defaults(func=run_eval)


def _register_sweep(groups) -> None:
    from vaemo.tune import add_sweep_args, run_sweep

    p = groups.add_parser("sweep", help="Ray Tune sweep of the EmoAdapter (same as jobs/sweep.py)")
    add_sweep_args(p)
    p.set_defaults(func=run_sweep)


def _register_teacher_cache(groups) -> None:
    from vaemo.teacher_cache import add_cache_args, run_cache

    p = groups.add_parser("teacher-cache", help="run stage 1's frozen teacher once and store its top-k (jobs/teacher_cache.py)")
    add_cache_args(p)
    p.set_defaults(func=run_cache)


def _register_ask(groups) -> None:
    from vaemo.eval.ask import add_ask_args, run_ask

    p = groups.add_parser("ask", help="ask a trained model about a clip (or a folder of clips)")
    add_ask_args(p)
    p.set_defaults(func=run_ask)


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _register_train,
    _register_eval,
    _register_sweep,
    _register_teacher_cache,
    _register_ask,
]


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    args = build_parser(next((w for w in words if not w.startswith("-")), None)).parse_args(argv)
    result = args.func(args)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
