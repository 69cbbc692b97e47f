"""Validation metrics under DDP are those of the whole split: two CPU processes (gloo) give the
same RMSE and coverage as one process on the same lenses."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from lensexp.config import compose_config
from lensexp.data import LensDataModule
from lensexp.build import lens_module
from lensexp.simulate import run as simulate


def _validate(module, dm, devices: int) -> dict:
    kw = dict(strategy="ddp_spawn") if devices > 1 else {}
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, logger=False, enable_progress_bar=False, enable_model_summary=False, **kw
    )
    return trainer.validate(module, datamodule=dm, verbose=False)[0]


@pytest.mark.slow
def test_two_process_ddp_validation_equals_one_process(tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    over = ["data=tiny", "data.source.kind=sersic", "n=48", "splits={train:16,val:32,test:0}", "shard_size=16"]
    cfg = compose_config("simulate", [*over, f"out={tmp_path}", "progress=false"])
    simulate(cfg)
    torch.manual_seed(0)
    module = lens_module({"backbone": "test_resnet", "dropout": 0.1, "head_hidden": 16}, "gaussian_nll", n_mc_val=1)
    dm = LensDataModule(cfg.data, source="shards", root=str(tmp_path), batch_size=8)
    one = _validate(module, dm, 1)
    two = _validate(module, dm, 2)  # each rank reads one of the two val shards
    keys = [k for k in one if "/rmse/" in k or "/cov" in k]
    assert len(keys) >= 8 * 4
    for k in keys:
        assert two[k] == pytest.approx(one[k], abs=1e-6), k
    # a rank on its own would see half the lenses: its coverage is quantised in 1/16, not 1/32
    assert any(round(one[k] * 32) % 2 for k in keys if "/cov" in k)


DDP_BUDGET_SCRIPT = '''
import json, sys
import pytorch_lightning as pl
import torch
from lensexp.build import lens_module
from lensexp.callbacks import TimeBudget
from lensexp.config import compose_config
from lensexp.data import LensDataModule


class SkewedBudget(TimeBudget):
    """Rank 1 believes it has ten times the budget: alone it would plan far more epochs."""

    def _fix(self, trainer, pl_module, revise=False):
        if trainer.global_rank == 1 and not revise:
            self.budget *= 10
        super()._fix(trainer, pl_module, revise)

    def on_train_end(self, trainer, pl_module):
        out = {"step": int(trainer.global_step), "plan": self.plan}
        open(f"{sys.argv[1]}/rank{trainer.global_rank}.json", "w").write(json.dumps(out))


if __name__ == "__main__":
    cfg = compose_config("simulate", ["data=tiny", "data.source.kind=sersic"])
    torch.manual_seed(0)
    module = lens_module({"backbone": "test_resnet", "dropout": 0.1, "head_hidden": 16}, "gaussian_nll", n_mc_val=1)
    dm = LensDataModule(cfg.data, source="shards", root=sys.argv[1], batch_size=8)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=200, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        callbacks=[SkewedBudget(4.0)],
    )
    trainer.fit(module, datamodule=dm)
'''


@pytest.mark.slow
def test_time_budget_plan_is_rank_zeros_on_every_rank(tmp_path):
    """Under DDP every rank must stop on the same step: the plan fixed from rank 0's clock is
    broadcast, even when another rank would have planned otherwise (without it, the ranks'
    collectives would wait on each other until the subprocess is timed out)."""
    import json
    import subprocess
    import sys

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    over = ["data=tiny", "data.source.kind=sersic", "n=64", "splits={train:32,val:32,test:0}", "shard_size=16"]
    simulate(compose_config("simulate", [*over, f"out={tmp_path}", "progress=false"]))
    script = tmp_path / "ddp_budget.py"
    script.write_text(DDP_BUDGET_SCRIPT)
    subprocess.run([sys.executable, str(script), str(tmp_path)], check=True, timeout=240, capture_output=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["plan"] == r1["plan"] and r0["plan"]["budget_s"] == 4.0
    assert r0["step"] == r1["step"] == r0["plan"]["total"] < 200 * r0["plan"]["total"] / r0["plan"]["epochs"]
