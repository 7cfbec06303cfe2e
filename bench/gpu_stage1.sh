#!/usr/bin/env bash
# Stage-1 and stage-2 steps of a Qwen2.5-VL-7B-shaped model on one GPU (bench/gpu_stage1.py): tokens/s, MFU,
# peak memory against bench/memory.py's estimate.
#
# What to carry to the GPU machine: the repository's `vaemo/`, `bench/` and `configs/` folders (no weights).
# What it needs there: python with torch (CUDA) and transformers >= 5; flash-attn is optional (when it imports,
# FlashAttention-2 is measured beside SDPA). Neither Ray, DeepSpeed, torchcodec nor internet access is needed.
#     bash bench/gpu_stage1.sh            # about 1 min on one H200 (README, "GPU benchmark"); it stops itself at 7.5 min
# The last line printed is the summary (GPU_STAGE1 ...).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=$(command -v python3 || command -v python); fi
"$PY" - <<'PYEOF'
import importlib, sys
missing = [m for m in ("torch", "transformers", "yaml", "numpy") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_stage1: this python lacks {', '.join(missing)}")
import torch, transformers
print(f"gpu_stage1: torch {torch.__version__}, transformers {transformers.__version__}, "
      f"cuda {torch.cuda.is_available()} ({torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'})")
PYEOF
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
exec timeout 450 "$PY" bench/gpu_stage1.py "$@"
