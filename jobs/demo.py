"""The whole pipeline on the synthetic world (what `make demo` runs).

    python jobs/demo.py --out runs/demo
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vaemo import progress  # noqa: E402
from vaemo.cli import ArgParser, run_synth  # noqa: E402
from vaemo.errors import exit_on_user_error  # noqa: E402


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = ArgParser(prog="jobs/demo.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="output folder")
    parser.add_argument("--config", default="configs/tiny.yaml", help="the preset")
    args = parser.parse_args(argv)
    out = Path(args.out)
    data = out / "data"
    if not (data / "bench" / "items.jsonl").is_file():
        run_synth(argparse.Namespace(out=str(data), clips=None, val_clips=None, bench_clips=None, seed=0,
                                     config=args.config, shard_size=None, workers=None))
    progress.log(f"synthetic world ready in {data}. Training stages are not implemented yet: "
                 "the demo stops after the data step.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
