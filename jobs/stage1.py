"""Stage 1 (VG-Align): the frozen visual pathway teaches a new audio pathway; no audio labels are used.

On this machine (tiny preset, a local Ray is started):
    python jobs/stage1.py --config configs/tiny.yaml --out runs/demo/stage1 model.init_from=runs/demo/stage0/export
On a cluster (same file, same flags; a pretrained VLM needs no stage 0, the preset names its checkpoints):
    ray job submit --working-dir . -- python jobs/stage1.py --config configs/qwen2.5-vl-7b.yaml \
        --out /shared/runs/stage1
Continue a stopped run exactly where its last checkpoint left it:
    python jobs/stage1.py --config configs/tiny.yaml --out runs/demo/stage1 --resume-from runs/demo/stage1
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vaemo.train.cli import stage_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(stage_main(1))
