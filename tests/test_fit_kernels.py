"""The fit's compiled per-ray functions (lensexp.fit.kernels) and the eager speed-ups beside them:
same templates, amplitudes and gradients as the library's eager code."""

from __future__ import annotations

import pytest
import torch

from lensexp.errors import ConfigError
from lensexp.fit import kernels
from lensexp.fit.model import LensModel, ParamSpace, solve_amplitudes
from lensexp.fit.shapelets import shapelet_templates
from lensexp.sim import fastmath
from lensexp.sim.psf import draw_kernel
from lensexp.sim.trace import EAGER

NPIX, PIX = 40, 0.1
VALUES = dict(theta_E=1.1, e1=0.08, e2=-0.12, center_x=0.05, center_y=-0.03, gamma1=0.03, gamma2=-0.02)
VALUES.update(src_R=0.25, src_n=1.5, src_e1=0.1, src_e2=0.05, src_x=0.12, src_y=0.07)
VALUES.update(ll_x=0.02, ll_y=-0.01, ll_R=0.9, ll_n=4.0, ll_e1=0.1, ll_e2=-0.05)
VALUES.update(ll2_R=0.3, ll2_n=1.0, ll2_e1=0.1, ll2_e2=-0.05)


def _templates_and_grad(pw, dtype=torch.float64, M=3):
    """Templates [M, K, N, N] of SIE + shear + Sérsic source + two lens-light Sérsics at slightly
    different parameters per row, and the gradient of a weighted sum of them."""
    model = LensModel(NPIX, PIX, 2, 2, pw=pw)
    space = ParamSpace.for_grid(NPIX, PIX, 2, dtype)
    p0 = torch.tensor([VALUES[n] for n in space.names], dtype=dtype)
    p = (p0 * (1 + 0.05 * torch.linspace(-1, 1, M, dtype=dtype))[:, None]).requires_grad_(True)
    psf = torch.from_numpy(draw_kernel("gaussian", 0.2, PIX, 11)).to(dtype).expand(M, 11, 11)
    T = model.templates(space.as_dict(p), psf)
    w = torch.linspace(0.5, 1.5, T.numel(), dtype=dtype).reshape(T.shape)
    (g,) = torch.autograd.grad((w * T).sum(), p)
    return T.detach(), g


def test_compiled_per_ray_functions_give_the_eager_templates_and_gradients():
    T_ref, g_ref = _templates_and_grad(EAGER)
    T, g = _templates_and_grad(kernels.taped_pointwise())
    torch.testing.assert_close(T, T_ref, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)
    assert g_ref.abs().amax(0).gt(0).sum() == g_ref.shape[1]  # every parameter moves the templates


def test_compiled_shapelets_give_the_eager_templates():
    p = {k: torch.tensor(v, dtype=torch.float64) for k, v in {**VALUES, "sh_beta": 0.2}.items()}
    p["theta_E"].requires_grad_(True)
    S_ref, _ = shapelet_templates(p, 3, NPIX, PIX, 2, None, EAGER)
    S, _ = shapelet_templates(p, 3, NPIX, PIX, 2, None, kernels.taped_pointwise())
    torch.testing.assert_close(S, S_ref, rtol=1e-10, atol=1e-14)


def test_forward_only_calls_stay_eager():
    """Outside autograd the taped functions are the library's, bit for bit (no kernel compiled)."""
    with torch.no_grad():
        T_ref = LensModel(NPIX, PIX, 2, 0).source_templates(
            {k: torch.tensor([v], dtype=torch.float32) for k, v in VALUES.items()}, None
        )
        T = LensModel(NPIX, PIX, 2, 0, pw=kernels.taped_pointwise()).source_templates(
            {k: torch.tensor([v], dtype=torch.float32) for k, v in VALUES.items()}, None
        )
    assert torch.equal(T, T_ref)


def test_compile_setting(monkeypatch):
    import shutil

    assert kernels.resolve(True, "cpu") is True and kernels.resolve("false", "cpu") is False
    assert kernels.resolve("auto", "cuda") is False  # not measured on GPUs
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/" + name)
    assert kernels.resolve("auto", "cpu") is True
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no C++ compiler: eager
    assert kernels.resolve("auto", "cpu") is False
    assert kernels.pointwise(False) is EAGER
    with pytest.raises(ConfigError, match="compile must be true, false or auto"):
        kernels.resolve("sometimes", "cpu")


def test_float32_arctan_is_the_library_one_where_eager_autograd_records_it():
    x = torch.linspace(-3, 3, 1001)
    assert torch.equal(fastmath.atan(x), fastmath.atan_f32(x))  # simulator (no autograd): the polynomial
    assert torch.equal(fastmath.atanh(x / 4), fastmath.atanh_f32(x / 4))
    xt = x.clone().requires_grad_(True)
    assert torch.equal(fastmath.atan(xt), torch.atan(xt)) and torch.equal(fastmath.atanh(xt / 4), torch.atanh(xt / 4))


def test_amplitudes_are_the_weighted_least_squares_solution():
    g = torch.Generator().manual_seed(0)
    T = torch.rand(3, 4, 9, 9, generator=g, dtype=torch.float64)
    true = torch.rand(3, 4, generator=g, dtype=torch.float64) + 0.5
    w = torch.rand(3, 9, 9, generator=g, dtype=torch.float64) + 0.1
    d = (true[:, :, None, None] * T).sum(1) + 0.01 * torch.randn(3, 9, 9, generator=g, dtype=torch.float64)
    sw = w.flatten(1).sqrt()
    ref = torch.linalg.lstsq(T.flatten(2).transpose(1, 2) * sw[..., None], (d.flatten(1) * sw)[..., None]).solution
    torch.testing.assert_close(solve_amplitudes(T, d, w), ref[..., 0].clamp(min=0), rtol=1e-8, atol=1e-10)
