"""Helpers shared by the benchmark scripts: machine description and allocator settings."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from lensexp.runtime import ALLOCATOR_ENV


def ensure_allocator_env() -> None:
    """Re-execute the running script with glibc's allocator settings (read only at start-up)."""
    if any(os.environ.get(k) != v for k, v in ALLOCATOR_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **ALLOCATOR_ENV})


def machine_info() -> dict:
    """CPU model, core count, library versions and the date, stored beside each figure."""
    try:
        import lenstronomy

        lt = lenstronomy.__version__
    except ImportError:
        lt = None
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": gpu,
        "torch": torch.__version__,
        "lenstronomy": lt,
        "date": time.strftime("%Y-%m-%d"),
    }


def items_per_s(fn, repeats: int, items: int, device: str) -> float:
    """Items per second of ``repeats`` calls of ``fn`` (each handling ``items``), the device synchronised."""

    def sync():
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()

    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return repeats * items / (time.perf_counter() - t0)


def report(rows: list, row: dict, line: str) -> None:
    """Append ``row`` (with :func:`machine_info`) to ``rows`` and print ``line`` at once."""
    rows.append({**row, **machine_info()})
    print(line, flush=True)


def save(rows: list, path: str | None) -> None:
    """Write the rows as JSON to ``path`` (when given), e.g. ``benchmarks/results/*.json``."""
    if path:
        Path(path).write_text(json.dumps(rows, indent=2))


def write_results(out: str | Path, stem: str, res, md: str) -> None:
    """``out/<stem>.json`` (``res``) and ``out/<stem>.md`` (``md``, also printed): a results folder."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2))
    (out / f"{stem}.md").write_text(md)
    print(md)
    print(f"wrote {out}/{stem}.json and .md", file=sys.stderr)
