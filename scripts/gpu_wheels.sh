#!/usr/bin/env bash
# The wheels the GPU check carries to the device machine, into .whl/ (scripts/gpu_wheels.py says
# which and why). Run where moespec is installed (make install): versions are taken from there.
#   bash scripts/gpu_wheels.sh [--dry-run] [--skip wandb]
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PY:-.venv/bin/python}" scripts/gpu_wheels.py "$@"
