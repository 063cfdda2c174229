#!/usr/bin/env bash
# The GPU check in one command on a machine with one CUDA GPU (scripts/gpu_check.py says what
# it measures). Wheels carried in .whl/ (scripts/gpu_wheels.sh builds them) are installed first
# into /tmp/site, without an index; the check then writes into $OUT (or the first argument).
#   bash scripts/gpu_check.sh [OUT_DIR] [--only peak,tests,...]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu_check_out}}"
shift || true
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export DS_BUILD_OPS=0 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 WANDB_MODE=offline
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}"
exec python3 scripts/gpu_check.py --out "$out" "$@"
