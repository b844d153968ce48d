#!/usr/bin/env bash
# The GPU check of kdlab's fast path: method agreement with the CPU, images/s grid, a 5-epoch KD run; a markdown
# table at the end (about 8 minutes on one GPU). Usage:
#   benchmarks/gpu_check.sh [--data CIFAR100_DIR] [--teacher RESNET32X4_CKPT] [--out gpu_check.md]
#   benchmarks/gpu_check.sh --device cpu --quick      # a CPU dry run (seconds; used by the tests)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$here/../.venv/bin/python" ]]; then PYTHON="$here/../.venv/bin/python"; else PYTHON=python; fi
fi
exec "$PYTHON" "$here/gpu_check.py" "$@"
