"""Stage 0 (see): teach the tiny VLM to see on captioned clips (only where no pretrained VLM can be had).

On this machine (tiny preset, a local Ray is started):
    python jobs/stage0.py --config configs/tiny.yaml --out runs/demo/stage0
On a cluster (same file, same flags; with a pretrained VLM, skip stage 0 and start at stage 1):
    ray job submit --working-dir . -- python jobs/stage0.py --config configs/tiny.yaml --out /shared/runs/stage0
Continue a stopped run exactly where its last checkpoint left it:
    python jobs/stage0.py --config configs/tiny.yaml --out runs/demo/stage0 --resume-from runs/demo/stage0
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vaemo.train.cli import stage_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(stage_main(0))
