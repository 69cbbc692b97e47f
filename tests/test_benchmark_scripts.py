"""The benchmark scripts run end to end at a tiny size (their figures come from full-size runs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lensexp.paths import PROJECT_ROOT

pytest.importorskip("lenstronomy")
SCRIPT = PROJECT_ROOT / "benchmarks" / "shard_throughput.py"


def _run(tmp_path, *settings):
    out = tmp_path / "rows.json"
    cmd = [sys.executable, str(SCRIPT), "--settings", *settings, "--eager", "--scale", "0.05", "--json", str(out)]
    subprocess.run(cmd, check=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    return json.loads(out.read_text())


def test_shard_throughput_reads_a_marginal_rate_against_lenstronomy(tmp_path):
    (row,) = _run(tmp_path, "matched")
    assert row["setting"] == "matched" and row["n"] == [100, 500] and row["compile"] is False
    assert row["img_s"] > 0 and row["lenstronomy_img_s_1core"] > 0
    assert row["ratio"] == pytest.approx(row["img_s"] / row["lenstronomy_img_s_1core"])


def test_shard_throughput_measures_each_setting_in_its_own_process(tmp_path):
    rows = _run(tmp_path, "matched", "matched")
    assert [r["setting"] for r in rows] == ["matched", "matched"] and all(r["img_s"] > 0 for r in rows)


@pytest.mark.slow
def test_light_starts_compares_settings_on_a_real_lens(tmp_path):
    """benchmarks/light_starts.py: every setting's light fit of each lens folder, and a summary
    whose best setting per lens is at the best optimum found."""
    from lensexp.paths import SHARED_DATA

    slacs = SHARED_DATA / "slacs_dev"
    if not slacs.is_dir():
        pytest.skip(f"SLACS development sample not found at {slacs} (../shared/data is absent)")
    d = tmp_path / "one"
    d.mkdir()
    (d / "J1204+0358").symlink_to(slacs / "J1204+0358", target_is_directory=True)
    out = tmp_path / "light.json"
    script = PROJECT_ROOT / "benchmarks" / "light_starts.py"
    cmd = [sys.executable, str(script), "--data", str(d), "--settings", "1:0", "2:5", "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=tmp_path, timeout=600)
    res = json.loads(out.read_text())
    (row,) = res["rows"]
    chi = [row[s]["chi2"] for s in ("1:0", "2:5")]
    assert row["name"] == "J1204+0358" and all(0 < c < 1e6 for c in chi)
    best = res["summary"]["1:0" if chi[0] <= chi[1] else "2:5"]
    assert best["lenses_at_best_within_1"] == 1 and best["summed_excess_chi2"] == 0
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run([*cmd[:5], "3-40"], check=True, cwd=tmp_path, timeout=60, capture_output=True)


def test_psf_routes_agree_and_name_the_fastest(tmp_path):
    """benchmarks/psf_routes.py: the three routes give the same image to float rounding on a preset
    of Gaussian kernels, and the row names the fastest and the route PSFBank takes."""
    out = tmp_path / "routes.json"
    script = PROJECT_ROOT / "benchmarks" / "psf_routes.py"
    cmd = [sys.executable, str(script), "--presets", "tiny", "--repeats", "1", "--json", str(out)]
    subprocess.run(cmd, check=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    (row,) = json.loads(out.read_text())
    assert (row["preset"], row["npix"], row["kernel_px"]) == ("tiny", 64, 11)
    assert row["rank1_excess"] < 1e-6  # pixel-integrated Gaussians are separable
    assert row["direct_rel_diff"] < 1e-5 and row["separable_rel_diff"] < 1e-5
    times = {r: row[f"{r}_us"] for r in ("direct", "separable", "fft")}
    assert all(t > 0 for t in times.values()) and row["fastest"] == min(times, key=times.get)
    from lensexp.sim.psf import DIRECT_MAX

    assert row["lensexp_route"] == ("direct" if 11 <= DIRECT_MAX else "fft") and row["lensexp_over_fastest"] >= 1.0


def test_shard_reading_compares_the_two_readers_on_the_same_samples(tmp_path):
    out = tmp_path / "reading.json"
    cmd = [sys.executable, str(PROJECT_ROOT / "benchmarks" / "shard_reading.py"), "--n", "256", "--repeats", "1"]
    subprocess.run([*cmd, "--json", str(out)], check=True, cwd=tmp_path, timeout=600)
    res = json.loads(out.read_text())
    assert set(res["ms_per_batch"]) == {"webdataset (tarfile)", "lensexp.shard_reader"}
    assert all(len(v) == 1 and v[0] > 0 for v in res["ms_per_batch"].values()) and res["ratio"] > 0
