#!/usr/bin/env bash
# The main job on the embedded default: set up, then run the local cluster with
# SmolLM2 and a demo workload. Extra arguments go to xllm-local (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
exec xllm-local "$@"
