#!/usr/bin/env bash
# The GPU check of kdlab's fast path (benchmarks/gpu_check.py): rows run most important first within --budget
# seconds (default 420): CPU-vs-device agreement of every method, an images/s grid (live / cached / student, batch
# 64/256/512, fp32/bf16, eager/compiled), short CIFAR-100 runs, kdlab bench; markdown (--out) and JSON (--json).
# On the lent GPU machine run benchmarks/device/run.sh instead (prepare.sh prints the call). Usage:
#   benchmarks/gpu_check.sh [--data CIFAR100_DIR] [--budget SECONDS] [--plan] [--out gpu_check.md] [--json FILE]
#   benchmarks/gpu_check.sh --device cpu --quick      # a CPU miniature of every row (seconds; the tests run it)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$here/../.venv/bin/python" ]]; then PYTHON="$here/../.venv/bin/python"; else PYTHON=python; fi
fi
exec "$PYTHON" "$here/gpu_check.py" "$@"
