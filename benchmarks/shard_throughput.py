"""End-to-end shard writing: images/s and MB/s of ``lensexp.simulate`` against lenstronomy.

Runs the real command path (:func:`lensexp.simulate.run`: simulate, encode, tar, hash, rename,
manifest) for the ``tiny`` and ``hst`` presets with 1 and 2 worker processes, full realism
(COSMOS + Sérsic sources, lens light where the preset has it, PSF, noise, cosmic rays, hot
pixels, masks), and in the same run measures lenstronomy rendering the matched simple image
(SIE + shear, Sérsic, Gaussian PSF, noise; no writing) on one core for the ratio.

    python benchmarks/shard_throughput.py                    # tiny and hst, 1 and 2 workers
    python benchmarks/shard_throughput.py --presets tiny --workers 2 --n 4000 --compile
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from common import ensure_allocator_env, report, save
from sim_speed import lenstronomy_runner, matched_config

from lensexp.config import compose_config
from lensexp.simulate import run

GRID = {"tiny": 64, "hst": 192}


def shard_run(preset: str, n: int, workers: int, compile: bool, shard_size: int) -> tuple[float, float]:
    """img/s and MB/s of one full ``lensexp.simulate`` run into a fresh folder."""
    out = Path(tempfile.mkdtemp(prefix=f"lensexp-bench-{preset}-"))
    try:
        cfg = compose_config(
            "simulate",
            [
                f"data={preset}",
                f"n={n}",
                f"workers={workers}",
                f"out={out}",
                f"shard_size={shard_size}",
                "splits={train:1.0,val:0,test:0}",
                f"compile={str(compile).lower()}",
                "progress=false",
                "seed=0",
            ],
        )
        t0 = time.perf_counter()
        man = run(cfg)
        dt = time.perf_counter() - t0
        mb = sum(s["bytes"] for s in man["shards"]) / 1e6
        return n / dt, mb / dt
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main(argv=None):
    ensure_allocator_env()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "hst"], choices=sorted(GRID))
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--n", type=int, default=2048, help="images per run at tiny (1/8 of it at hst)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the ray tracer in each worker")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = []
    for preset in args.presets:
        n = args.n if preset == "tiny" else max(64, args.n // 8)
        shard_size = max(16, n // 8)
        ref_run = lenstronomy_runner(matched_config(GRID[preset]))
        ref = max(ref_run(max(20, n // 10)) for _ in range(2))
        for w in args.workers:
            img_s, mb_s = shard_run(preset, n, w, args.compile, shard_size)
            report(
                rows,
                {
                    "preset": preset,
                    "workers": w,
                    "img_s": img_s,
                    "MB_s": mb_s,
                    "lenstronomy_img_s_1core": ref,
                    "ratio": img_s / ref,
                    "compile": args.compile,
                    "n": n,
                },
                f"{preset:5s} workers={w}  {img_s:8.1f} img/s  {mb_s:7.1f} MB/s   lenstronomy (1 core, render only) "
                f"{ref:6.1f} img/s   ratio {img_s / ref:5.1f}x",
            )
    save(rows, args.json)
    return rows


if __name__ == "__main__":
    main()
