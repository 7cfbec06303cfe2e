"""The whole pipeline over several seeds, reported as means, per-seed values and 95% intervals (`make science`).

    python jobs/science.py --out runs/science                       # seeds 0 1 2, with the stage-2 ablations
    python jobs/science.py --out runs/science --seeds 0 1 2 3 4 --no-ablations
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vaemo.args import ArgParser  # noqa: E402
from vaemo.config import project_root  # noqa: E402
from vaemo.errors import UserError, exit_on_user_error  # noqa: E402


@exit_on_user_error
def main(argv=None) -> int:
    parser = ArgParser(prog="jobs/science.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/science", help="output folder: report.md, report.json, report.png")
    parser.add_argument("--config", default=str(project_root() / "configs" / "tiny.yaml"), help="the preset")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="world and training seeds (>= 2)")
    parser.add_argument("--no-ablations", action="store_true", help="skip stage 2 without Enhancer / Supervisor / both")
    parser.add_argument("--fresh", action="store_true", help="redo every step instead of reusing finished ones")
    parser.add_argument("--actors", type=int, default=2, help="evaluation actors")
    args = parser.parse_args(argv)
    if len(set(args.seeds)) < 2:
        raise UserError("--seeds needs at least 2 different seeds for an interval")
    from vaemo.science import run_science
    from vaemo.train.launch import TrainingFailed

    try:
        return run_science(Path(args.out), args.config, sorted(set(args.seeds)), not args.no_ablations, args.fresh,
                           args.actors)
    except TrainingFailed as err:
        print(f"science stopped: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
