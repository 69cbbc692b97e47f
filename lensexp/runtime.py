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


def tune_allocator() -> bool:
    """Apply :data:`ALLOCATOR_ENV` to this process through glibc's ``mallopt`` (the environment
    variables only act at process start): large tensors then reuse mapped memory instead of a
    fresh ``mmap`` + page faults per allocation (a SLACS fit: 131 -> 66 s, system time 111 -> 1.4 s).
    Settings already in the environment win. Returns False where there is no glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return False
    codes = {"MALLOC_TRIM_THRESHOLD_": -1, "MALLOC_MMAP_THRESHOLD_": -3}  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD
    ok = True
    for key, value in ALLOCATOR_ENV.items():
        if key not in os.environ:
            ok &= bool(mallopt(codes[key], int(value)))
    return ok


def allocator_env() -> dict:
    """``os.environ`` values to set for child processes (the caller's own settings win)."""
    return {k: os.environ.get(k, v) for k, v in ALLOCATOR_ENV.items()}


# torch.compile pays for itself once a run traces this many rays (start-up ~10 s with a warm cache,
# ~50 s cold, against a 2.6-3.6x faster renderer; benchmarks/shard_throughput.py)
COMPILE_MIN_RAYS = 2e8


def compile_cache_dir() -> Path:
    """Point inductor's on-disk cache at a persistent folder (``TORCHINDUCTOR_CACHE_DIR`` if set,
    else ``$XDG_CACHE_HOME/lensexp/inductor``, default ``~/.cache``), so reruns and worker
    processes load compiled kernels instead of recompiling (``Simulator(compile=True)`` calls it
    before its kernels compile)."""
    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(base / "lensexp" / "inductor")
    path = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:  # read-only home: inductor falls back to its temporary folder
        pass
    return path


def compile_choice(setting) -> bool | None:
    """A ``compile`` setting (true / false / auto, bool or string) -> True, False, or None for
    auto; anything else is refused in one message."""
    if isinstance(setting, bool):
        return setting
    s = str(setting).lower()
    if s in ("true", "false"):
        return s == "true"
    if s != "auto":
        raise ConfigError(f"compile must be true, false or auto, got '{setting}'")
    return None


def resolve_compile(setting, n_images: int, npix: int, supersample: int, device: str = "cpu") -> bool:
    """``compile`` = true / false / auto -> bool. ``auto`` compiles when the run traces at least
    :data:`COMPILE_MIN_RAYS` rays (``n * (npix * supersample)^2``) and, on CPU, a C++ compiler
    is on the PATH (inductor needs one)."""
    choice = compile_choice(setting)
    if choice is not None:
        return choice
    if str(device).startswith("cpu") and not has_cxx_compiler():
        return False
    return n_images * (npix * supersample) ** 2 >= COMPILE_MIN_RAYS


def has_cxx_compiler() -> bool:
    """Whether a C++ compiler (``c++``, ``g++`` or ``clang++``) is on the PATH: inductor's CPU
    kernels need one."""
    import shutil

    return any(shutil.which(c) for c in ("c++", "g++", "clang++"))


# x86 feature flags (Linux /proc/cpuinfo) of hardware bfloat16 arithmetic
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """True when this CPU computes bfloat16 in hardware (:data:`BF16_CPU_FLAGS` among the
    ``flags`` of ``/proc/cpuinfo``, or of the text given). False where unknown (no Linux
    cpuinfo): bfloat16 emulated in software is slower than float32."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return any(f in line.split() for f in BF16_CPU_FLAGS)
    return False


def resolve_precision(precision, accelerator: str) -> str:
    """Lightning ``trainer.precision``; ``auto`` -> ``bf16-mixed`` on a CPU with hardware
    bfloat16 (:func:`cpu_has_native_bf16`; 2-core AMD EPYC Zen 5, ``benchmarks/train_throughput.py
    --compare``: test_resnet trains 1.16x, resnet10t 1.26x faster than in float32) or a GPU that
    supports it, else ``32-true`` on CPU and ``16-mixed`` on an older GPU. Network outputs and
    losses stay float32 either way (:func:`lensexp.models.float32`)."""
    p = str(precision)
    if p != "auto":
        return p
    if str(accelerator) in ("gpu", "cuda"):
        import torch

        return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_has_native_bf16() else "32-true"
