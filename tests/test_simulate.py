"""Sharded simulator: determinism across workers, resume after a kill, refusal, read-back, verify."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lensexp.config import compose_config
from lensexp.data import OnTheFlyDataset, shard_dataset, shard_urls
from lensexp.errors import ConfigError
from lensexp.paths import PROJECT_ROOT
from lensexp.sim.render import Simulator
from lensexp.shard_set import plan_shards, split_counts, verify_set
from lensexp.simulate import run

# Sérsic sources keep these tests independent of ../shared/data
BASE = ["data=tiny", "data.source.kind=sersic", "progress=false", "batch_size=32"]


def cfg_for(out, *over):
    return compose_config("simulate", [*BASE, f"out={out}", *over])


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("*/shard-*.tar"))}


def test_split_and_shard_plan():
    assert split_counts(1000, {"train": 0.8, "val": 0.1, "test": 0.1}) == {"train": 800, "val": 100, "test": 100}
    assert split_counts(7, {"train": 0.5, "val": 0.25, "test": 0.25}) == {"train": 5, "val": 1, "test": 1}
    assert split_counts(10, {"train": 6, "val": 2, "test": 2}) == {"train": 6, "val": 2, "test": 2}
    specs = plan_shards(250, {"train": 0.8, "val": 0.2, "test": 0}, 64, seed=3)
    assert [(s.split, s.count) for s in specs] == [
        ("train", 64),
        ("train", 64),
        ("train", 64),
        ("train", 8),
        ("val", 50),
    ]
    assert len({s.seed for s in specs}) == len(specs)
    assert [s.seed for s in plan_shards(250, {"train": 0.8, "val": 0.2, "test": 0}, 64, seed=3)] == [
        s.seed for s in specs
    ]
    with pytest.raises(ConfigError, match="summing to 1"):
        split_counts(10, {"train": 0.5, "val": 0.1, "test": 0.1})
    with pytest.raises(ConfigError, match="unknown split"):
        split_counts(10, {"train": 0.5, "dev": 0.5})
    with pytest.raises(ConfigError, match="positive"):
        split_counts(0, {"train": 1.0})


def test_workers_do_not_change_bytes_and_manifest_contract(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    man = run(cfg_for(a, "n=160", "shard_size=40", "workers=1", "seed=4"))
    run(cfg_for(b, "n=160", "shard_size=40", "workers=2", "seed=4"))
    ba, bb = shard_bytes(a), shard_bytes(b)
    assert ba.keys() == bb.keys() and len(ba) == 6  # train 128 = 40+40+40+8, val 16, test 16
    assert all(ba[k] == bb[k] for k in ba)
    # contract: OUT/manifest.json with count and shards [{name, count, sha256}]
    m = json.loads((a / "manifest.json").read_text())
    assert m["count"] == 160 == sum(s["count"] for s in m["shards"])
    assert {"name", "count", "sha256"} <= set(m["shards"][0])
    assert set(m["labels"]) == set(m["label_names"]) and m["labels"]["theta_E"]["min"] >= 0.3
    assert m == man
    for split in ("train", "val", "test"):
        sm = json.loads((a / split / "manifest.json").read_text())
        assert sm["count"] == m["splits"][split]["count"]
    assert verify_set(a) == []


def test_read_back_gives_exact_arrays_and_labels(tmp_path):
    cfg = cfg_for(tmp_path, "n=50", "shard_size=20", "seed=2", "splits={train:0.8,val:0.2,test:0}")
    run(cfg)
    samples = list(shard_dataset(shard_urls(tmp_path, "train")))
    assert len(samples) == 40
    sim = Simulator(cfg.data)
    specs = [s for s in plan_shards(50, cfg.splits, 20, 2) if s.split == "train"]
    direct = [sim.sample(s.count, seed=s.seed, batch_size=32) for s in specs]
    images = torch.cat([d.images for d in direct])
    labels = torch.cat([d.labels for d in direct])
    got_images = torch.stack([s["image"] for s in samples])
    got_labels = torch.stack([s["labels"] for s in samples])
    assert got_images.dtype == torch.float32 and got_images.shape == (40, 1, 64, 64)
    assert torch.equal(got_images, images)
    assert torch.equal(got_labels, labels)
    assert samples[0]["params"]["mu_F"] == pytest.approx(float(labels[0, 7]))
    assert "psf_fwhm" in samples[0]["meta"]
    # the on-the-fly stream runs the same code: identical samples
    otf = OnTheFlyDataset(cfg.data, seed=2, split="train", shard_size=20, batch_size=32, epoch_size=40)
    stream = list(otf)
    assert len(stream) == 40 and all(torch.equal(x["image"], y["image"]) for x, y in zip(stream, samples))


def test_refuses_other_config_unless_overwrite(tmp_path):
    run(cfg_for(tmp_path, "n=40", "shard_size=20", "seed=1"))
    with pytest.raises(ConfigError, match="different configuration"):
        run(cfg_for(tmp_path, "n=40", "shard_size=20", "seed=2"))
    with pytest.raises(ConfigError, match="different configuration"):
        run(cfg_for(tmp_path, "n=40", "shard_size=20", "seed=1", "data.psf.fwhm=[0.12,0.2]"))
    man = run(cfg_for(tmp_path, "n=40", "shard_size=20", "seed=2", "overwrite=true"))
    assert man["seed"] == 2 and verify_set(tmp_path) == []
    # the same command again finds everything done
    again = run(cfg_for(tmp_path, "n=40", "shard_size=20", "seed=2"))
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in man["shards"]]


def test_a_set_is_found_again_when_only_families_it_does_not_draw_change(tmp_path):
    """A kappa set made before its preset gained a mass family (or with other ranges for a family it
    does not draw) is the same data: found complete. A change to the drawn family's ranges is not."""
    from lensexp.shard_set import FINGERPRINT

    over = ["data=kappa", *BASE[1:], f"out={tmp_path}", "n=40", "shard_size=20", "seed=1", "data.mass.kind=sie_subhalo"]
    man = run(compose_config("simulate", over))
    fp_path = tmp_path / FINGERPRINT
    old = json.loads(fp_path.read_text())
    del old["data"]["mass"]["blobs"]  # as written before sie_blobs existed
    old["data"]["mass"]["pair"]["separation"] = [0.5, 1.0]
    fp_path.write_text(json.dumps(old))
    again = run(compose_config("simulate", [*over, "data.mass.epl.gamma_offset=[0.3,0.4]"]))
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in man["shards"]]
    with pytest.raises(ConfigError, match="different configuration"):
        run(compose_config("simulate", [*over, "data.mass.subhalo.radius=[0.9,1.1]"]))


def test_a_set_in_an_older_sample_format_is_made_again(tmp_path):
    """A set written before the samples described their PSF (no ``sample_format`` in its
    fingerprint) is neither resumed nor reused: refused, or rewritten with ``overwrite=true``."""
    import io

    from lensexp.shard_set import FINGERPRINT
    from lensexp.sim.psf import EE_KEYS

    run(cfg_for(tmp_path, "n=40", "shard_size=20", "seed=1"))
    fp_path = tmp_path / FINGERPRINT
    old = json.loads(fp_path.read_text())
    assert old.pop("sample_format") >= 2
    fp_path.write_text(json.dumps(old))
    with pytest.raises(ConfigError, match="different configuration"):
        run(cfg_for(tmp_path, "n=40", "shard_size=20", "seed=1"))
    man = run(cfg_for(tmp_path, "n=40", "shard_size=20", "seed=1", "overwrite=true"))
    assert json.loads(fp_path.read_text())["sample_format"] >= 2 and man["count"] == 40
    with tarfile.open(sorted(tmp_path.glob("train/shard-*.tar"))[0]) as tf:
        meta = next(m for m in tf.getmembers() if m.name.endswith("meta.json"))
        assert set(EE_KEYS) <= set(json.load(io.BytesIO(tf.extractfile(meta).read())))


def test_verify_detects_damage(tmp_path):
    run(cfg_for(tmp_path, "n=40", "shard_size=20", "seed=1"))
    f = sorted(tmp_path.glob("train/shard-*.tar"))[0]
    data = bytearray(f.read_bytes())
    data[2000] ^= 0xFF
    f.write_bytes(bytes(data))
    (tmp_path / "train" / "shard-000099.tar").write_bytes(b"")
    problems = verify_set(tmp_path)
    assert any("sha256 mismatch" in p for p in problems)
    assert any("not in manifest" in p for p in problems)
    with pytest.raises(ConfigError, match="verification"):
        run(cfg_for(tmp_path, "verify=true"))


def test_shard_ranges_fill_a_set_then_manifest(tmp_path):
    assert run(cfg_for(tmp_path, "n=60", "shard_size=20", "shard_range=0:2")) is None
    assert not (tmp_path / "manifest.json").exists()
    man = run(cfg_for(tmp_path, "n=60", "shard_size=20", "shard_range=2:"))
    assert man is not None and man["count"] == 60 and verify_set(tmp_path) == []
    with pytest.raises(ConfigError, match="shard_range"):
        run(cfg_for(tmp_path / "x", "n=60", "shard_size=20", "shard_range=9:12"))


def test_unwritable_output(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="not writable"):
        run(cfg_for(blocker / "sub", "n=10"))


def test_fits_format(tmp_path):
    from astropy.io import fits

    run(cfg_for(tmp_path, "n=5", "format=fits", "seed=1"))
    files = sorted(tmp_path.glob("*.fits"))
    assert len(files) == 5
    truth = (tmp_path / "truth.csv").read_text().splitlines()
    assert truth[0] == "name,theta_E,e1,e2,center_x,center_y,gamma1,gamma2,mu_F" and len(truth) == 6
    with fits.open(files[0]) as h:
        assert h[0].header["PIXSCALE"] == pytest.approx(0.1)
        assert h[0].data.shape == (64, 64)
        assert h[0].header["EXPTIME"] == pytest.approx(1000.0) and h[0].header["GAIN"] == pytest.approx(2.5)
        assert h[0].header["RDNOISE"] == pytest.approx(4.0) and h[0].header["SKYLEV"] > 0
        assert h["PSF"].data.shape == (11, 11) and h["PSF"].data.sum() == pytest.approx(1.0, rel=1e-5)


@pytest.mark.slow
def test_resume_after_kill_is_complete_and_identical(tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "out"
    args = [*BASE, "n=600", "shard_size=25", "seed=7"]
    run(compose_config("simulate", [*args, f"out={ref}", "workers=2"]))
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    cmd = [sys.executable, "-m", "lensexp.simulate", *args, f"out={out}", "workers=1"]
    proc = subprocess.Popen(
        cmd, cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 120
    while len(list(out.glob("train/shard-*.tar"))) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    visible = list(out.glob("*/shard-*.tar"))
    assert 3 <= len(visible) < 24, "kill should land mid-way"
    assert not (out / "manifest.json").exists()
    refb = shard_bytes(ref)
    for p in visible:  # every visible shard is complete and final
        assert p.read_bytes() == refb[str(p.relative_to(out))]
        with tarfile.open(p) as tf:
            assert sum(m.name.endswith(".image.npy") for m in tf.getmembers()) == 25
    done = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "already done" in done.stdout
    assert shard_bytes(out) == refb
    assert not list(out.glob("*/.shard-*"))
    assert verify_set(out) == []
    m1, m2 = (json.loads((d / "manifest.json").read_text()) for d in (ref, out))
    assert m1["shards"] == m2["shards"]


def test_cli_reports_one_clear_error(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    r = subprocess.run(
        [sys.executable, "-m", "lensexp.simulate", *BASE, f"out={tmp_path}", "data.lens.theta_E=[2,1]"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: data.lens.theta_E is an empty range")
    r = subprocess.run(
        [sys.executable, "-m", "lensexp.simulate", "data=nope", f"out={tmp_path}"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0 and "nope" in r.stderr


def test_configs_compose(tmp_path):
    for preset in ("tiny", "hst", "euclid", "lsst"):
        cfg = compose_config("simulate", [f"data={preset}", f"out={tmp_path}"])
        assert cfg.data.name == preset and cfg.out == str(tmp_path)
    import yaml

    launcher = yaml.safe_load((PROJECT_ROOT / "conf/hydra/launcher/submitit_slurm.yaml").read_text())
    assert launcher["defaults"] == ["submitit_slurm"] and launcher["array_parallelism"] > 0
    assert np.isfinite(compose_config("simulate", []).n)


def test_disk_full_is_reported_and_leaves_no_partial_file(tmp_path, monkeypatch):
    import errno

    import lensexp.shard_set as shard_set

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    # a delayed write error surfaces at the final fsync: the run's shards go, no manifest
    monkeypatch.setattr(shard_set.os, "fsync", full)
    with pytest.raises(ConfigError, match="disk full"):
        run(cfg_for(tmp_path, "n=20", "shard_size=10"))
    assert not list(tmp_path.glob("*/shard-*")) and not list(tmp_path.glob("*/.shard-*"))
    assert not (tmp_path / "manifest.json").exists()


def test_disk_full_while_writing_a_shard_leaves_no_partial_file(tmp_path, monkeypatch):
    import errno

    from lensexp.shards import TarShardWriter

    calls = []

    def emit(self, data):  # the members of the first shard are written, its end blocks are not
        calls.append(len(data))
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(TarShardWriter, "_emit", emit)
    with pytest.raises(ConfigError, match="disk full"):
        run(cfg_for(tmp_path, "n=20", "shard_size=10"))
    assert len(calls) == 2 and calls[0] > 10 * 4096  # ten samples' members went out before the failure
    assert not list(tmp_path.glob("*/shard-*")) and not list(tmp_path.glob("*/.shard-*"))
    assert not (tmp_path / "manifest.json").exists()


def test_a_damaged_finished_shard_is_rewritten_on_resume(tmp_path):
    man = run(cfg_for(tmp_path, "n=20", "shard_size=10"))
    shard = tmp_path / man["shards"][0]["name"]
    good = shard.read_bytes()
    shard.write_bytes(bytes(len(good)))  # same size, lost data (a crash before writeback)
    again = run(cfg_for(tmp_path, "n=20", "shard_size=10"))
    assert shard.read_bytes() == good
    assert again["shards"] == man["shards"]
    assert verify_set(tmp_path) == []


def test_shard_bytes_are_plain_ustar_as_tarfile_writes_them():
    import io

    from lensexp.shards import TarShardWriter, encode_sample

    rng = np.random.default_rng(3)
    samples = [
        {
            "__key__": f"train-000000-{i:06d}",
            "image": rng.normal(size=(2, 9, 9)).astype(np.float32),
            "params": {"theta_E": 1.25 + i, "e1": -0.5},
            "meta": {"psf_index": i, "is_cosmos": bool(i % 2)},
        }
        for i in range(3)
    ]
    buf = io.BytesIO()
    w = TarShardWriter(buf)
    for s in samples:
        w.write(encode_sample(s))
    sha, n = w.close()
    data = buf.getvalue()
    assert n == len(data) and sha == hashlib.sha256(data).hexdigest()
    ref = io.BytesIO()  # the same members through the standard library, USTAR format
    with tarfile.open(fileobj=ref, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for s in samples:
            for ext, payload in encode_sample(s).items():
                if ext == "__key__":
                    continue
                ti = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                ti.size, ti.mode, ti.mtime, ti.uname, ti.gname = len(payload), 0o444, 0, "lensexp", "lensexp"
                tf.addfile(ti, io.BytesIO(payload))
    assert data == ref.getvalue()
    # the batched writer (numpy headers, one write) gives the same bytes, also for names and
    # sizes of other lengths (a 3 MB member: a size with more octal digits)
    entries = [encode_sample(s) for s in samples] + [{"__key__": "val-000001-000007", "x.bin": bytes(3_000_001)}]
    names = [f"{e['__key__']}.{k}" for e in entries for k in e if k != "__key__"]
    datas = [v for e in entries for k, v in e.items() if k != "__key__"]
    one, many = io.BytesIO(), io.BytesIO()
    w1, w2 = TarShardWriter(one), TarShardWriter(many)
    for nm, d in zip(names, datas):
        w1.add(nm, d)
    w2.add_many(names[:4], datas[:4])
    w2.add_many(names[4:], datas[4:])
    assert w1.close() == w2.close() and one.getvalue() == many.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:  # and it reads back to the same arrays
        got = np.load(io.BytesIO(tf.extractfile(f"{samples[1]['__key__']}.image.npy").read()))
        assert got.dtype == np.float32 and np.array_equal(got, samples[1]["image"])
        assert json.loads(tf.extractfile(f"{samples[2]['__key__']}.meta.json").read()) == samples[2]["meta"]


def test_shard_encoding_batched_equals_per_sample():
    from lensexp.shards import encode_sample
    from lensexp.shard_set import ShardSpec
    from lensexp.simulate import batch_samples, encode_batch, shard_batch

    sim = Simulator(compose_config("simulate", BASE).data)
    spec = ShardSpec("val", 2, 5, 7, 11)
    batch = shard_batch(sim, spec, 4, keep_noise_map=True)
    assert list(encode_batch(spec, batch)) == [encode_sample(s) for s in batch_samples(spec, batch)]


def test_compile_auto_follows_the_ray_count(monkeypatch):
    import shutil

    from lensexp.runtime import resolve_compile
    from lensexp.simulate import fingerprint, use_compile

    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/" + name)
    assert resolve_compile("auto", 2000, 64, 2) is False  # the contract command: eager
    assert resolve_compile("auto", 500_000, 192, 2) is True
    assert resolve_compile("auto", 2000, 192, 2) is True  # hst images are 9x the rays
    assert resolve_compile(False, 10**9, 192, 2) is False and resolve_compile("true", 1, 8, 1) is True
    with pytest.raises(ConfigError, match="compile must be true, false or auto"):
        resolve_compile("sometimes", 1, 8, 1)
    cfg = compose_config("simulate", [*BASE, "n=100000"])
    assert use_compile(cfg) and fingerprint(cfg)["compile"] is True  # the resolved value is recorded
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no C++ compiler: eager on CPU
    assert not use_compile(cfg)


def test_resampled_training_stream_is_deterministic_by_seed_and_resumes(tmp_path):
    """The training stream over shards draws its shards from (seed, epoch, rank, worker), not from
    the clock: the same seed gives the same samples, each epoch draws anew, a stream started at
    epoch 1 (a resumed run) is the second epoch of a fresh one, another seed differs."""
    run(cfg_for(tmp_path, "n=200", "shard_size=20", "seed=2", "splits={train:1.0,val:0,test:0}"))
    urls = shard_urls(tmp_path, "train")

    def epoch_keys(ds):
        return [s["__key__"] for s in ds]

    a = shard_dataset(urls, shuffle=30, resampled=True, epoch_size=60, seed=5)
    first, second = epoch_keys(a), epoch_keys(a)
    assert len(first) == 60 and first != second
    assert epoch_keys(shard_dataset(urls, shuffle=30, resampled=True, epoch_size=60, seed=5)) == first
    assert epoch_keys(shard_dataset(urls, 30, True, 60, seed=5, start_epoch=1)) == second
    assert epoch_keys(shard_dataset(urls, 30, True, 60, seed=6)) != first
