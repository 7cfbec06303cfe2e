#!/usr/bin/env bash
# Idempotent set-up for `make demo` / `make test`: FFmpeg, the venv at .venv/, pinned wheels, vaemo itself.
# A second run with nothing changed returns in well under a second (a stamp file records what was installed).
#   VAEMO_DEVICE=cpu|gpu   force the CPU or CUDA stack (default: gpu when `nvidia-smi -L` finds a GPU)
#   VAEMO_FLASH_ATTN=1     also build flash-attn on a GPU machine (slow; optional: SDPA is used without it)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv

say() { printf '[setup] %s\n' "$*"; }

# 1. FFmpeg's shared libraries (torchcodec loads them) and the CLI (the synthetic world is encoded with it).
if ! command -v ffmpeg >/dev/null 2>&1 || ! (ldconfig -p 2>/dev/null | grep -q 'libavcodec\.so'); then
  say "installing ffmpeg (apt)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq ffmpeg >/dev/null
fi

# Read speech for the real-media tests (tests/test_real_format.py): Debian's pocketsphinx test recordings.
if [ ! -d /usr/share/pocketsphinx/test/data/librivox ] && command -v apt-get >/dev/null 2>&1; then
  say "installing pocketsphinx-testdata (apt; speech recordings for the tests)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  ($SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq pocketsphinx-testdata >/dev/null) \
    || say "pocketsphinx-testdata could not be installed; tests/test_real_format.py will fail"
fi

# 2. Which stack.
device=${VAEMO_DEVICE:-}
if [ -z "$device" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then device=gpu; else device=cpu; fi
fi
constraints=constraints-$device.txt
stamp_id=$(cat requirements.txt "$constraints" pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
stamp=$VENV/.vaemo-setup-$device-$stamp_id${VAEMO_FLASH_ATTN:+-fa}
if [ -f "$stamp" ]; then exit 0; fi

# 3. The venv and the pinned wheels.
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
extra=()
if [ "$device" = cpu ]; then
  # The CPU wheel of torch is on the PyTorch index; some machines carry it locally (pip's find-links).
  tmp=$(mktemp -d)
  if ! "${PIP[@]}" download -q --no-deps --no-index -d "$tmp" "$(grep '^torch==' "$constraints")" >/dev/null 2>&1; then
    extra=(--extra-index-url https://download.pytorch.org/whl/cpu)
  fi
  rm -rf "$tmp"
fi
say "installing pinned packages for $device (a minute or two the first time)"
# pip byte-compiles on one core; compileall below does the same files on all of them.
"${PIP[@]}" install -q --no-compile -c "$constraints" -r requirements.txt "${extra[@]}" 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -m compileall -q -j 0 "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" >/dev/null 2>&1 || true
"${PIP[@]}" install -q -c "$constraints" --no-deps -e . 2>&1 | grep -v "^WARNING: Location" || true
if [ "$device" = gpu ] && [ -n "${VAEMO_FLASH_ATTN:-}" ]; then
  say "building flash-attn (optional)"
  "${PIP[@]}" install -q --no-build-isolation "flash-attn>=2.6" || say "flash-attn failed to build; SDPA will be used"
fi
# torchvision's PyPI wheel breaks transformers' Qwen imports against CPU torch; nothing here needs it.
if "$VENV/bin/python" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('torchvision') is None)"; then
  say "removing torchvision (pulled in by something else; it breaks transformers' Qwen imports)"
  "${PIP[@]}" uninstall -y -q torchvision
fi
"$VENV/bin/python" -c "import torch, torchcodec, deepspeed, ray, transformers, webdataset, rich" \
  || { say "the installed stack does not import; see the messages above"; exit 1; }
rm -f "$VENV"/.vaemo-setup-*
touch "$stamp"
say "ready: $("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)')"
