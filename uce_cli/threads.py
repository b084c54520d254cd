"""CPU threads: how many this process may use (affinity and cgroup quota), set once at start-up.

torch sizes its thread pool from the machine's cores. In a container with a CPU quota, or under
``taskset``, that is more threads than the process gets, and every parallel region then waits at
its barrier for threads the kernel has descheduled (measured on a 2-core machine with other work:
`uce sample` 50.6 s per image with torch's default, 2.76 s with one thread). uce starts with the
CPUs it may actually run on; ``--threads`` (or ``UCE_THREADS``) overrides that, and an
``OMP_NUM_THREADS`` already in the environment is respected. The count is deterministic for a
machine (not taken from its load), so the same command gives the same bytes run after run.

Nothing here imports torch: at start-up the count goes into the environment, before torch loads;
a process that loaded torch already keeps its own count unless one is given.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")
# Thread-pool variables of the libraries torch may run its kernels on.
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def cgroup_cpu_limit(root: Path = CGROUP) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (``2.5`` = 250 ms per 100 ms), or None.

    Reads cgroup v2's ``cpu.max`` (``"max 100000"`` or ``"250000 100000"``), else cgroup v1's
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (quota −1: none). Unreadable files mean no quota.
    """
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota != "max" and int(period) > 0:
            return int(quota) / int(period)
        return None
    except (OSError, ValueError):
        pass
    for v1 in (root / "cpu", root / "cpu,cpuacct", root):
        try:
            quota = int((v1 / "cpu.cfs_quota_us").read_text())
            period = int((v1 / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return quota / period if quota > 0 and period > 0 else None
    return None


def usable_cpus(root: Path = CGROUP) -> int:
    """CPUs this process may run on: its affinity mask, capped by its cgroup quota (at least 1)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)


def default_threads() -> int:
    """The thread count when none is given: ``OMP_NUM_THREADS`` if set to a count, else ``usable_cpus()``."""
    given = os.environ.get("OMP_NUM_THREADS", "").strip()
    if given.isdigit() and int(given) > 0:
        return int(given)
    return usable_cpus()


def use_threads(threads: int | None) -> int:
    """Set the CPU thread count of this process; return it.

    At start-up (torch not loaded yet) the count goes into the environment, where torch reads it
    when it loads. A process that loaded torch before (a program that runs uce's commands in
    itself, the tests) keeps its own setting unless ``threads`` is given, and its environment is
    left alone: nothing leaks into the processes it starts later.

    Args:
        threads: the count, or None for ``default_threads()``.
    """
    torch = sys.modules.get("torch")
    if torch is not None:
        if threads is not None and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        return torch.get_num_threads()
    count = default_threads() if threads is None else threads
    for name in THREAD_VARS:
        os.environ[name] = str(count)
    return count
