"""The whole pipeline over several seeds, reported as means, per-seed values and 95% intervals (`make science`).

python jobs/science.py --out runs/science                 # seeds 0 1 2, stage 2 with and without the EmoAdapter
python jobs/science.py --out runs/science --seeds 0 1 2 3 4 --ablations all
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vaemo.args import ArgParser  # noqa: E402
from vaemo.config import project_root  # noqa: E402
from vaemo.demo import add_pipeline_args  # noqa: E402
from vaemo.errors import UserError, exit_on_user_error  # noqa: E402


@exit_on_user_error
def main(argv=None) -> int:
    parser = ArgParser(prog="jobs/science.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/science", help="output folder: report.md, report.json, report.png")
    parser.add_argument("--config", default=str(project_root() / "configs" / "tiny.yaml"), help="the preset")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="world and training seeds (>= 2)")
    parser.add_argument(
        "--ablations",
        choices=["none", "adapter", "all"],
        default="adapter",
        help="stage-2 ablations per seed: without the EmoAdapter (adapter, the default), also "
        "without the Enhancer and without the Supervisor (all), or none",
    )
    parser.add_argument("--fresh", action="store_true", help="redo every step instead of reusing finished ones")
    add_pipeline_args(parser)
    args = parser.parse_args(argv)
    if len(set(args.seeds)) < 2:
        raise UserError("--seeds needs at least 2 different seeds for an interval")
    from vaemo.science import ABLATION_SETS, run_science
    from vaemo.train.launch import TrainingFailed

    try:
        return run_science(
            Path(args.out),
            args.config,
            sorted(set(args.seeds)),
            ABLATION_SETS[args.ablations],
            args.fresh,
            args.actors,
            args.stage1_teacher,
        )
    except TrainingFailed as err:
        print(f"science stopped: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
