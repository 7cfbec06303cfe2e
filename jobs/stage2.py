"""Stage 2 (EmoAdapter): Emotion Enhancer + Emotion Supervisor on top of the stage-1 model.

On this machine (tiny preset, a local Ray is started):
    python jobs/stage2.py --config configs/tiny.yaml --out runs/demo/stage2 model.init_from=runs/demo/stage1/export
On a cluster (same file, same flags):
    ray job submit --working-dir . -- python jobs/stage2.py --config configs/qwen2.5-vl-7b.yaml \
        --out /shared/runs/stage2 model.init_from=/shared/runs/stage1/export
Continue a stopped run exactly where its last checkpoint left it:
    python jobs/stage2.py --config configs/tiny.yaml --out runs/demo/stage2 --resume-from runs/demo/stage2
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vaemo.train.cli import stage_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(stage_main(2))
