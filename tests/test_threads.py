"""utils/threads.py: the CPU thread default every CLI applies (issue 23 #15), and what it leaves alone."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from utils import threads as T

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tree(root: pathlib.Path, files: dict) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.mark.parametrize("proc,files,expected", [
    # cgroup v2: the tightest quota along the path wins ("max" is none)
    ("0::/user/job\n", {"fs/user/cpu.max": "200000 100000\n", "fs/user/job/cpu.max": "max 100000\n"}, 2.0),
    ("0::/user/job\n", {"fs/user/cpu.max": "max 100000\n", "fs/user/job/cpu.max": "150000 100000\n"}, 1.5),
    ("0::/\n", {"fs/cpu.max": "max 100000\n"}, None),
    # cgroup v1: cpu.cfs_quota_us / cpu.cfs_period_us of the cpu controller; -1 is none
    ("4:memory:/x\n3:cpu,cpuacct:/docker/abc\n", {"fs/cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "50000\n",
                                                  "fs/cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"}, 0.5),
    ("1:cpu:/\n", {"fs/cpu/cpu.cfs_quota_us": "-1\n", "fs/cpu/cpu.cfs_period_us": "100000\n"}, None),
    ("1:cpu:/gone\n", {}, None),                                 # no cgroup file system at all
])
def test_cgroup_cpu_quota(tmp_path, proc, files, expected):
    _tree(tmp_path, {"proc_cgroup": proc, **files})
    (tmp_path / "fs").mkdir(exist_ok=True)
    assert T.cgroup_cpu_limit(str(tmp_path / "proc_cgroup"), str(tmp_path / "fs")) == expected


@pytest.mark.parametrize("cpus,local,expected", [(8, 1, 8), (8, 3, 2), (2, 4, 1), (1, 1, 1), (64, 8, 8)])
def test_default_divides_the_cpus_among_the_local_processes(cpus, local, expected):
    assert T.default_threads(cpus, local) == expected


SCRIPT = """
import sys, torch
from utils.errors import exit_on_usage_error
if len(sys.argv) > 1:
    torch.set_num_threads(int(sys.argv[1]))      # a Python API user's own choice
@exit_on_usage_error
def cli():
    print(torch.get_num_threads())
cli()
"""


def _threads_in_a_cli(env: dict, *args: str) -> int:
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                             "LOCAL_WORLD_SIZE")}
    r = subprocess.run([sys.executable, "-c", SCRIPT, *args], env={**base, "PYTHONPATH": str(ROOT), **env},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return int(r.stdout.strip())


def test_cli_threads_follow_the_usable_cpus_and_the_users_choice():
    """A CLI started with 2 processes per machine uses half the CPUs; OMP_NUM_THREADS and an earlier
    torch.set_num_threads are kept."""
    cpus = len(os.sched_getaffinity(0))
    assert _threads_in_a_cli({"LOCAL_WORLD_SIZE": "2"}) == max(1, cpus // 2)
    if cpus >= 2:  # where the default (cpus // 2) differs from the user's choice (2)
        assert _threads_in_a_cli({"LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "2"}) == 2
    if 3 not in T._torch_would_pick():
        assert _threads_in_a_cli({"LOCAL_WORLD_SIZE": "2"}, "3") == 3
