"""Maximum-likelihood lens modelling: ``python -m lensexp.fit input=PATH out=fits.csv``.

The classic baseline the network is measured against. Each image is fitted with SIE + external
shear, an elliptical Sérsic source (``source_components=2``: two, each with its own centre) and,
with ``lens_light=true``, ``lens_light_components`` (default 3: core, bulge, envelope) concentric
elliptical Sérsics for the lens galaxy, their centre free, through the simulator's own
differentiable forward model (supersampled ray tracing and PSF convolution,
:func:`lensexp.sim.trace.render_sersic`), maximising the likelihood of the pixels under the image
noise model with torch autograd:

1. **Starts**: ``init=prior`` draws ``n_starts`` mass models from the data preset's priors;
   ``init=cnn ckpt=CKPT`` takes the network's posterior mean and samples (Pearson et al. 2021);
   ``init=truth truth=truth.csv`` starts at the true mass (a diagnostic: the "true optimum").
   The source is placed where the significant pixels map back to (flux-weighted mean of
   ``beta = theta - alpha``), so every start is a plausible lens.
2. **Adam**, batched over lenses and starts, with the linear amplitudes solved exactly at every
   step (weighted least squares, lenstronomy's linear solver), data-based pixel variance.
3. **L-BFGS** (strong Wolfe) polishes the ``lbfgs.polish`` best starts of each lens, amplitudes
   free, with the model's own variance ``sigma^2 = sky/t + read^2/t^2 + gain^2/(12 t^2) +
   model/t`` (``lensexp.sim.instrument``) re-evaluated between rounds.
4. ``mass_model=sie`` (the default with ``lens_light=true``), the model of the published SLACS
   parameters (Bolton et al. 2008): Adam explores in the wider SIE + shear space, then the
   polished starts hold the shear at zero (``lbfgs.sie_direct``; with ``false`` they are polished
   with the shear first and the ``lbfgs.sie_candidates`` best are polished again as SIEs).
5. Optionally (``laplace=true``) the Laplace approximation: the inverse Hessian of ``-ln L`` in
   physical parameters gives ``p_std``.

Speed: ``compile=auto`` (CPU with a C++ compiler) runs the gradients through compiled Sérsic and
SIE per-ray functions (:mod:`lensexp.fit.kernels`); ``compile=false`` keeps eager torch.

Priors: parameters live in boxes; theta_E and each shear component are bounded by the data
preset's prior (``theta_E_range``, ``shear_max``; ``source_R_max`` bounds the source's size on
request), the mass ellipticity by |e| < 0.7 (:func:`~lensexp.fit.model.ellipticity_wall`), and with
lens light a Gaussian of width ``center_prior`` ties the mass centre to the light's; ``nll`` is then
the ``-ln`` posterior. :mod:`lensexp.fit.results` writes the rows and warns about fits held by a
prior's edge or moved by the shapelet source.

The likelihood is Gaussian plus a flat outlier term beyond ``outlier_sigma`` (cosmic rays, hot
pixels, source knots a Sérsic lacks; :func:`rho`), so every fit of a file is scored on the same
pixels and ``nll`` compares across runs and starting modes. ``chi2_dof`` is over the inliers.

Writes one CSV row per file: ``name``, the seven mass labels, ``chi2_dof``, ``seconds`` (wall
time per lens, batch time shared), then ``mu_F`` of the fitted model, ``nll``, ``n_pix``
(inliers), ``n_out`` (outliers), the source (and lens-light) parameters, and with
``laplace=true`` the ``_std`` columns. Unusable
files go to ``<out>.errors.csv``. Rows are appended to ``<out>.partial`` as lenses finish, so an
interrupted run resumes where it stopped; the CSV appears only when all are done.

Noise model per file: FITS header ``EXPTIME`` [s], ``SKYLEV`` [e-/s/px, subtracted],
``RDNOISE`` [e-], ``GAIN`` [e-/ADU] (written by ``lensexp.simulate format=fits``), overridden by
``noise.*``; when the exposure time is unknown the background rms is estimated from the image
(``astropy.stats.mad_std``) and the Poisson term of the source is dropped. PSF: a ``PSF`` image
extension of the file, else ``psf=FILE``, else a Gaussian of ``psf_fwhm`` arcsec.
"""

from lensexp.fit.model import (  # noqa: F401
    LIGHT,
    MASS,
    SOURCE,
    LensModel,
    Observation,
    ParamSpace,
    likelihood_terms,
    param_names,
    rho,
    solve_amplitudes,
)
from lensexp.fit.optimise import FitSettings, fit_batch  # noqa: F401
from lensexp.fit.starts import cnn_starts, init_source, prior_mass  # noqa: F401
from lensexp.fit.data import load_psf  # noqa: F401
from lensexp.fit.results import columns  # noqa: F401
from lensexp.fit.workflow import INITS, check_config, run  # noqa: F401
