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
