"""Sharded simulator: ``python -m lensexp.simulate`` turns a data preset into WebDataset shards.

    python -m lensexp.simulate data=tiny n=2000 workers=2 seed=1 out=shards/tiny
    python -m lensexp.simulate data=hst n=500000 workers=8 seed=0 out=shards/hst
    python -m lensexp.simulate out=shards/tiny verify=true          # check files against manifest
    python -m lensexp.simulate data=tiny n=200 seed=1 format=fits out=DIR   # FITS + truth.csv

Layout (:mod:`lensexp.shard_set`): ``OUT/<split>/shard-NNNNNN.tar`` for the splits
train/val/test, each split with its own ``manifest.json``, and ``OUT/manifest.json`` (written
last) listing every shard (``{name, count, sha256, bytes}``, names relative to OUT) with the
total ``count``, the config, seeds, library versions and label ranges/means.

Shard ``k`` of a split is a pure function of (data config, seed, split, k, shard_size,
batch_size): the same command gives byte-identical shards whatever ``workers`` is. A shard is
written under a temporary name and renamed when complete, then a sidecar ``.json`` records its
hash; killing the job and rerunning the same command completes the set without redoing finished
shards. A different config in a non-empty OUT is refused unless ``overwrite=true``.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from lensexp.errors import ConfigError
from lensexp.files import temp_path
from lensexp.runtime import allocator_env, resolve_compile
from lensexp.shard_set import (
    MANIFEST,
    ShardSpec,
    finished_record,
    make_durable,
    parse_range,
    plan_shards,
    prepare_out,
    start_writeback,
    verify_set,
    write_json_atomic,
    write_manifests,
)
from lensexp.shards import LabelStats, TarShardWriter, json_rows, npy_bytes
from lensexp.sim.mass import COMPONENT_KEYS, drawn_family
from lensexp.sim.priors import LABELS
from lensexp.sim.psf import EE_KEYS
from lensexp.sim.render import effective_batch_size

WRITE_CHUNK = 256  # tar members joined per write
# what a sample holds, beyond the config: sets written in an older format are not resumed (nor
# reused by make quickstart) but made again. 2: meta psf_ee_* (the PSF's encircled energy, 2026-12-06)
SAMPLE_FORMAT = 2
# per-image extras stored beside the labels (meta.json)
META_KEYS = (
    "psf_fwhm",
    "psf_index",
    "is_cosmos",
    "gal_index",
    "src_mag",
    "src_x",
    "src_y",
    "exposure_time",
    "sky",
    "read_noise",
    *EE_KEYS,  # the PSF's encircled energy within EE_RADII arcsec (networks with model.psf_input read it)
)

# the further mass components of density-map presets (data.mass.kind other than sie)
MASS_META_KEYS = tuple(k for keys in COMPONENT_KEYS.values() for k in keys)


# ---------------------------------------------------------------------------- samples
def shard_batch(sim, spec: ShardSpec, batch_size: int, keep_noise_map: bool = False) -> dict:
    """Simulate one shard: numpy ``images`` [n, C, N, N], ``labels`` [n, 8] (float32), per-image
    ``meta`` lists (``META_KEYS``), when kept ``noise_var`` [n, C, N, N] and, for presets with
    ``data.mass.kappa_map``, ``kappa`` [n, N, N] (convergence at the pixel centres)."""
    return numpy_batch(sim.sample(spec.count, seed=spec.seed, batch_size=batch_size, keep_noise_map=keep_noise_map))


def shard_batches(sim, spec: ShardSpec, batch_size: int, keep_noise_map: bool = False):
    """:func:`shard_batch` in the simulator's batches, in order (no copy of the whole shard)."""
    for b in sim.batches(spec.count, seed=spec.seed, batch_size=batch_size, keep_noise_map=keep_noise_map):
        yield numpy_batch(b)


def numpy_batch(b) -> dict:
    """A :class:`lensexp.sim.render.SimBatch` as the numpy dict of :func:`shard_batch`."""
    out = {
        "images": b.images.cpu().numpy(),
        "labels": b.labels.cpu().numpy(),
        "meta": {k: _as_list(b.meta[k]) for k in (*META_KEYS, *MASS_META_KEYS) if k in b.meta},
    }
    if "noise_var" in b.meta:
        out["noise_var"] = b.meta["noise_var"].cpu().numpy()
    if "kappa" in b.meta:
        out["kappa"] = b.meta["kappa"].cpu().numpy()
    return out


def batch_samples(spec: ShardSpec, batch: dict):
    """The samples of a :func:`shard_batch` as dicts (``__key__``, arrays, label and meta dicts)."""
    labels = batch["labels"].astype(np.float64).tolist()  # float32 values as Python floats
    meta, noise, kappa = batch["meta"], batch.get("noise_var"), batch.get("kappa")
    for i in range(spec.count):
        s = {
            "__key__": f"{spec.split}-{spec.k:06d}-{i:06d}",
            "image": batch["images"][i],
            "params": dict(zip(LABELS, labels[i])),
            "meta": {k: v[i] for k, v in meta.items()},
        }
        if noise is not None:
            s["noise_var"] = noise[i]
        if kappa is not None:
            s["kappa"] = kappa[i]
        yield s


def encode_batch(spec: ShardSpec, batch: dict, start: int = 0):
    """The WebDataset entries of a :func:`shard_batch` (or of its part from sample ``start`` on),
    as :func:`lensexp.shards.encode_sample` makes them from :func:`batch_samples` (same bytes),
    the JSON of the whole batch at once."""
    labels = batch["labels"].astype(np.float64)
    count = len(labels)
    params = json_rows({k: labels[:, j].tolist() for j, k in enumerate(LABELS)})
    meta = json_rows(batch["meta"]) if batch["meta"] else [b"{}"] * count
    noise, kappa = batch.get("noise_var"), batch.get("kappa")
    for i in range(count):
        e = {
            "__key__": f"{spec.split}-{spec.k:06d}-{start + i:06d}",
            "image.npy": npy_bytes(batch["images"][i]),
            "params.json": params[i],
            "meta.json": meta[i],
        }
        if noise is not None:
            e["noise_var.npy"] = npy_bytes(noise[i])
        if kappa is not None:
            e["kappa.npy"] = npy_bytes(kappa[i])
        yield e


def shard_samples(sim, spec: ShardSpec, batch_size: int, keep_noise_map: bool = False):
    """Yield the samples of one shard as dicts; :func:`shard_batch` is the simulation behind both
    these (the on-the-fly dataset) and the written shards (:func:`encode_batch`)."""
    yield from batch_samples(spec, shard_batch(sim, spec, batch_size, keep_noise_map))


def _as_list(t) -> list:
    """Per-image meta tensor -> Python bools, ints or floats (float32 values kept exactly)."""
    t = t.detach().cpu()
    return (t.double() if t.is_floating_point() else t).tolist()


# ---------------------------------------------------------------------------- writing
def write_shard(sim, spec: ShardSpec, out: Path, batch_size: int, keep_noise_map: bool) -> dict:
    """Write one shard (temporary name, then rename) and its sidecar; return its record.

    The data are made durable once for the whole set (:func:`make_durable`) before the manifest
    is written, not shard by shard; a resumed run re-hashes finished shards
    (:func:`finished_record`), so a shard damaged by a crash is rewritten.
    """
    final = out / spec.name
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(final)
    stats = LabelStats(LABELS)
    try:
        with open(tmp, "wb", buffering=1 << 20) as fh:
            tw = TarShardWriter(fh)
            names, datas, start = [], [], 0
            # batch by batch as simulated: no shard-sized copy (page faults cost ~1 ms/img at hst size)
            for batch in shard_batches(sim, spec, batch_size, keep_noise_map):
                stats.add(batch["labels"])
                for s in encode_batch(spec, batch, start):
                    key = s.pop("__key__")
                    names += [f"{key}.{ext}" for ext in s]
                    datas += s.values()
                    if len(datas) >= WRITE_CHUNK:  # bounded memory for large images
                        tw.add_many(names, datas)
                        names, datas = [], []
                start += len(batch["labels"])
            tw.add_many(names, datas)
            sha, nbytes = tw.close()
            fh.flush()
            start_writeback(fh.fileno())
        record = {
            "name": spec.name,
            "count": spec.count,
            "sha256": sha,
            "bytes": nbytes,
            "seed": spec.seed,
            "labels": stats.to_dict(),
        }
        os.replace(tmp, final)
        write_json_atomic(final.with_name(final.name + ".json"), record)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise ConfigError(f"disk full while writing {final}: free space or choose another out=") from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return record


# ---------------------------------------------------------------------------- identity
def use_compile(cfg: DictConfig) -> bool:
    """The run's ``compile`` setting resolved (``auto``: :func:`lensexp.runtime.resolve_compile`);
    compiled and eager kernels round differently, so the resolved value is part of the data."""
    return resolve_compile(cfg.compile, int(cfg.n), int(cfg.data.npix), int(cfg.data.supersample), str(cfg.device))


def fingerprint(cfg: DictConfig) -> dict:
    """Everything that determines the bytes of the set (not workers, progress, shard_range)."""
    return {
        "sample_format": SAMPLE_FORMAT,
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "n": int(cfg.n),
        "splits": OmegaConf.to_container(cfg.splits, resolve=True),
        "shard_size": int(cfg.shard_size),
        # the batch really drawn (large images cap it): sets made before the cap are not resumed
        "batch_size": effective_batch_size(cfg.batch_size, cfg.data.npix, cfg.data.supersample),
        "seed": int(cfg.seed),
        "device": str(cfg.device).split(":")[0],
        "compile": use_compile(cfg),
        "keep_noise_map": bool(cfg.keep_noise_map),
    }


def set_identity(fp: dict) -> dict:
    """A :func:`fingerprint` as sets are compared: ``data.mass`` without the ranges of families the
    set does not draw (:func:`lensexp.sim.mass.drawn_family`), so a preset that gains a family, or
    whose other families' ranges change, still finds and resumes its earlier sets."""
    data = fp.get("data") or {}
    return {**fp, "data": {**data, "mass": drawn_family(data["mass"])}} if isinstance(data.get("mass"), dict) else fp


# ---------------------------------------------------------------------------- workers
_SIM = None


def _init_worker(data_cfg: dict, device: str, compile: bool) -> None:
    global _SIM
    import torch

    from lensexp.sim.render import Simulator

    torch.set_num_threads(1)
    _SIM = Simulator(OmegaConf.create(data_cfg), device=device, compile=compile)


def _work(args):
    spec, out, batch_size, keep_noise_map = args
    return write_shard(_SIM, spec, Path(out), batch_size, keep_noise_map)


def run(cfg: DictConfig) -> dict | None:
    """Simulate (or verify) the shard set described by ``cfg``; returns the manifest when complete."""
    out = Path(cfg.out)
    if cfg.verify:
        problems = verify_set(out)
        for p in problems:
            print(f"problem: {p}", file=sys.stderr)
        if problems:
            raise ConfigError(f"verification of '{out}' failed: {len(problems)} problem(s)")
        man = json.loads((out / MANIFEST).read_text())
        print(f"ok: {out} holds {man['count']} samples in {len(man['shards'])} shards, all hashes match")
        return man
    fmt = str(cfg.format)
    if fmt == "fits":
        return write_fits_set(cfg)
    if fmt != "webdataset":
        raise ConfigError(f"format must be webdataset or fits, got '{fmt}'")
    workers = int(cfg.workers)
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    from lensexp.sim.schema import validate_config

    validate_config(cfg.data)  # before anything is written: a bad setting leaves no record behind
    specs = plan_shards(int(cfg.n), cfg.splits, int(cfg.shard_size), int(cfg.seed))
    fp = fingerprint(cfg)
    prepare_out(out, fp, bool(cfg.overwrite), set_identity)
    chosen = [specs[i] for i in parse_range(cfg.get("shard_range"), len(specs))]
    mine = {s.name for s in chosen}  # re-hashed; shards of other ranges are checked by size
    records = {s.name: r for s in specs if (r := finished_record(out, s, s.name in mine)) is not None}
    todo = [s for s in chosen if s.name not in records]
    n_todo = sum(s.count for s in todo)
    print(
        f"lensexp.simulate: {len(specs)} shards ({sum(s.count for s in specs)} images) in {out}; "
        f"{len(chosen) - len(todo)} of the {len(chosen)} selected already done, {len(todo)} to write",
        flush=True,
    )
    if todo:
        records.update(_write_all(todo, cfg, out, workers, n_todo, fp["compile"]))
        make_durable(out, todo)
    if all(s.name in records for s in specs):
        man = write_manifests(out, specs, records, fp)
        print(f"wrote {out / MANIFEST}: {man['count']} samples in {len(specs)} shards")
        return man
    missing = sum(s.name not in records for s in specs)
    print(
        f"{missing} shard(s) of this set are still missing (other shard ranges); "
        "rerun without shard_range to finish and write the manifest"
    )
    return None


def _write_all(todo: list[ShardSpec], cfg: DictConfig, out: Path, workers: int, n_images: int, compile: bool) -> dict:
    from tqdm import tqdm

    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    args = [(s, str(out), int(cfg.batch_size), bool(cfg.keep_noise_map)) for s in todo]
    bar = tqdm(total=n_images, unit="img", disable=not cfg.progress, dynamic_ncols=True, smoothing=0.1)
    t0, done, nbytes, records = time.perf_counter(), 0, 0, {}

    def tick(rec):
        nonlocal done, nbytes
        records[rec["name"]] = rec
        done += rec["count"]
        nbytes += rec["bytes"]
        dt = max(time.perf_counter() - t0, 1e-9)
        bar.update(rec["count"])
        bar.set_postfix_str(f"{done / dt:.0f} img/s, {nbytes / dt / 1e6:.1f} MB/s")

    try:
        if workers == 1:
            _init_worker(data_cfg, str(cfg.device), compile)
            for a in args:
                tick(_work(a))
        else:
            import multiprocessing as mp

            os.environ.update(allocator_env())
            ctx = mp.get_context("spawn")
            with ctx.Pool(workers, initializer=_init_worker, initargs=(data_cfg, str(cfg.device), compile)) as pool:
                for rec in pool.imap_unordered(_work, args):
                    tick(rec)
                pool.close()
                pool.join()
    finally:
        bar.close()
    dt = time.perf_counter() - t0
    print(
        f"wrote {done} images in {dt:.1f} s: {done / max(dt, 1e-9):.0f} img/s, {nbytes / max(dt, 1e-9) / 1e6:.1f} MB/s",
        flush=True,
    )
    return records


# ---------------------------------------------------------------------------- FITS
def write_fits_set(cfg: DictConfig) -> dict:
    """One FITS per lens and ``truth.csv`` (written last).

    Header: ``PIXSCALE`` [arcsec/px], ``BANDS``; for e-/s images also the noise model
    (``EXPTIME`` [s], ``SKYLEV`` [e-/s/px, subtracted], ``RDNOISE`` [e-], ``GAIN`` [e-/ADU]).
    Extension ``PSF``: the image's PSF kernel (unit sum, image pixels), as real data products
    ship a PSF model; ``lensexp.fit`` reads both. Presets with kappa maps add an extension
    ``KAPPA`` (the true convergence at the pixel centres), which readers of the image ignore.
    """
    from astropy.io import fits
    from tqdm import tqdm

    from lensexp.sim.render import Simulator

    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"output directory '{out}' is not writable: {exc.strerror or exc}") from exc
    n = int(cfg.n)
    if n < 1:
        raise ConfigError(f"n must be a positive number of images, got {n}")
    sim = Simulator(cfg.data, device=str(cfg.device), compile=use_compile(cfg))
    b = sim.sample(n, seed=int(cfg.seed), batch_size=int(cfg.batch_size))
    bands = ",".join(str(x.name) for x in cfg.data.bands)
    norm = str(cfg.data.instrument.normalize)
    raw_units = norm == "none"
    rows = []
    for i in tqdm(range(n), unit="img", disable=not cfg.progress):
        name = f"lens_{i:06d}.fits"
        img = b.images[i].numpy()
        hdu = fits.PrimaryHDU(img[0] if img.shape[0] == 1 else img)
        hdu.header["PIXSCALE"] = (float(cfg.data.pixscale), "arcsec / pixel")
        hdu.header["BANDS"] = (bands, "band order of the cube")
        hdu.header["SEED"] = (int(cfg.seed), "lensexp.simulate seed")
        if raw_units:
            hdu.header["BUNIT"] = ("electron/s", "sky-subtracted")
            hdu.header["EXPTIME"] = (float(b.meta["exposure_time"][i]), "s")
            hdu.header["SKYLEV"] = (float(b.meta["sky"][i]), "subtracted sky, electron/s/pixel")
            hdu.header["RDNOISE"] = (float(b.meta["read_noise"][i]), "electron rms")
            hdu.header["GAIN"] = (float(cfg.data.instrument.gain), "electron/ADU")
        else:
            hdu.header["BUNIT"] = ("normalised", f"data.instrument.normalize={norm}")
        psf = fits.ImageHDU(sim.psf.kernels[int(b.meta["psf_index"][i])].numpy(), name="PSF")
        psf.header["FWHM"] = (float(b.meta["psf_fwhm"][i]), "arcsec")
        hdus = [hdu, psf]
        if "kappa" in b.meta:
            hdus.append(fits.ImageHDU(b.meta["kappa"][i].numpy(), name="KAPPA"))
            hdus[-1].header["PIXSCALE"] = (float(cfg.data.pixscale), "arcsec / pixel")
        tmp = temp_path(out / name)
        fits.HDUList(hdus).writeto(tmp, overwrite=True)
        os.replace(tmp, out / name)
        rows.append({"name": name, **{k: float(b.labels[i, j]) for j, k in enumerate(LABELS)}})
    tmp = temp_path(out / "truth.csv")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["name", *LABELS])
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, out / "truth.csv")
    print(f"wrote {n} FITS files and truth.csv to {out}")
    return {"count": n, "files": [r["name"] for r in rows]}


if __name__ == "__main__":
    import hydra

    from lensexp.cli import clean_errors

    hydra.main(config_path="../conf", config_name="simulate", version_base="1.3")(clean_errors(run))()
