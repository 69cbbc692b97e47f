"""Sweep files compose as the W&B agent runs them; a 2-job multirun compares without gaps."""

from __future__ import annotations

import csv
import itertools
import os
import subprocess
import sys

import pytest
import yaml

from lensexp.compare import columns, run
from lensexp.config import compose_config
from lensexp.errors import ConfigError
from lensexp.paths import PROJECT_ROOT
from tests.test_train import FAST

SWEEPS = sorted((PROJECT_ROOT / "sweeps").glob("*.yaml"))


def agent_args(spec: dict) -> list[list[str]]:
    """Expand a sweep's parameters the way `wandb agent` fills ${args_no_hyphens}: key=value."""
    grid = []
    for key, p in spec["parameters"].items():
        if "values" in p:
            grid.append([(key, v) for v in p["values"]])
        elif "value" in p:
            grid.append([(key, p["value"])])
        else:  # distributions: try both ends
            grid.append([(key, p["min"]), (key, p["max"])])
    return [[f"{k}={v}" for k, v in combo] for combo in itertools.product(*grid)]


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_commands_compose(path):
    spec = yaml.safe_load(path.read_text())
    assert spec["command"][-1] == "${args_no_hyphens}" and "lensexp.train" in spec["command"]
    assert spec["metric"]["goal"] in ("minimize", "maximize")
    for args in agent_args(spec):
        cfg = compose_config("train", args)
        assert cfg.model.backbone and cfg.loss._target_
    assert SWEEPS and any("coverage" in yaml.safe_load(p.read_text())["metric"]["name"] for p in SWEEPS)


@pytest.mark.slow
def test_two_job_multirun_and_comparison(tmp_path):
    sweep_dir = tmp_path / "multirun"
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "lensexp.train",
        "-m",
        *FAST,
        "trainer.max_epochs=1",
        "model.dropout=0.05,0.2",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    r = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "cmp"
    rows = run(compose_config("compare", [f"runs={sweep_dir}", f"out={out}"]))
    assert len(rows) == 2 and {r["dropout"] for r in rows} == {0.05, 0.2}
    assert len({r["run"] for r in rows}) == 2  # output dirs never collide
    table = list(csv.DictReader(open(out / "comparison.csv")))
    assert len(table) == 2 and list(table[0]) == columns()
    for row in table:
        empty = [k for k, v in row.items() if v in ("", None)]
        assert not empty, empty
    md = (out / "comparison.md").read_text().splitlines()
    assert len(md) == 4
    html = (out / "comparison.html").read_text()
    for png in ("accuracy_vs_speed.png", "coverage_vs_dropout.png"):
        assert (out / png).is_file() and png in html


def test_compare_without_runs_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no training runs"):
        run(compose_config("compare", [f"runs={tmp_path}", f"out={tmp_path / 'o'}"]))


def test_compare_shows_density_map_metrics(tmp_path):
    """A density-map run (task=kappa) gets its kappa_mae and coverage columns; they appear only
    when such a run is among the rows."""
    from omegaconf import OmegaConf

    run_dir = tmp_path / "runs" / "kappa"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / "csv").mkdir()
    OmegaConf.save(compose_config("train", ["experiment=kappa_quickstart"]), run_dir / ".hydra" / "config.yaml")
    (run_dir / "csv" / "metrics.csv").write_text(
        "epoch,model/params,val/kappa_mae,val/kappa_cov68,val/kappa_cov95,val/theta_E_frac\n0,1000,0.07,0.7,0.94,0.06\n"
    )
    out = tmp_path / "cmp"
    run(compose_config("compare", [f"runs={tmp_path / 'runs'}", f"out={out}"]))
    table = list(csv.DictReader(open(out / "comparison.csv")))
    assert list(table[0]) == columns(kappa=True)
    assert float(table[0]["kappa_mae"]) == 0.07 and float(table[0]["kappa_cov95"]) == 0.94
