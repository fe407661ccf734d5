#!/usr/bin/env bash
# The test command (also what CI runs): set up, install system services the
# tests start (etcd), then run the whole suite against real vLLM engines.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh

need_apt=()
command -v etcd >/dev/null 2>&1 || need_apt+=(etcd-server)
# Mooncake Store's wheel links libibverbs even when it runs over TCP (xllm_plugin/kvstore).
ldconfig -p 2>/dev/null | grep 'libibverbs\.so\.1' >/dev/null || need_apt+=(libibverbs1)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "==> installing system packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# shellcheck disable=SC1091
. .venv/bin/activate
exec python -m pytest -ra --timeout=900 "$@"
