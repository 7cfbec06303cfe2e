"""Entry points shared by jobs/stageN.py and `vaemo train stageN`, plus `vaemo export`."""

from __future__ import annotations

import argparse
import sys

from vaemo import progress
from vaemo.errors import exit_on_user_error


def stage_parser(stage: int, prog: str | None = None) -> argparse.ArgumentParser:
    from vaemo.args import ArgParser
    from vaemo.train.launch import STAGE_NAMES, add_stage_args

    parser = ArgParser(prog=prog or f"jobs/stage{stage}.py", description=f"Train stage {stage} ({STAGE_NAMES[stage]}).")
    add_stage_args(parser)
    return parser


def run_parsed(stage: int, args: argparse.Namespace) -> int:
    from vaemo.train.launch import TrainingFailed, run_stage

    try:
        run_stage(stage, args.config, args.out, args.overrides, args.resume_from, args.overwrite, check_only=args.check)
    except TrainingFailed as err:
        progress.log(str(err), style="red")
        return 1
    return 0


@exit_on_user_error
def stage_main(stage: int, argv: list[str] | None = None) -> int:
    return run_parsed(stage, stage_parser(stage).parse_args(argv))


def run_export(args: argparse.Namespace) -> int:
    from vaemo.train.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out)
    progress.log(f"exported {out}")
    return 0


def register(groups) -> None:
    from vaemo.args import ArgParser
    from vaemo.train.launch import STAGE_NAMES, add_stage_args

    train = groups.add_parser("train", help="train a stage (same as jobs/stageN.py)")
    stages = train.add_subparsers(dest="command", required=True, parser_class=ArgParser)
    for stage, name in STAGE_NAMES.items():
        p = stages.add_parser(f"stage{stage}", help=f"stage {stage} ({name})")
        add_stage_args(p)
        p.set_defaults(func=lambda args, stage=stage: run_parsed(stage, args))
    p = groups.add_parser("export", help="export a training checkpoint as a model folder (from_pretrained)")
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoint folder (RUN/checkpoints/step-00000200) or a run folder (its newest complete one)",
    )
    p.add_argument("--out", required=True, help="output model folder")
    p.set_defaults(func=run_export)


if __name__ == "__main__":
    sys.exit(stage_main(int(sys.argv[1]), sys.argv[2:]))
