"""The positions penalty of the pixelated stage: image positions against lenstronomy's solver,
source-plane separations against the SIS by hand, the penalty's wall and its configuration."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lensexp.config import compose_config
from lensexp.errors import ConfigError
from lensexp.fit import positions as pos
from lensexp.fit.workflow import check_config, fit_settings, resolve_search
from lensexp.sim.trace import EAGER


def lens(theta_E=1.0, e1=0.0, e2=0.0, cx=0.0, cy=0.0, g1=0.0, g2=0.0) -> dict:
    v = dict(theta_E=theta_E, e1=e1, e2=e2, center_x=cx, center_y=cy, gamma1=g1, gamma2=g2)
    return {k: torch.tensor(float(x), dtype=torch.float64) for k, x in v.items()}


@pytest.mark.parametrize(
    "kw, beta",
    [
        (dict(theta_E=1.2, e1=0.15, e2=-0.05, cx=0.05, cy=-0.03, g1=0.03, g2=-0.02), (0.08, 0.03)),  # a quad
        (dict(theta_E=0.9, e1=-0.1, e2=0.2, cx=-0.1, cy=0.05, g1=-0.04, g2=0.01), (0.25, -0.2)),  # a double
        (dict(theta_E=1.5, e1=0.3, e2=0.1), (0.0, 0.05)),
    ],
)
def test_images_match_lenstronomy_solver(kw, beta):
    from lenstronomy.LensModel.lens_model import LensModel
    from lenstronomy.LensModel.Solver.lens_equation_solver import LensEquationSolver

    p = lens(**kw)
    ours = pos.solve_images(p, beta, 101, 0.05, EAGER).numpy()
    lm = LensModel(["SIE", "SHEAR"])
    kwargs = [
        dict(theta_E=kw["theta_E"], e1=kw.get("e1", 0), e2=kw.get("e2", 0), center_x=kw.get("cx", 0),
             center_y=kw.get("cy", 0)),
        dict(gamma1=kw.get("g1", 0), gamma2=kw.get("g2", 0), ra_0=0, dec_0=0),
    ]  # fmt: skip
    xs, ys = LensEquationSolver(lm).image_position_from_source(*beta, kwargs, min_distance=0.01, search_window=5)
    theirs = np.stack([xs, ys], 1)
    assert len(ours) == len(theirs) >= 2
    for q in theirs:  # every lenstronomy image has one of ours within 1e-4"
        assert np.min(np.linalg.norm(ours - q, axis=1)) < 1e-4
    assert float(pos.max_separation(p, torch.from_numpy(ours), EAGER)) < 1e-5


def test_separation_of_the_sis_images_under_another_einstein_radius():
    # SIS theta_E = 1, source at beta on the x axis: images at 1 + beta and -(1 - beta); traced
    # with theta_E' they land at 1 + beta - theta_E' and beta - 1 + theta_E', 2 |1 - theta_E'| apart
    beta = 0.1
    xy = pos.solve_images(lens(), (beta, 0.0), 81, 0.05, EAGER)
    assert sorted(xy[:, 0].tolist()) == pytest.approx([-(1 - beta), 1 + beta], abs=1e-9)
    for te in (0.8, 0.95, 1.1):
        assert float(pos.max_separation(lens(theta_E=te), xy, EAGER)) == pytest.approx(2 * abs(1 - te), abs=1e-9)


def test_penalty_is_zero_inside_and_a_steep_smooth_wall_outside():
    xy = pos.solve_images(lens(), (0.1, 0.0), 81, 0.05, EAGER)
    pen = pos.PositionsPenalty(xy, 0.2, EAGER)
    assert float(pen(lens(theta_E=0.95))) == 0.0  # 0.1" apart
    te = torch.tensor(0.85, dtype=torch.float64, requires_grad=True)  # 0.3" apart: 0.1 over
    value = pen({**lens(), "theta_E": te})
    assert float(value.detach()) == pytest.approx(0.5 * (0.1 / 0.002) ** 2, rel=1e-6)
    value.backward()
    assert float(te.grad) < 0  # pushes theta_E back up towards the images' common source
    assert float(pos.PositionsPenalty(xy[:1], 0.2, EAGER)(lens(theta_E=0.5))) == 0.0  # one image: no constraint


def test_penalty_from_the_start_floors_its_threshold():
    p = lens(theta_E=1.2, e1=0.15, e2=-0.05, g1=0.03)
    pen = pos.penalty_from(p, [(1.25, 0.1)], 101, 0.05, EAGER)
    assert len(pen.xy) >= 2 and pen.threshold == 0.2  # exact images: 3 x ~0 < the floor
    assert float(pen(p)) == 0.0
    assert pos.penalty_from(p, [(1.25, 0.1)], 101, 0.05, EAGER, floor=0.05).threshold == 0.05
    # a point far outside the ring is imaged once: the next one of the list is taken
    far = pos.penalty_from(p, [(2.4, 0.0), (1.25, 0.1)], 101, 0.05, EAGER)
    assert len(far.xy) == len(pen.xy)
    assert len(pos.penalty_from(p, [(2.4, 0.0)], 101, 0.05, EAGER).xy) < 2


def test_config(tmp_path):
    base = [f"input={tmp_path}", "lens_light=true", "source_pixels=20"]
    assert fit_settings(resolve_search(compose_config("fit", base)), 3).positions_floor == 0.2
    off = fit_settings(resolve_search(compose_config("fit", base + ["positions_threshold=null"])), 3)
    assert off.positions_floor is None
    with pytest.raises(ConfigError, match="positions_threshold"):
        check_config(resolve_search(compose_config("fit", base + ["positions_threshold=-1"])))
