"""The one-node Slurm cluster of scripts/slurm/start.sh as a pytest fixture (started once, reused if running).

Where Slurm cannot start here (not root, slurm-wlm/munge not installed) the tests using it skip with the reason;
under CI (``CI`` set) with Slurm installed, a cluster that does not start is a failure, not a skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

START = Path(__file__).resolve().parents[1] / "scripts" / "slurm" / "start.sh"


def start_cluster() -> tuple[str | None, str]:
    """``(SLURM_CONF, "")`` once the cluster answers, else ``(None, why not)``."""
    if os.geteuid() != 0:
        return None, "starting a Slurm cluster needs root"
    missing = [c for c in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(c) is None]
    if missing:
        return None, f"Slurm is not installed here ({', '.join(missing)} missing; .ci/run installs slurm-wlm and munge)"
    res = subprocess.run(["bash", str(START)], capture_output=True, text=True, timeout=180)
    if res.returncode != 0 or "SLURM_CONF=" not in res.stdout:
        return None, f"the one-node Slurm cluster did not start: {res.stderr.strip()[-400:]}"
    return res.stdout.strip().split("SLURM_CONF=", 1)[1].strip(), ""


@pytest.fixture(scope="session")
def slurm_cluster() -> str:
    """``SLURM_CONF`` of a running one-node cluster (set in ``os.environ`` for the session)."""
    conf, why = start_cluster()
    if conf is None:
        if os.environ.get("CI") and "not installed" not in why and "root" not in why:
            pytest.fail(why)
        pytest.skip(why)
    os.environ["SLURM_CONF"] = conf
    os.environ.setdefault("KDLAB_SLURM_POLL_S", "1")
    return conf
