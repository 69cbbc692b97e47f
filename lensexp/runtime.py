"""Process set-up shared by the entry points: the cores really available, torch thread pools,
device names and the glibc allocator setting.

Thread pools are sized to the cores this process may run on (``os.sched_getaffinity``, the
cgroup CPU quota of a container), not to the machine's core count: two jobs pinned with
``taskset -c 0`` and ``taskset -c 1`` then each use one thread instead of fighting over both.
``LENSEXP_THREADS`` (or ``OMP_NUM_THREADS``) overrides the choice.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from lensexp.errors import ConfigError

# glibc: keep large buffers mapped instead of returning them to the OS after every batch
# (doubled CPU simulation speed; see the README)
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "1073741824"}


def _cgroup_cpus() -> float | None:
    """CPUs allowed by a cgroup v2 quota (``cpu.max``), None when unlimited or unknown."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return float(quota) / float(period)
    except (ValueError, ZeroDivisionError):
        return None


def available_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup quota (>= 1)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        n = os.cpu_count() or 1
    quota = _cgroup_cpus()
    if quota is not None:
        n = min(n, max(1, math.floor(quota)))
    return max(1, n)


def thread_count() -> int:
    """Threads for torch's intra-op pool: ``LENSEXP_THREADS``, else ``OMP_NUM_THREADS``, else
    :func:`available_cores`."""
    for key in ("LENSEXP_THREADS", "OMP_NUM_THREADS"):
        v = os.environ.get(key)
        if v:
            try:
                n = int(v)
            except ValueError:
                raise ConfigError(f"{key} must be a positive integer, got '{v}'") from None
            if n < 1:
                raise ConfigError(f"{key} must be a positive integer, got '{v}'")
            return n
    return available_cores()


def set_threads(n: int | None = None) -> int:
    """Size torch's thread pool to ``n`` (default :func:`thread_count`); returns it."""
    import torch

    n = int(n or thread_count())
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def resolve_device(name) -> str:
    """``auto`` -> ``cuda`` when a GPU is present, else ``cpu``; other names pass through checked."""
    import torch

    name = str(name)
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA device is available; use device=cpu or device=auto")
    if name.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device must be auto, cpu or cuda[:N], got '{name}'")
    return name


def allocator_env() -> dict:
    """``os.environ`` values to set for child processes (the caller's own settings win)."""
    return {k: os.environ.get(k, v) for k, v in ALLOCATOR_ENV.items()}
