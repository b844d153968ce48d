"""kdlab.environment: what every run's summary.json and the demo's results.md record about where numbers were made."""

from __future__ import annotations

import json
import os
import platform

import torch

from kdlab import environment
from kdlab.demo import environment_section


def test_record_names_packages_cpu_threads_and_the_torch_build():
    env = environment.record()
    json.dumps(env)  # JSON-ready
    assert env["packages"]["kdlab"] and env["packages"]["torch"] == torch.__version__
    assert env["packages"]["numpy"] == __import__("numpy").__version__ and "mnist1d" in env["packages"]
    t = env["torch"]
    assert t["threads"] == torch.get_num_threads() and t["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert t["interop_threads"] == torch.get_num_interop_threads() and t["git"] == torch.version.git_version
    c = env["cpu"]
    assert c["machine"] == platform.machine() and c["logical_cores"] == os.cpu_count()
    assert set(c["isa"]) <= set(environment.ISA_FLAGS) and c["model"]
    if platform.system() == "Linux" and platform.machine() == "x86_64":  # /proc/cpuinfo read through kdlab.fileio
        flags = open("/proc/cpuinfo").read().split("flags")[1].split("\n")[0].split()
        assert c["isa"] == [f for f in environment.ISA_FLAGS if f in flags]


def test_record_follows_thread_count_and_kernel_variables(monkeypatch):
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
        env = environment.record()
        assert env["torch"]["threads"] == 1 and env["env"]["ATEN_CPU_CAPABILITY"] == "default"
        md = environment.markdown(env)
        assert "1 threads" in md and "set: ATEN_CPU_CAPABILITY=default" in md and env["cpu"]["model"] in md
    finally:
        torch.set_num_threads(n)


def test_demo_results_say_when_runs_come_from_another_environment():
    here = environment.record()
    other = json.loads(json.dumps(here))
    other["packages"]["numpy"] = "0.0.0"
    same = environment_section([{"environment": here}, {"environment": here}])
    assert environment.markdown(here) in same and "reused" not in same
    mixed = environment_section([{"environment": here}, {"environment": other}, {}])
    assert "2 of the 3 runs were reused from a demo in another (or an unrecorded) environment" in mixed
