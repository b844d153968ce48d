#!/usr/bin/env bash
# Prepare the device bundle, here: the wheels kdlab needs beside the device image (.whl/, for its CPython 3.12 on
# x86-64 Linux), the CIFAR-100 slice for the accuracy run (.cifar100-slice/, first 20,000 training + all 10,000 test
# images), the size check (working tree + both folders under 60 MiB), and the device call to make, printed last.
# Needs the package registry. Options go to `bundle.py prepare` (--help lists them); --local prepares for this machine
# instead (the CPU rehearsal in tests/test_device_bundle.py).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$here/../../.venv/bin/python" ]]; then PYTHON="$here/../../.venv/bin/python"; else PYTHON=python3; fi
fi
exec "$PYTHON" "$here/bundle.py" prepare "$@"
