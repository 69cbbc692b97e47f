"""Real-lens comparison: fractions and coverage by hand, q from e1/e2, the figure and tables."""

from __future__ import annotations

import csv
import math

import pytest

from lensexp.compare_real import axis_ratio, run
from lensexp.config import compose_config
from lensexp.errors import ConfigError


def write(path, rows):
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def e_of_q(q, phi=0.3):
    e = (1 - q) / (1 + q)
    return e * math.cos(2 * phi), e * math.sin(2 * phi)


def test_axis_ratio_inverts_lenstronomy_ellipticity():
    from lenstronomy.Util.param_util import phi_q2_ellipticity

    e1, e2 = phi_q2_ellipticity(0.7, 0.62)
    assert axis_ratio(e1, e2) == pytest.approx(0.62, rel=1e-12)


def test_real_comparison_numbers_by_hand(tmp_path):
    pub = [{"name": f"L{i}", "theta_E": 1.0, "q": 0.8} for i in range(4)]
    write(tmp_path / "pub.csv", pub)
    # fractional errors 0.02, -0.07, 0.15, 0.30; the first two intervals hold the truth
    est = []
    for i, (f, half) in enumerate([(0.02, 0.03), (-0.07, 0.01), (0.15, 0.05), (0.30, 0.05)]):
        e1, e2 = e_of_q(0.7)
        est.append(
            {
                "name": f"L{i}",
                "theta_E": 1 + f,
                "e1": e1,
                "e2": e2,
                "seconds": 2.0,
                "theta_E_lo95": 1 + f - half,
                "theta_E_hi95": 1 + f + half,
            }
        )
    write(tmp_path / "m.csv", est)
    write(tmp_path / "peer.csv", [{"name": "L0", "theta_E_p16": 0.9, "theta_E_p50": 1.0, "theta_E_p84": 1.1}])
    rows = run(
        compose_config(
            "compare_real",
            [
                f"published={tmp_path / 'pub.csv'}",
                f"methods={{m: {tmp_path / 'm.csv'}}}",
                f"peer={tmp_path / 'peer.csv'}",
                f"out={tmp_path / 'out'}",
            ],
        )
    )
    m, peer = rows
    assert (m["n"], m["within5"], m["within10"], m["fail20"]) == (4, 0.25, 0.5, 0.25)
    assert m["median_abs_frac"] == pytest.approx((0.07 + 0.15) / 2)
    assert m["median_abs_q"] == pytest.approx(0.1)
    # L0: |0.02| <= hypot(0.03, 0.03); L1: 0.07 > hypot(0.01, 0.03); L2, L3 far out
    assert m["cover95"] == 0.25 and m["seconds_per_lens"] == 2.0
    assert (peer["method"], peer["n"], peer["within5"]) == ("peer", 1, 1.0)
    for f in (
        "real_comparison.csv",
        "real_comparison.md",
        "real_comparison.html",
        "real_lenses.csv",
        "real_vs_published.png",
    ):
        assert (tmp_path / "out" / f).stat().st_size > 0
    lens = list(csv.DictReader(open(tmp_path / "out" / "real_lenses.csv")))
    assert float(lens[3]["m/frac"]) == pytest.approx(0.30)


def test_no_common_lens_is_refused(tmp_path):
    write(tmp_path / "pub.csv", [{"name": "A", "theta_E": 1.0, "q": 0.8}])
    write(tmp_path / "m.csv", [{"name": "B", "theta_E": 1.0, "e1": 0, "e2": 0}])
    with pytest.raises(ConfigError, match="shares no lens names"):
        run(
            compose_config(
                "compare_real",
                [f"published={tmp_path / 'pub.csv'}", f"methods={{m: {tmp_path / 'm.csv'}}}", f"out={tmp_path / 'o'}"],
            )
        )


def test_fit_tables_get_an_unwarned_row(tmp_path):
    """A fit table with sh_theta_E0 and off_light: a second row for the lenses the fit does not warn
    about (theta_E moved by at most 5 % by the shapelet source, mass centre within 0.3" of the
    light's), and the shift per lens."""
    write(tmp_path / "pub.csv", [{"name": f"L{i}", "theta_E": 1.0, "q": 0.8} for i in range(5)])
    # (theta_E, theta_E before the shapelets, order kept, off_light): shifts 0 (not kept), +2 %, -20 %,
    # -4 %, 0 with the mass 0.5" off the light
    fits = [(1.01, 1.3, 0, 0.05), (1.02, 1.0, 6, 0.1), (0.8, 1.0, 6, 0.0), (0.96, 1.0, 6, 0.29), (1.3, 1.3, 6, 0.5)]
    write(
        tmp_path / "fit.csv",
        [
            {"name": f"L{i}", "theta_E": t, "e1": 0.0, "e2": 0.0, "sh_theta_E0": t0, "sh_n_max": n, "off_light": o}
            for i, (t, t0, n, o) in enumerate(fits)
        ],
    )
    overrides = [f"published={tmp_path / 'pub.csv'}", f"methods={{fit: {tmp_path / 'fit.csv'}}}", f"out={tmp_path}"]
    every, trusted = run(compose_config("compare_real", overrides))
    assert (every["method"], every["n"], every["within5"], every["fail20"]) == ("fit", 5, 0.6, 0.2)
    assert (trusted["method"], trusted["n"], trusted["within5"]) == ("fit (unwarned)", 3, 1.0)
    lens = {r["name"]: r for r in csv.DictReader(open(tmp_path / "real_lenses.csv"))}
    assert float(lens["L2"]["fit/source_shift"]) == pytest.approx(-0.2) and float(lens["L0"]["fit/source_shift"]) == 0
    assert float(lens["L4"]["fit/off_light"]) == 0.5
