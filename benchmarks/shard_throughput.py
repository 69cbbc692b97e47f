"""End-to-end shard writing on one core: ``lensexp.simulate`` against lenstronomy, side by side.

Runs the real command path (:func:`lensexp.simulate.run`: simulate, encode, tar, hash, rename,
fsync, manifest) pinned to one core with one thread, for three settings:

* ``matched`` - what lenstronomy renders in ``benchmarks/sim_speed.py``: SIE + shear, Sersic
  source, no clumps, Gaussian PSF, Gaussian noise, no cosmic rays / hot pixels / masks, no mu_F
  rejection, 64 px, supersampling 2;
* ``tiny`` and ``hst`` - the presets with full realism (COSMOS + Sersic sources with clumps,
  mu_F rejection, lens light where the preset has it, PSF banks, cosmic rays, hot pixels, masks).

Each figure is a *marginal* rate: two runs of n1 and n2 images into fresh folders, rate =
(n2 - n1) / (t2 - t1), so start-up (imports, PSF and COSMOS banks, compilation) drops out; the
start-up of the first run in the process (kernels compiled, or loaded from the on-disk cache
``lensexp.runtime.compile_cache_dir``) is reported on its own. lenstronomy renders the matched image
(no writing) on the same core in the same process; the ratio is against it.

    python benchmarks/shard_throughput.py                       # matched, tiny, hst; compiled
    python benchmarks/shard_throughput.py --settings matched --eager
    python benchmarks/shard_throughput.py --json benchmarks/results/shard_throughput_cpu.json
"""

from __future__ import annotations

import os

# one core, one thread ("per core"), set before numpy / torch load
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from common import ensure_allocator_env, report, save  # noqa: E402
from sim_speed import lenstronomy_runner, matched_config  # noqa: E402

SETTINGS = {"matched": ("tiny", 64), "tiny": ("tiny", 64), "hst": ("hst", 192)}
TARGETS = {
    "matched": "ratio >= 10x (>= 3000 img/s on the issue's machine)",
    "tiny": ">= 2000 img/s",
    "hst": ">= 400 img/s",
}
SIZES = {"matched": (2000, 10000), "tiny": (1000, 5000), "hst": (128, 640)}


def make_config(setting: str, n: int, out: Path, compile: bool, workers: int, extra=()):
    from lensexp.config import compose_config

    preset, npix = SETTINGS[setting]
    cfg = compose_config(
        "simulate",
        [
            f"data={preset}",
            f"n={n}",
            f"workers={workers}",
            f"out={out}",
            "splits={train:1.0,val:0,test:0}",
            f"compile={str(compile).lower()}",
            "progress=false",
            "seed=0",
            *extra,
        ],
    )
    if setting == "matched":
        cfg.data = matched_config(npix)
    return cfg


def timed_run(setting: str, n: int, compile: bool, workers: int, extra=()) -> tuple[float, float]:
    """(seconds, MB written) of one full ``lensexp.simulate`` run into a fresh folder."""
    from lensexp.simulate import run

    out = Path(tempfile.mkdtemp(prefix=f"lensexp-bench-{setting}-"))
    try:
        cfg = make_config(setting, n, out, compile, workers, extra)
        t0 = time.perf_counter()
        man = run(cfg)
        return time.perf_counter() - t0, sum(s["bytes"] for s in man["shards"]) / 1e6
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main(argv=None):
    ensure_allocator_env()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--workers", type=int, default=1, help="simulation processes (>1 leaves the one-core pin)")
    ap.add_argument("--eager", action="store_true", help="no torch.compile (the default below ~2e8 rays)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the image counts (quicker or steadier)")
    ap.add_argument("--set", nargs="*", default=[], help="extra simulate overrides, e.g. batch_size=256")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.workers == 1 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    import torch

    torch.set_num_threads(1)
    compile = not args.eager
    rows = []
    for setting in args.settings:
        npix = SETTINGS[setting][1]
        ref_run = lenstronomy_runner(matched_config(npix))
        n_ref = max(20, 1600 // (npix // 32) ** 2)
        n1, n2 = (max(64, int(n * args.scale)) for n in SIZES[setting])
        ref = ref_run(n_ref)
        t0, _ = timed_run(setting, n1, compile, args.workers, args.set)  # the first run: compiles or loads kernels
        ref = max(ref, ref_run(n_ref))  # interleaved: both see the same machine state
        t1, mb1 = timed_run(setting, n1, compile, args.workers, args.set)
        t2, mb2 = timed_run(setting, n2, compile, args.workers, args.set)
        ref = max(ref, ref_run(n_ref))
        rate = (n2 - n1) / (t2 - t1)
        mb_s = (mb2 - mb1) / (t2 - t1)
        startup = t0 - n1 / rate
        report(
            rows,
            {
                "setting": setting,
                "npix": npix,
                "workers": args.workers,
                "compile": compile,
                "img_s": rate,
                "MB_s": mb_s,
                "startup_s": startup,
                "lenstronomy_img_s_1core": ref,
                "ratio": rate / ref,
                "target": TARGETS[setting],
                "n": [n1, n2],
            },
            f"{setting:8s} {npix:3d} px  {rate:7.0f} img/s  {mb_s:6.1f} MB/s  start-up {startup:5.1f} s   "
            f"lenstronomy {ref:6.1f} img/s (render only)  ratio {rate / ref:5.1f}x   target {TARGETS[setting]}",
        )
    save(rows, args.json)
    return rows


if __name__ == "__main__":
    main()
