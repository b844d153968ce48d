#!/usr/bin/env bash
# Install Debian's Slurm and munge (as root, where apt is available): what scripts/slurm/start.sh needs.
set -euo pipefail
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
  exit 0
fi
[ "$(id -u)" = 0 ] || { echo "slurm: installing slurm-wlm and munge needs root" >&2; exit 1; }
command -v apt-get >/dev/null || { echo "slurm: no apt-get here; install Slurm and munge yourself" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
