#!/usr/bin/env bash
# The device side of the bundle (prepare.sh prints the call): installs the carried wheels into a temporary folder
# (pip --target, no network, no -e), puts it and src/ on PYTHONPATH, checks every requirement, decodes the CIFAR-100
# slice, runs benchmarks/gpu_check.py under the time budget and leaves in $OUT: gpu_check.md (the tables),
# gpu_check.json (every figure), gpu_check.log, env.txt (nvidia-smi, pip versions).
#
#   bash benchmarks/device/run.sh [--budget SECONDS] [--device cpu] [--quick] [--wheels DIR] [--slice DIR]
#                                 [-- more gpu_check.py options]
# --budget is the whole run's, start-up included (default 450 s); gpu_check drops its least important rows to fit.
# Without $OUT (outside the device tool) the files go to ./gpu_check_out. PYTHON picks the interpreter (python3).
set -euo pipefail
t_start=$(date +%s.%N)
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-python3}"
budget=450 device=cuda quick=() wheels="$root/.whl" slice="$root/.cifar100-slice" extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --budget) budget="$2"; shift 2 ;;
    --device) device="$2"; shift 2 ;;
    --quick) quick=(--quick); shift ;;
    --wheels) wheels="$2"; shift 2 ;;
    --slice) slice="$2"; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "run.sh: error: unknown option $1" >&2; exit 2 ;;
  esac
done
out="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export PYTHONUNBUFFERED=1

shopt -s nullglob
whl=("$wheels"/*.whl)
if [[ ${#whl[@]} -eq 0 ]]; then
  echo "run.sh: error: no wheels in $wheels (run benchmarks/device/prepare.sh here and carry .whl)" >&2; exit 2
fi
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
  --target "$work/site" "${whl[@]}"
export PYTHONPATH="$work/site:$root/src${PYTHONPATH:+:$PYTHONPATH}"
{
  echo "# $(date -u +%FT%TZ) $(uname -srm)"
  command -v nvidia-smi >/dev/null && timeout 20 nvidia-smi || echo "(no nvidia-smi)"
  "$PYTHON" "$root/benchmarks/device/bundle.py" check --root "$root" --site "$work/site"
} > "$out/env.txt" 2>&1 || { cat "$out/env.txt" >&2; exit 2; }
tail -n 1 "$out/env.txt"

data=()
if [[ -f "$slice/manifest.json" ]]; then
  "$PYTHON" "$root/benchmarks/device/cifar_slice.py" decode "$slice" "$work/cifar100"
  data=(--data "$work/cifar100")
else
  echo "run.sh: no CIFAR-100 slice in $slice: the accuracy rows use synthetic data" >&2
fi

left=$("$PYTHON" -c "import sys; print(max(1, int(float(sys.argv[1]) - (float(sys.argv[3]) - float(sys.argv[2])))))" \
  "$budget" "$t_start" "$(date +%s.%N)")
echo "run.sh: start-up $(( ${budget%.*} - left )) s; gpu_check budget $left s"
set -o pipefail
"$PYTHON" "$root/benchmarks/gpu_check.py" --device "$device" "${quick[@]}" --budget "$left" "${data[@]}" \
  --out "$out/gpu_check.md" --json "$out/gpu_check.json" "${extra[@]}" 2>&1 | tee "$out/gpu_check.log"
