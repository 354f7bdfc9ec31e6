#!/usr/bin/env bash
# The GPU check (docs/gpu-check.md): set up, then scripts/gpu_check.py writes OUT/gpu-check.json.
#   scripts/gpu-check.sh OUT                  here: the project's .venv (make setup)
#   scripts/gpu-check.sh --carried DIR OUT    on the device machine (no network): installs the
#                                             wheels `make gpu-check-prepare` put in DIR beside
#                                             that machine's own torch, and reads MNIST from DIR
set -euo pipefail
cd "$(dirname "$0")/.."
carried=""
if [ "${1:-}" = "--carried" ]; then carried=$(cd "$2" && pwd); shift 2; fi
out=${1:?usage: scripts/gpu-check.sh [--carried DIR] OUT}
mkdir -p "$out"
start=$(date +%s)
if [ -n "$carried" ]; then
  py=${PYTHON:-python3}
  site=$(mktemp -d)/site
  "$py" -m pip install --quiet --no-index --no-deps --target "$site" "$carried"/wheels/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  export SPACENET_DATA_SEED="$carried/datasets"
else
  make setup
  py=.venv/bin/python
fi
setup=$(( $(date +%s) - start ))
export HOME=${GPU_CHECK_HOME:-$(mktemp -d)}   # importing avalanche writes into $HOME (after make setup's cache)
echo "gpu-check: set-up took ${setup} s"
# shellcheck disable=SC2086  # GPU_CHECK_ARGS: extra options, split on spaces
exec "$py" scripts/gpu_check.py --out "$out" --setup-seconds "$setup" ${GPU_CHECK_ARGS:-}
