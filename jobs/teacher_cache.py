"""Run stage 1's frozen visual teacher once over the shards and store its top-k log-probs (a teacher cache).

On this machine (2 actors, a local Ray is started):
    python jobs/teacher_cache.py --config configs/tiny.yaml --out runs/demo/teacher-cache \\
        model.init_from=runs/demo/stage0/export stage1.topk=16
    python jobs/stage1.py --config configs/tiny.yaml --out runs/demo/stage1-cached model.init_from=runs/demo/stage0/export \\
        stage1.topk=16 stage1.teacher.mode=cache stage1.teacher.cache_dir=runs/demo/teacher-cache
On a cluster (one GPU per actor):
    ray job submit --working-dir . -- python jobs/teacher_cache.py --config configs/qwen2.5-vl-7b.yaml \\
        --out /shared/vaemo/teacher-cache --actors 8
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vaemo.teacher_cache import main  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if __name__ == "__main__":
    sys.exit(main())
