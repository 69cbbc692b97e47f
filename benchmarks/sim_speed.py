"""Simulation speed: lensexp vs lenstronomy at matched settings, side by side in one process.

Matched settings: SIE + external shear, elliptical Sérsic source, Gaussian PSF, Poisson + read
noise, supersampling 2, on the tiny grid (64 px, 0.1"/px) and the hst grid (192 px, 0.04"/px).
lensexp runs batched (batch >= 64) with ``torch.compile``; lenstronomy renders image by image
with ``ImageModel`` as its users do. Both are pinned to one CPU thread ("per core"), run in the
same process under the same allocator settings (glibc keeps large buffers mapped:
``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``, set by re-executing if absent), and each
figure is the best of ``--rounds`` interleaved rounds.

    python benchmarks/sim_speed.py                 # both grids, prints img/s and the ratio
    python benchmarks/sim_speed.py --sizes 64 --n 512 --device cuda
"""

from __future__ import annotations

import argparse
import os
import time

# one BLAS thread for lenstronomy's numpy ("per core"), set before numpy/torch load
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

from common import ensure_allocator_env, items_per_s, report, save  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lensexp.config import load_data_preset  # noqa: E402
from lensexp.sim.render import Simulator  # noqa: E402

GRIDS = {64: "tiny", 192: "hst"}


def matched_config(npix: int):
    """The preset for this grid, reduced to the matched settings (no artefacts, no lens light)."""
    cfg = load_data_preset(GRIDS[npix])
    cfg.supersample = 2
    cfg.adaptive.enabled = False  # every pixel supersampled, as lenstronomy does here
    cfg.bands = [cfg.bands[0]]
    cfg.source.kind = "sersic"
    cfg.source.min_mu = 0.0
    cfg.source.clumps.n = [0, 0]
    cfg.lens_light.enabled = False
    cfg.psf.kind = "gaussian"
    # one FWHM (the middle of the preset's range) for both, truncated at lenstronomy's 5 sigma
    fwhm = float(np.mean(list(cfg.psf.fwhm)))
    cfg.psf.fwhm = [fwhm, fwhm]
    cfg.psf.n_kernels = 1
    cfg.psf.size = 2 * int(np.ceil(5 * fwhm / 2.3548 / float(cfg.pixscale))) + 1
    cfg.instrument.poisson = "gaussian"
    cfg.instrument.correlated_noise.enabled = False
    for k in ("cosmic_rays", "hot_pixels", "masks"):
        cfg.instrument[k].enabled = False
    cfg.instrument.bias = [0.0, 0.0]
    return cfg


def lensexp_runner(cfg, batch: int, device: str, compile: bool):
    """Build the simulator, warm it up (compilation) and return ``run(n) -> img/s``."""
    sim = Simulator(cfg, device=device, compile=compile)
    sim.sample(batch, seed=0, batch_size=batch)

    def run(n: int) -> float:
        return items_per_s(lambda: sim.sample(n, seed=1, batch_size=batch), 1, n, device)

    return run


def lenstronomy_runner(cfg):
    """lenstronomy ``ImageModel`` at the same grid, PSF and supersampling; ``run(n) -> img/s``."""
    from lenstronomy.Data.imaging_data import ImageData
    from lenstronomy.Data.psf import PSF
    from lenstronomy.ImSim.image_model import ImageModel
    from lenstronomy.LensModel.lens_model import LensModel
    from lenstronomy.LightModel.light_model import LightModel
    from lenstronomy.Util import image_util
    from lenstronomy.Util import simulation_util

    npix, pix = int(cfg.npix), float(cfg.pixscale)
    kw_data = simulation_util.data_configure_simple(npix, pix, exposure_time=1000.0, background_rms=0.02)
    data = ImageData(**kw_data)
    psf = PSF(psf_type="GAUSSIAN", fwhm=float(np.mean(list(cfg.psf.fwhm))), pixel_size=pix, truncation=5)
    model = ImageModel(
        data,
        psf,
        lens_model_class=LensModel(["SIE", "SHEAR"]),
        source_model_class=LightModel(["SERSIC_ELLIPSE"]),
        kwargs_numerics={"supersampling_factor": 2, "supersampling_convolution": False},
    )
    rng = np.random.default_rng(0)

    def run(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            one()
        return n / (time.perf_counter() - t0)

    def one():
        kl = [
            dict(
                theta_E=rng.uniform(0.5, 1.5),
                e1=rng.uniform(-0.2, 0.2),
                e2=rng.uniform(-0.2, 0.2),
                center_x=rng.uniform(-0.1, 0.1),
                center_y=rng.uniform(-0.1, 0.1),
            ),
            dict(gamma1=rng.uniform(-0.05, 0.05), gamma2=rng.uniform(-0.05, 0.05)),
        ]
        ks = [
            dict(
                amp=20.0,
                R_sersic=rng.uniform(0.1, 0.5),
                n_sersic=rng.uniform(1, 4),
                e1=rng.uniform(-0.2, 0.2),
                e2=rng.uniform(-0.2, 0.2),
                center_x=rng.uniform(-0.3, 0.3),
                center_y=rng.uniform(-0.3, 0.3),
            )
        ]
        img = model.image(kwargs_lens=kl, kwargs_source=ks)
        return img + image_util.add_poisson(img, exp_time=1000.0) + image_util.add_background(img, 0.02)

    one()  # warm-up
    return run


def main(argv=None):
    ensure_allocator_env()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 192], choices=sorted(GRIDS))
    ap.add_argument("--n", type=int, default=2048, help="lensexp images per grid (1/8 of it at 192 px)")
    ap.add_argument("--n-ref", type=int, default=200, help="lenstronomy images per grid")
    ap.add_argument("--batch", type=int, default=256, help="lensexp batch size (>= 64)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for both (1 = per core)")
    ap.add_argument("--no-compile", action="store_true", help="lensexp in eager mode")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best of each is reported")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for npix in args.sizes:
        cfg = matched_config(npix)
        n = args.n if npix <= 64 else max(args.batch, args.n // 8)
        n_ref = args.n_ref if npix <= 64 else max(20, args.n_ref // 8)
        run_ours = lensexp_runner(cfg, args.batch, args.device, not args.no_compile)
        run_ref = lenstronomy_runner(cfg)
        ours = ref = 0.0
        for _ in range(args.rounds):
            ours = max(ours, run_ours(n))
            ref = max(ref, run_ref(n_ref))
        report(
            rows,
            {
                "npix": npix,
                "lensexp_img_s": ours,
                "lenstronomy_img_s": ref,
                "ratio": ours / ref,
                "device": args.device,
                "threads": args.threads,
                "batch": args.batch,
            },
            f"{npix:4d} px  lensexp {ours:9.1f} img/s   lenstronomy {ref:7.1f} img/s   ratio {ours / ref:6.1f}x"
            f"   ({args.device}, {args.threads} thread(s), batch {args.batch})",
        )
    save(rows, args.json)
    return rows


if __name__ == "__main__":
    main()
