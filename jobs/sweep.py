"""Ray Tune sweep of the EmoAdapter (stage 2): each trial is a Ray Train run; ASHA stops weak trials.

On this machine:
    python jobs/sweep.py --config configs/tiny.yaml --space sweeps/emoadapter.yaml --out runs/sweep \\
        model.init_from=runs/demo/stage1/export
Then train stage 2 with the winner:
    python jobs/stage2.py --config runs/sweep/best.yaml --out runs/stage2-best
On a cluster:
    ray job submit --working-dir . -- python jobs/sweep.py --config configs/qwen2.5-vl-7b.yaml \\
        --space sweeps/emoadapter.yaml --out /shared/runs/sweep model.init_from=/shared/runs/stage1/export
Watch it: the Ray dashboard's Jobs/Actors pages, or `tensorboard --logdir runs/sweep`.
Stopped midway (Ctrl-C, `ray job stop`, a lost driver)? The same command with --resume continues it.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vaemo.args import ArgParser  # noqa: E402
from vaemo.errors import exit_on_user_error  # noqa: E402
from vaemo.tune import add_sweep_args, run_sweep  # noqa: E402


@exit_on_user_error
def main(argv=None) -> int:
    parser = ArgParser(prog="jobs/sweep.py", description=__doc__.splitlines()[0])
    add_sweep_args(parser)
    return run_sweep(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
