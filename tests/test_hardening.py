"""What lensexp refuses: one test per failure found by probing predict, fit, simulate and train
as a careful user and as an adversary would (each failed on the code before the fix)."""

from __future__ import annotations

import csv
import copy
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from astropy.io import fits

from lensexp.config import compose_config
from lensexp.errors import ConfigError
from lensexp.paths import PROJECT_ROOT
from tests.conftest import train_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return train_tiny_checkpoint(tmp_path_factory.mktemp("run"))


def predict_cfg(ckpt, inp, out, *over):
    return compose_config(
        "predict", [f"ckpt={ckpt}", f"input={inp}", f"out={out}", "n_mc=2", "n_samples=64", "progress=false", *over]
    )


def fit_cfg(inp, out, *over):
    return compose_config(
        "fit",
        [
            f"input={inp}",
            f"out={out}",
            "progress=false",
            "n_starts=2",
            "adam.steps=20",
            "lbfgs.iters=5",
            "lbfgs.polish=1",
            "lbfgs.irls_rounds=1",
            *over,
        ],
    )


def rows(path):
    return list(csv.DictReader(open(path)))


def write(path, data, **header):
    h = fits.PrimaryHDU(data)
    for k, v in header.items():
        h.header[k] = v
    h.writeto(path)


def lens_image(npix=64, seed=0):
    """A ring on noise: something to measure."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:npix, :npix] - (npix - 1) / 2
    r = np.hypot(xx, yy)
    return (np.exp(-0.5 * ((r - 10) / 1.5) ** 2) + 0.05 * rng.normal(size=r.shape)).astype(np.float32)


# 1. a file without pixel scale is refused by predict (it was silently given the model's scale)
def test_predict_refuses_a_file_without_pixel_scale(ckpt, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    write(d / "a_noscale.fits", lens_image())
    write(d / "b_scale.fits", lens_image(), PIXSCALE=0.1)
    from lensexp.predict import run

    run(predict_cfg(ckpt, d, tmp_path / "p.csv"))
    assert [r["name"] for r in rows(tmp_path / "p.csv")] == ["b_scale.fits"]
    (err,) = rows(tmp_path / "p.errors.csv")
    assert err["name"] == "a_noscale.fits" and "no pixel scale" in err["error"] and "pixscale=" in err["error"]


# 2. 1x1 and all-zero images are refused; a run where nothing is usable exits non-zero
def test_tiny_and_constant_images_are_refused_and_all_rejected_exits_nonzero(ckpt, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    write(d / "one_pixel.fits", np.ones((1, 1), np.float32), PIXSCALE=0.1)
    write(d / "zeros.fits", np.zeros((64, 64), np.float32), PIXSCALE=0.1)
    out = tmp_path / "p.csv"
    from lensexp.predict import run

    with pytest.raises(ConfigError, match="no usable input: all 2 file"):
        run(predict_cfg(ckpt, d, out))
    assert not out.exists()
    errs = {r["name"]: r["error"] for r in rows(tmp_path / "p.errors.csv")}
    assert "1x1 px is too small" in errs["one_pixel.fits"]
    assert "constant image" in errs["zeros.fits"]
    # the command line: one line on stderr, exit status 2
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "lensexp.predict",
            f"ckpt={ckpt}",
            f"input={d}",
            f"out={out}",
            "n_mc=2",
            "progress=false",
        ],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        env=env,
    )
    assert p.returncode == 2 and "error: no usable input" in p.stderr and "Traceback" not in p.stderr


def test_fit_command_line_exits_2_with_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    cmd = [sys.executable, "-m", "lensexp.fit", f"input={tmp_path / 'nowhere'}", f"out={tmp_path / 'f.csv'}"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert p.returncode == 2 and p.stderr.strip().startswith("error: input not found"), p.stderr


# 3. an int16 image that crashed the fit is fitted; a bad file in the same folder does not end the run
def test_fit_int16_in_a_mixed_folder(tmp_path):
    from lensexp.fit import run
    from lensexp.simulate import run as simulate

    src = tmp_path / "sim"
    simulate(
        compose_config(
            "simulate",
            [
                "data=tiny",
                "data.source.kind=sersic",
                "data.instrument.normalize=none",
                "n=2",
                "seed=3",
                "format=fits",
                f"out={src}",
                "progress=false",
            ],
        )
    )
    d = tmp_path / "in"
    d.mkdir()
    with fits.open(src / "lens_000001.fits") as h:
        scaled = np.round(h[0].data.astype(np.float64) * 10)
        h[0].data = scaled.astype(np.int16)  # counts-like integers: the old amplitude solve was singular
        h.writeto(d / "a_int16.fits")
        h[0].data = scaled.astype(np.float32)
        h.writeto(d / "b_float.fits")
    (d / "c_broken.fits").write_bytes(b"SIMPLE  =                    T" + b" " * 50)
    out = tmp_path / "f.csv"
    res = run(fit_cfg(d, out))
    got = {r["name"]: r for r in rows(out)}
    assert set(got) == {"a_int16.fits", "b_float.fits"} and res["n"] == 2
    # integers are data: every pixel of the int16 file is in the likelihood (its zeros are not masks)
    r = got["a_int16.fits"]
    assert int(r["n_pix"]) + int(r["n_out"]) == 64 * 64 and np.isfinite(float(r["chi2_dof"]))
    (err,) = rows(tmp_path / "f.errors.csv")
    assert err["name"] == "c_broken.fits"


# 4. a huge image is refused before memory is spent, with a message naming npix=
def test_fit_size_guard_names_npix(tmp_path):
    from lensexp.fit.data import Loader
    from lensexp.inputs import LensFiles
    from lensexp.io import BadInput

    big = tmp_path / "big.fits"
    write(big, np.random.default_rng(0).normal(size=(600, 600)).astype(np.float32), PIXSCALE=0.05)
    cfg = fit_cfg(big, tmp_path / "f.csv", "psf_fwhm=0.1")
    with pytest.raises(BadInput, match="larger than max_npix=512: give npix=N"):
        Loader(cfg, None)(LensFiles("big.fits", big))
    item = Loader(cfg, 64)(LensFiles("big.fits", big))  # a centred cut-out is fine
    assert item["data"].shape == (64, 64)


# 5. an unwritable output fails within seconds, before any work
@pytest.mark.parametrize("tool", ["predict", "fit"])
def test_unwritable_out_fails_before_work(ckpt, tmp_path, tool):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = blocker / "preds.csv"  # a parent that is a file: cannot be created
    write(tmp_path / "l.fits", lens_image(), PIXSCALE=0.1)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="cannot write output"):
        if tool == "predict":
            from lensexp.predict import run

            run(predict_cfg(ckpt, tmp_path / "l.fits", out))
        else:
            from lensexp.fit import run

            run(fit_cfg(tmp_path / "l.fits", out))
    assert time.perf_counter() - t0 < 5
    with pytest.raises(ConfigError, match="is a folder"):
        from lensexp.predict import run

        run(predict_cfg(ckpt, tmp_path / "l.fits", tmp_path))


# 6. a simulate run refused for a bad setting leaves nothing that blocks the corrected rerun
def test_simulate_failed_then_fixed_rerun(tmp_path):
    from lensexp.simulate import run as simulate

    base = [
        "data=tiny",
        "data.source.kind=sersic",
        "n=8",
        "seed=1",
        "shard_size=8",
        f"out={tmp_path / 's'}",
        "progress=false",
        "workers=1",
    ]
    with pytest.raises(ConfigError, match="data.psf.fwhm"):
        simulate(compose_config("simulate", [*base, "data.psf.fwhm=[-0.1,0.2]"]))
    assert not (tmp_path / "s" / "simulate.json").exists()
    man = simulate(compose_config("simulate", base))
    assert man["count"] == 8


# 7. tracebacks where one line is due
def test_checkpoint_of_another_shape_is_one_line(ckpt, tmp_path):
    from lensexp.checkpoints import load_module

    ck = torch.load(ckpt, map_location="cpu", weights_only=True)
    ck["hyper_parameters"]["spec"]["model"]["head_hidden"] = 64  # the stored weights are for 128
    bad = tmp_path / "other_shape.ckpt"
    torch.save(ck, bad)
    with pytest.raises(ConfigError, match=r"weights do not fit the network its settings describe \(size mismatch"):
        load_module(bad)
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"empty file \(0 bytes\)"):
        load_module(empty)


def test_non_numeric_grid_is_one_line(tmp_path):
    from lensexp.simulate import run as simulate
    from lensexp.train import run as train
    from tests.test_train import FAST

    with pytest.raises(ConfigError, match="data.npix must be a number, got 'abc'"):
        simulate(compose_config("simulate", ["data=tiny", "data.npix=abc", "n=4", f"out={tmp_path / 's'}"]))
    with pytest.raises(ConfigError, match="data.npix must be a number, got 'abc'"):
        train(compose_config("train", [*FAST, "data.npix=abc"]), tmp_path / "run")


class _Planted:
    def __reduce__(self):
        return (os.system, ("echo planted > /dev/null",))


def test_code_running_checkpoint_on_training_resume_is_one_line(tmp_path):
    from lensexp.train import run as train
    from tests.test_train import FAST

    (tmp_path / "checkpoints").mkdir()
    torch.save({"state_dict": {}, "x": _Planted()}, tmp_path / "checkpoints" / "last.ckpt")
    with pytest.raises(ConfigError, match="would run code when loaded"):
        train(compose_config("train", [*FAST, "trainer.max_epochs=1"]), tmp_path)


# 8. checkpoint hyper-parameters are allow-listed before they reach timm
def test_planted_backbone_kwargs_refused(ckpt, tmp_path):
    from lensexp.checkpoints import load_module

    ck = torch.load(ckpt, map_location="cpu", weights_only=True)
    ck["hyper_parameters"]["spec"]["model"]["backbone_kwargs"] = {"checkpoint_path": str(tmp_path / "planted.pth")}
    bad = tmp_path / "planted.ckpt"
    torch.save(ck, bad)
    with pytest.raises(ConfigError, match=r"refused backbone_kwargs \['checkpoint_path'\]"):
        load_module(bad)
    ck["hyper_parameters"]["spec"]["model"]["backbone_kwargs"] = {}
    ck["hyper_parameters"]["evil"] = 1
    torch.save(ck, bad)
    with pytest.raises(ConfigError, match=r"refused hyper-parameter\(s\) \['evil'\]"):
        load_module(bad)


# 9. resume continues the W&B run; temporary files of killed runs are removed by the next run
def test_wandb_run_id_reused_on_resume(tmp_path):
    from lensexp.callbacks import WANDB_ID_FILE, build_loggers

    cfg = compose_config("train", ["logger=wandb", "logger.wandb.mode=offline"])
    first = [lg for lg in build_loggers(cfg, tmp_path) if type(lg).__name__ == "WandbLogger"][0]
    again = [lg for lg in build_loggers(cfg, tmp_path) if type(lg).__name__ == "WandbLogger"][0]
    rid = (tmp_path / WANDB_ID_FILE).read_text().strip()
    assert first._id == again._id == rid and len(rid) == 8
    other = tmp_path / "other"
    assert [lg for lg in build_loggers(cfg, other) if type(lg).__name__ == "WandbLogger"][0]._id != rid


def test_stale_temporary_files_removed(ckpt, tmp_path):
    from lensexp.predict import run

    write(tmp_path / "l.fits", lens_image(), PIXSCALE=0.1)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".p.csv.tmp-{dead.pid}"
    live = tmp_path / f".p.csv.tmp-{os.getppid()}"  # a running process's file is left alone
    stale.write_text("half")
    live.write_text("in progress")
    run(predict_cfg(ckpt, tmp_path / "l.fits", tmp_path / "p.csv"))
    assert not stale.exists() and live.exists() and (tmp_path / "p.csv").exists()


# thread pools follow the cores this process may use
def test_threads_follow_cpu_affinity():
    code = (
        "import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
        "os.environ.pop('OMP_NUM_THREADS', None); os.environ.pop('LENSEXP_THREADS', None); "
        "from lensexp.runtime import available_cores, set_threads; print(available_cores(), set_threads())"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LENSEXP_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT_ROOT, env=env)
    assert out.stdout.split() == ["1", "1"], out.stderr
    env["LENSEXP_THREADS"] = "0"
    bad = subprocess.run(
        [sys.executable, "-c", "from lensexp.runtime import thread_count; thread_count()"],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        env=env,
    )
    assert "LENSEXP_THREADS must be a positive integer" in bad.stderr


def test_planted_targets_are_refused(ckpt, tmp_path):
    """A checkpoint's ``_target_`` may only name a lensexp network or loss class."""
    from lensexp.checkpoints import load_module

    ck = torch.load(ckpt, map_location="cpu", weights_only=True)
    bad = tmp_path / "planted_target.ckpt"
    for where, target, msg in (
        ("model", "os.system", "refused network class 'os.system'"),
        ("model", "lensexp.files.write_text_atomic", "refused network class"),
        ("loss", "subprocess.run", "refused loss setting"),
    ):
        c = copy.deepcopy(ck)
        spec = c["hyper_parameters"]["spec"]
        spec[where] = {**spec[where], "_target_": target} if where == "model" else {"_target_": target}
        torch.save(c, bad)
        with pytest.raises(ConfigError, match=msg):
            load_module(bad)


def test_checkpoints_from_before_the_spec_layout_still_load(ckpt, tmp_path):
    """Checkpoints written before ``spec`` (flat hyper-parameters, a loss name, the label
    buffers at the top level) load into the same module and predict the same numbers."""
    from lensexp.checkpoints import load_module

    ck = torch.load(ckpt, map_location="cpu", weights_only=True)
    hp = dict(ck["hyper_parameters"])
    spec = hp.pop("spec")
    model = {k: v for k, v in spec["model"].items() if k != "_target_"}
    old_hp = {**hp, **spec, "model": model, "loss": "gaussian_nll"}
    old_sd = {k.removeprefix("scaler."): v for k, v in ck["state_dict"].items()}
    assert "label_mean" in old_sd and "scaler.label_mean" not in old_sd
    torch.save({"hyper_parameters": old_hp, "state_dict": old_sd}, tmp_path / "old.ckpt")
    new, old = load_module(ckpt), load_module(tmp_path / "old.ckpt")
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(old(x), new(x), rtol=0, atol=0)
    torch.testing.assert_close(old.from_net(torch.zeros(1, 8)), new.from_net(torch.zeros(1, 8)), rtol=0, atol=0)


def test_allocator_is_tuned_in_process_so_large_buffers_are_reused():
    """``tune_allocator`` (called by every entry point) makes glibc keep large freed buffers: 20
    allocations of 64 MB (above glibc's largest dynamic mmap threshold, 32 MB) then fault their
    pages in once, not 20 times (the fit's system time fell from 111 s to 1.4 s on a SLACS lens)."""
    code = (
        "import resource, sys, numpy as np\n"
        "from lensexp.runtime import tune_allocator\n"
        "ok = tune_allocator() if sys.argv[1] == '1' else True\n"
        "f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(20):\n"
        "    a = np.ones(8_000_000); del a\n"
        "print(ok, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    faults = {}
    for tuned in ("0", "1"):
        out = subprocess.run(
            [sys.executable, "-c", code, tuned], capture_output=True, text=True, cwd=PROJECT_ROOT, env=env
        )
        ok, n = out.stdout.split()
        assert ok == "True", out.stderr
        faults[tuned] = int(n)
    assert faults["1"] * 5 < faults["0"], faults
