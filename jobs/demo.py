"""The whole pipeline on the synthetic world, with progress, a final table and a plot (`make demo`).

python jobs/demo.py --out runs/demo              # data, stage 0, 1, 2, an evaluation after each
python jobs/demo.py --out runs/demo --ablations  # + stage 2 without Enhancer / Supervisor / both
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vaemo.args import ArgParser  # noqa: E402
from vaemo.demo import add_demo_args, run_demo  # noqa: E402
from vaemo.errors import exit_on_user_error  # noqa: E402


@exit_on_user_error
def main(argv=None) -> int:
    parser = ArgParser(prog="jobs/demo.py", description=__doc__.splitlines()[0])
    add_demo_args(parser)
    args = parser.parse_args(argv)
    from vaemo.train.launch import TrainingFailed

    try:
        return run_demo(Path(args.out), args.config, args.ablations, args.fresh, args.actors, args.stage1_teacher)
    except TrainingFailed as err:
        print(f"demo stopped: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
