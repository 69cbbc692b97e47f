"""Compiled per-ray functions for the fit: ``compile=true|false|auto`` (``conf/fit.yaml``).

Every evaluation of the fit's loss renders Sérsics (lensed and not) on hundreds of thousands of
rays and differentiates them; in eager autograd each step of the Sérsic profile and of the SIE
deflection is its own pass over memory forward and backward. ``torch.compile`` of those two
functions alone (:data:`lensexp.sim.trace.EAGER`, small graphs: the sub-pixel loop, the PSF, the
amplitudes and the likelihood stay eager) fuses each into one kernel per direction. Only the calls
autograd records use them; forward-only calls (ranking, reporting) stay eager, which halves the
kernels to compile. Compiled kernels are cached on disk (``lensexp.runtime.compile_cache_dir``),
so the first run on a machine pays the compilation once (~40 s on a 2-core Intel Xeon)
and later runs load them in about a second (README "Real lenses": measured timings).
"""

from __future__ import annotations

import functools

import torch

from lensexp.runtime import compile_cache_dir, compile_choice, has_cxx_compiler
from lensexp.sim.trace import EAGER, KERNEL_OPTIONS, Pointwise


def resolve(setting, device) -> bool:
    """``compile`` = true / false / auto -> bool; auto: on CPU when a C++ compiler is on the PATH
    (inductor needs one); off on GPUs (not measured there)."""
    choice = compile_choice(setting)
    if choice is not None:
        return choice
    return str(device).startswith("cpu") and has_cxx_compiler()


def pointwise(compiled: bool) -> Pointwise:
    """The per-ray functions the fit renders with: :data:`~lensexp.sim.trace.EAGER` or
    :func:`taped_pointwise`."""
    return taped_pointwise() if compiled else EAGER


@functools.cache
def taped_pointwise() -> Pointwise:
    """:data:`~lensexp.sim.trace.EAGER` with each function compiled (all dimensions symbolic, so
    one kernel serves every grid, batch and supersampling) for the calls that autograd records."""
    compile_cache_dir()
    return Pointwise(*(_when_taped(f) for f in EAGER))


def _when_taped(fn):
    compiled = torch.compile(fn, dynamic=True, options=KERNEL_OPTIONS)

    @functools.wraps(fn)
    def call(*args):
        taped = torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
        return compiled(*args) if taped else fn(*args)

    return call
