"""Score a model export on ArtEmoBench (accuracy per modality x task, valence/arousal error, deaf check).

On this machine (2 actors, a local Ray is started):
    python jobs/eval.py --model runs/demo/stage2/export --bench runs/demo/data/bench --out runs/demo/eval
With baselines beside it:
    python jobs/eval.py ... --baseline before-stage1=runs/demo/stage0/export
On a cluster (one GPU per actor):
    ray job submit --working-dir . -- python jobs/eval.py --model /shared/runs/stage2/export \\
        --bench /shared/vaemo/artemobench --out /shared/runs/eval --actors 8
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vaemo.eval.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
