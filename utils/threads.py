"""How many CPU threads torch uses in this project's commands, decided once at the start of each CLI.

The default is the CPUs this process may use, divided by the processes torchrun starts on this
machine (``LOCAL_WORLD_SIZE``), at least 1:

* the CPUs it may run on: its affinity mask (``os.sched_getaffinity``: ``taskset``, cpusets,
  SLURM's ``--cpus-per-task``), which torch's own default already follows;
* capped by a CPU *quota* of its cgroup (``docker --cpus``, Kubernetes CPU limits:
  ``cpu.max``, or ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``), which torch does not see: a
  container limited to 2 CPUs on a 64-core host would otherwise run 64 threads, and OpenMP
  threads that wait for a CPU spin, so oversubscribed runs are many times slower.

:func:`apply_default_threads` applies it; every CLI calls it first (through
:func:`utils.errors.exit_on_usage_error`).  It only ever lowers torch's count, and only where the
user has not chosen one:

* ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` set -> left alone (torchrun sets
  ``OMP_NUM_THREADS=1`` itself when it starts more than one process per machine);
* ``torch.set_num_threads(k)`` called before the CLI (Python API users) -> left alone, unless ``k``
  equals a count torch picks by itself (the usable CPUs, the machine's CPUs or physical cores),
  which cannot be told apart from not calling it.

No default can see other jobs on the same CPUs: on a shared, busy machine set ``OMP_NUM_THREADS``
to the CPUs that are free (README: ``OMP_NUM_THREADS=1`` was 10x faster on a busy 2-core machine).
"""

from __future__ import annotations

import glob
import math
import os
import sys
from typing import Optional

__all__ = ["ENV_VARS", "usable_cpus", "cgroup_cpu_limit", "default_threads", "apply_default_threads"]

ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # torch reads these at start-up: the user's choice


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def cgroup_cpu_limit(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> Optional[float]:
    """The CPU quota of this process's cgroup in CPUs (e.g. 2.0), the tightest along its path; None if none.

    cgroup v2: ``cpu.max`` (``"<quota> <period>"`` or ``"max <period>"``); v1: ``cpu.cfs_quota_us`` (-1: none)
    over ``cpu.cfs_period_us``, under ``root/cpu`` or ``root/cpu,cpuacct``.
    """
    text = _read(proc_cgroup)
    if text is None:
        return None
    limits = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        rel = path.strip("/")
        if controllers == "":                                    # v2: one hierarchy
            bases = [root]
        elif "cpu" in controllers.split(","):                   # v1: the cpu controller's hierarchy
            bases = [os.path.join(root, controllers), os.path.join(root, "cpu"), os.path.join(root, "cpu,cpuacct")]
        else:
            continue
        for base in dict.fromkeys(bases):
            if not os.path.isdir(base):
                continue
            parts_rel = [p for p in rel.split("/") if p]
            for depth in range(len(parts_rel), -1, -1):         # the cgroup and each parent: the tightest wins
                here = os.path.join(base, *parts_rel[:depth])
                v2 = _read(os.path.join(here, "cpu.max"))
                if v2 is not None:
                    quota, _, period = v2.partition(" ")
                    if quota != "max" and period:
                        limits.append(int(quota) / int(period))
                    continue
                quota, period = _read(os.path.join(here, "cpu.cfs_quota_us")), _read(os.path.join(here,
                                                                                                  "cpu.cfs_period_us"))
                if quota and period and int(quota) > 0 and int(period) > 0:
                    limits.append(int(quota) / int(period))
            break
    return min(limits) if limits else None


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by its cgroup's CPU quota (rounded up), >= 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    try:
        limit = cgroup_cpu_limit()
    except (OSError, ValueError):
        limit = None
    if limit is not None:
        cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)


def _local_world_size() -> int:
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def default_threads(cpus: Optional[int] = None, local_world_size: Optional[int] = None) -> int:
    """This project's default: usable CPUs // processes torchrun starts on this machine, at least 1."""
    cpus = usable_cpus() if cpus is None else cpus
    local = _local_world_size() if local_world_size is None else max(1, local_world_size)
    return max(1, cpus // local)


def _physical_cores() -> Optional[int]:
    cores = set()
    for topo in glob.glob("/sys/devices/system/cpu/cpu[0-9]*/topology"):
        package, core = _read(os.path.join(topo, "physical_package_id")), _read(os.path.join(topo, "core_id"))
        if package is None or core is None:
            return None
        cores.add((package, core))
    return len(cores) or None


def _torch_would_pick() -> set:
    """Counts torch picks by itself when nothing is set (depending on its build): the usable CPUs, the
    machine's CPUs, its physical cores."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    cores = _physical_cores()
    picks = {os.cpu_count(), affinity, cores}
    if cores and affinity:
        picks.add(min(cores, affinity))
    return {n for n in picks if n}


def apply_default_threads() -> Optional[int]:
    """Lower torch's thread count to :func:`default_threads` unless the user chose one; returns the count set.

    Returns None (and changes nothing) when ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` is set, when
    ``torch.set_num_threads`` was called with a count torch would not pick by itself, when torch
    already uses no more threads than the default, or when torch is not imported (a command that
    does not use it; every command that does imports it with its modules, before this runs).
    """
    torch = sys.modules.get("torch")
    if torch is None or any(os.environ.get(name, "").strip() for name in ENV_VARS):
        return None

    current = torch.get_num_threads()
    n = default_threads()
    if current <= n or current not in _torch_would_pick():
        return None
    torch.set_num_threads(n)
    return n
