#!/usr/bin/env bash
# Stop the one-node cluster of scripts/slurm/start.sh (its jobs end with it); --clean also removes its folder.
# munged keeps running (other programs of the machine may use it).
set -euo pipefail
DIR="${KDLAB_SLURM_DIR:-/tmp/kdlab-slurm}"
for d in slurmd slurmctld; do
  if [ -f "$DIR/$d.pid" ]; then
    pid="$(cat "$DIR/$d.pid")"
    if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$d" ]; then  # not a pid reused by another program
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$DIR/$d.pid"
  fi
done
if [ "${1:-}" = "--clean" ]; then rm -rf "$DIR"; fi
echo "slurm: stopped the cluster in $DIR" >&2
