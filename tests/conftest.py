"""Shared test fixtures: CPU only, one torch thread per worker, shared data located or skipped."""

from __future__ import annotations

import os

import pytest
import torch

from lensexp.paths import SHARED_DATA

os.environ.setdefault("WANDB_MODE", "disabled")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

COSMOS_CATALOG = SHARED_DATA / "cosmos_sample" / "real_galaxy_catalog_23.5.fits"
EMP_PSF = SHARED_DATA / "hst_psf" / "emp_psf_f814w.fits"


@pytest.fixture
def cosmos_catalog():
    if not COSMOS_CATALOG.is_file():
        pytest.skip(f"COSMOS sample not found at {COSMOS_CATALOG} (../shared/data is absent)")
    return COSMOS_CATALOG


@pytest.fixture
def emp_psf():
    if not EMP_PSF.is_file():
        pytest.skip(f"empirical HST PSFs not found at {EMP_PSF} (../shared/data is absent)")
    return EMP_PSF


def train_tiny_checkpoint(run_dir):
    """Train the one-epoch CPU test model (``tests.test_train.FAST``) into ``run_dir``; its last.ckpt."""
    from lensexp.config import compose_config
    from lensexp.train import run
    from tests.test_train import FAST

    run(compose_config("train", [*FAST, "trainer.max_epochs=1"]), run_dir)
    return run_dir / "checkpoints" / "last.ckpt"
