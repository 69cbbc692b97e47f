"""PSF convolution routes side by side on one core: which is fastest per grid and kernel size.

``PSFBank.convolve`` takes one grouped direct convolution for kernels up to
``lensexp.sim.psf.DIRECT_MAX`` pixels and the batched FFT above (a threshold timed on an AVX2 core,
where oneDNN's grouped 2-D kernels fell off a cliff above 9 px). This script times, for each data
preset's grid, kernel size and simulation batch, in one process on one core:

* ``direct`` - one grouped ``conv2d`` with the per-image k x k kernels (``direct_convolve``);
* ``separable`` - two grouped 1-D ``conv2d`` passes (k x 1, then 1 x k) with each kernel's rank-1
  factors (SVD); exact for Gaussian kernels (a pixel-integrated Gaussian is a product of two 1-D
  profiles: second singular value ~5e-8 of the first), not for Moffat, Airy or empirical ones;
* ``fft`` - the batched real FFT at the padded size (``fft_convolve``),

on Gaussian kernels across the preset's FWHM range (``matched``: the one kernel of
``benchmarks/sim_speed.py``'s settings, 9 px at 64 px), and prints microseconds per image, the fastest
route, the route ``PSFBank`` takes today and how much slower that is than the fastest. Every route
is checked against the FFT (relative difference printed).

    python benchmarks/psf_routes.py --json benchmarks/results/psf_routes_cpu.json
    python benchmarks/psf_routes.py --presets tiny hst --repeats 5
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")  # one core, one thread, set before numpy / torch load

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import ensure_allocator_env, report, save  # noqa: E402
from sim_speed import matched_config  # noqa: E402

from lensexp.config import load_data_preset  # noqa: E402
from lensexp.sim.psf import DIRECT_MAX, direct_convolve, draw_kernel, fast_fft_size, fft_convolve, kernel_rfft  # noqa: E402

PRESETS = ("matched", "tiny", "tiny_broad", "lsst", "euclid", "slacs", "hst")  # matched: sim_speed's 64-px settings
RAYS_PER_BATCH = 2**21  # batch = this / npix^2, within [16, 256] (the simulator's batches are of this order)


def rank1_factors(kernels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Column and row factors [K, k] with ``kernels ~ u v^T`` and the largest second-to-first
    singular value ratio (0 for exactly separable kernels)."""
    U, S, Vh = torch.linalg.svd(kernels.double())
    root = S[:, 0].sqrt()[:, None]
    return (U[:, :, 0] * root).float(), (Vh[:, 0, :] * root).float(), float((S[:, 1] / S[:, 0]).max())


def separable_convolve(images: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """'Same'-size convolution of [B, 1, N, N] images with per-image rank-1 kernels ``u v^T``."""
    B, C, N, M = images.shape
    k = u.shape[-1]
    x = images.reshape(1, B * C, N, M)
    x = torch.nn.functional.conv2d(x, u.flip(-1)[:, None, :, None], padding=(k // 2, 0), groups=B * C)
    x = torch.nn.functional.conv2d(x, v.flip(-1)[:, None, None, :], padding=(0, k // 2), groups=B * C)
    return x.reshape(B, C, N, M)


def us_per_image(fn, batch: int, repeats: int) -> float:
    fn()  # warm-up (oneDNN primitive creation)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return 1e6 * best / batch


def time_routes(preset: str, repeats: int, seed: int = 0) -> dict:
    cfg = matched_config(64) if preset == "matched" else load_data_preset(preset)
    npix, pixscale, k = int(cfg.npix), float(cfg.pixscale), int(cfg.psf.size)
    lo, hi = (float(f) for f in cfg.psf.fwhm)
    batch = int(np.clip(RAYS_PER_BATCH // npix**2, 16, 256))
    kernels = torch.from_numpy(
        np.stack([draw_kernel("gaussian", float(f), pixscale, k, 3.5) for f in np.linspace(lo, hi, batch)])
    ).float()
    u, v, rank_excess = rank1_factors(kernels)
    images = torch.rand(batch, 1, npix, npix, generator=torch.Generator().manual_seed(seed))
    size = fast_fft_size(npix + (k - 1) // 2)
    spectra = kernel_rfft(kernels, size)
    routes = {
        "direct": lambda: direct_convolve(images, kernels),
        "separable": lambda: separable_convolve(images, u, v),
        "fft": lambda: fft_convolve(images, spectra, k, size),
    }
    ref = routes["fft"]()
    scale = float(ref.abs().max())
    row = {"preset": preset, "npix": npix, "kernel_px": k, "batch": batch, "rank1_excess": rank_excess}
    for name, fn in routes.items():
        row[f"{name}_us"] = us_per_image(fn, batch, repeats)
        row[f"{name}_rel_diff"] = float((fn() - ref).abs().max()) / scale
    row["fastest"] = min(routes, key=lambda r: row[f"{r}_us"])
    row["lensexp_route"] = "direct" if k <= DIRECT_MAX else "fft"
    row["lensexp_over_fastest"] = row[f"{row['lensexp_route']}_us"] / row[f"{row['fastest']}_us"]
    return row


def main(argv=None):
    ensure_allocator_env()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=list(PRESETS))
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per route; the fastest counts")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    torch.set_num_threads(1)
    rows = []
    for preset in args.presets:
        r = time_routes(preset, max(1, args.repeats))
        line = (
            f"{preset:11s} {r['npix']:4d} px, {r['kernel_px']:2d}-px kernels, batch {r['batch']:3d}: "
            f"direct {r['direct_us']:8.1f}  separable {r['separable_us']:7.1f}  fft {r['fft_us']:7.1f} us/img; "
            f"fastest {r['fastest']}, lensexp takes {r['lensexp_route']} ({r['lensexp_over_fastest']:.2f}x); "
            f"max rel. diff to fft {max(r['direct_rel_diff'], r['separable_rel_diff']):.0e}"
        )
        report(rows, r, line)
    save(rows, args.json)


if __name__ == "__main__":
    main()
