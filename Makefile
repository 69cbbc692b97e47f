# Daily commands. `make quickstart` and `make test` work on a fresh machine (they create .venv).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export MALLOC_MMAP_THRESHOLD_ ?= 1073741824
export MALLOC_TRIM_THRESHOLD_ ?= 1073741824

.PHONY: venv quickstart kappa uncertainty test test-fast bench bench-fit gallery format clean

venv: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

quickstart: venv  # <= 15 min on 2 CPU cores: 100 000 fresh lenses, training, per-image calibration
	$(BIN)/python -m lensexp.simulate data=tiny_broad n=100000 'splits={train:96000,val:2000,test:2000}' workers=2 seed=1 out=shards/tiny_broad overwrite=true progress=false
	$(BIN)/python -m lensexp.simulate out=shards/tiny_broad verify=true
	$(BIN)/python -m lensexp.gallery presets=[tiny_broad] n=6 out=outputs/quickstart
	$(BIN)/python -m lensexp.train experiment=quickstart hydra.run.dir=outputs/runs/quickstart
	$(BIN)/python -m lensexp.calibrate ckpt=outputs/runs/quickstart/checkpoints/last.ckpt out=outputs/runs/quickstart/calibration n_mc=16

kappa: venv  # density maps: train (<= 15 min on 2 cores), bank, look-up test
	$(BIN)/python -m lensexp.train experiment=kappa_quickstart hydra.run.dir=outputs/runs/kappa_quickstart
	$(BIN)/python benchmarks/kappa_lookup.py --ckpt outputs/runs/kappa_quickstart/checkpoints/last.ckpt --out outputs/kappa_lookup

test: venv
	$(BIN)/python -m pytest -q

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow"

bench: venv
	$(BIN)/python benchmarks/sim_speed.py
	$(BIN)/python benchmarks/shard_throughput.py  # compiled by default (--eager for eager)

UQ := outputs/multirun/uncertainty
uncertainty: venv  # MC dropout, deep ensemble, flow at an equal budget on the quickstart shards, calibrated on 5 000 + 5 000 fresh lenses
	test -f shards/tiny_broad/manifest.json || $(BIN)/python -m lensexp.simulate data=tiny_broad n=100000 'splits={train:96000,val:2000,test:2000}' workers=2 seed=1 out=shards/tiny_broad overwrite=true progress=false
	$(BIN)/python -m lensexp.train -m experiment=uncertainty uq=mc_dropout,ensemble,flow hydra.sweep.dir=$(UQ) +trainer.enable_progress_bar=false
	$(BIN)/python -m lensexp.simulate data=tiny_broad n=10000 'splits={train:0,val:5000,test:5000}' workers=2 seed=7 out=shards/tiny_broad_eval overwrite=true progress=false
	for r in $(UQ)/0 $(UQ)/1 $(UQ)/2; do $(BIN)/python -m lensexp.calibrate ckpt=$$r out=$$r/calibration data_root=shards/tiny_broad_eval n_mc=16 n_samples=1024 progress=false wandb.mode=disabled || exit 1; done
	$(BIN)/python -m lensexp.compare runs=$(UQ) out=outputs/uncertainty

bench-fit: venv  # needs the quickstart checkpoint
	$(BIN)/python benchmarks/fit_vs_cnn.py --ckpt outputs/runs/quickstart/checkpoints/last.ckpt

gallery: venv
	$(BIN)/python -m lensexp.gallery out=outputs/gallery

format: venv
	$(BIN)/ruff format lensexp tests benchmarks
	$(BIN)/ruff check --fix lensexp tests benchmarks

clean:
	rm -rf outputs/gallery .pytest_cache
