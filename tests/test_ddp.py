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
