"""A shard set on disk: its plan, resume records, manifests and verification.

``OUT/<split>/shard-NNNNNN.tar`` for the splits train/val/test, each split with its own
``manifest.json``, and ``OUT/manifest.json`` (written last). Shard ``k`` of a split has its own
seed (:func:`shard_seed`); a finished shard has a sidecar ``.json`` record with its sha256, which
:func:`finished_record` checks when a killed run is resumed. ``OUT/simulate.json`` holds the
fingerprint of the configuration; another configuration in the same OUT is refused.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lensexp.errors import ConfigError
from lensexp.files import write_text_atomic
from lensexp.shards import merge_label_stats
from lensexp.sim.priors import LABELS

SPLITS = ("train", "val", "test")
FINGERPRINT = "simulate.json"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ShardSpec:
    """One shard: ``split``, index ``k`` within it, global ``gid``, sample ``count``, RNG ``seed``."""

    split: str
    k: int
    gid: int
    count: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.split}/shard-{self.k:06d}.tar"


def shard_seed(seed: int, split: str, k: int) -> int:
    """Independent RNG seed of shard ``k`` of ``split`` (``numpy.random.SeedSequence``)."""
    ss = np.random.SeedSequence(entropy=int(seed), spawn_key=(SPLITS.index(split), int(k)))
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def split_counts(n: int, splits) -> dict[str, int]:
    """Sample counts per split from fractions (summing to 1) or integer counts (summing to n)."""
    if n < 1:
        raise ConfigError(f"n must be a positive number of images, got {n}")
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise ConfigError(f"unknown split(s) {sorted(unknown)}; splits are {list(SPLITS)}")
    vals = {s: float(splits.get(s, 0)) for s in SPLITS}
    if any(v < 0 for v in vals.values()):
        raise ConfigError(f"split sizes must be >= 0, got {dict(vals)}")
    total = sum(vals.values())
    if all(float(v).is_integer() and v >= 1 for v in vals.values() if v) and total == n and total > 1:
        return {s: int(v) for s, v in vals.items()}
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        raise ConfigError(f"splits must be fractions summing to 1 or counts summing to n={n}; got {dict(vals)}")
    counts = {s: int(math.floor(n * v)) for s, v in vals.items()}
    counts["train"] += n - sum(counts.values())  # rounding remainder goes to train
    return counts


def plan_shards(n: int, splits, shard_size: int, seed: int) -> list[ShardSpec]:
    """Every shard of the set, train first; the last shard of a split holds the remainder."""
    if shard_size < 1:
        raise ConfigError(f"shard_size must be >= 1, got {shard_size}")
    specs, gid = [], 0
    for split, count in split_counts(n, splits).items():
        for k in range(math.ceil(count / shard_size)):
            c = min(shard_size, count - k * shard_size)
            specs.append(ShardSpec(split, k, gid, c, shard_seed(seed, split, k)))
            gid += 1
    return specs


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing a finished shard to disk now, in the background
    (``POSIX_FADV_DONTNEED`` on Linux: asynchronous writeback, then the written pages leave the
    cache), so the final :func:`make_durable` fsync has little left to wait for."""
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


def make_durable(out: Path, specs: list[ShardSpec]) -> None:
    """fsync the shards ``specs``, their sidecars and the split folders (once per run, before any
    manifest). Delayed write errors surface here: the run's shards are then removed, not left
    looking finished."""
    files = [p for s in specs for p in (out / s.name, out / (s.name + ".json"))]
    try:
        for path in files:
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        for split in sorted({s.split for s in specs}):
            fd = os.open(out / split, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    except OSError as exc:
        for path in files:
            path.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise ConfigError(f"disk full while writing shards to {out}: free space or choose another out=") from exc
        raise


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True))


def prepare_out(out: Path, fp: dict, overwrite: bool, identity=lambda d: d) -> None:
    """Create/check OUT: writable, and empty or holding a set made with the same fingerprint
    (compared through ``identity``, which drops what does not shape the bytes)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"output directory '{out}' is not writable: {exc.strerror or exc}") from exc
    old = out / FINGERPRINT
    shards = any(out.glob("*/shard-*.tar"))
    existing = shards or (old.exists() and (out / MANIFEST).exists())
    if old.exists() and not existing:  # a record without shards (a run that failed early) blocks nothing
        old.unlink()
    if existing:
        same = old.exists() and identity(json.loads(old.read_text())) == identity(fp)
        if not same and not overwrite:
            raise ConfigError(
                f"'{out}' holds shards from a different configuration (see {old.name}); "
                "use another out= or overwrite=true to replace them"
            )
        if not same:
            for split in SPLITS:
                shutil.rmtree(out / split, ignore_errors=True)
            for f in (out / MANIFEST, old):
                f.unlink(missing_ok=True)
    for stale in out.glob("*/.shard-*.tmp-*"):  # left by a killed run
        stale.unlink(missing_ok=True)
    write_json_atomic(old, fp)


def finished_record(out: Path, spec: ShardSpec, rehash: bool = True) -> dict | None:
    """The record of a complete shard, or None when it must be (re)written: missing, its sidecar
    missing or inconsistent, or (``rehash``) its bytes no longer matching the recorded sha256,
    e.g. after a crash before the data reached the disk. Regenerating is deterministic."""
    final = out / spec.name
    side = final.with_name(final.name + ".json")
    if not (final.exists() and side.exists()):
        return None
    try:
        rec = json.loads(side.read_text())
    except ValueError:
        return None
    if rec.get("count") != spec.count or rec.get("bytes") != final.stat().st_size:
        return None
    if rehash and sha256_file(final) != rec.get("sha256"):
        return None
    return rec


def write_manifests(out: Path, specs: list[ShardSpec], records: dict[str, dict], fp: dict) -> dict:
    """Per-split manifests, then ``OUT/manifest.json`` last."""
    import galsim
    import torch
    import webdataset

    from lensexp import __version__

    versions = {
        "lensexp": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "galsim": galsim.__version__,
        "webdataset": getattr(webdataset, "__version__", "?"),
        "python": sys.version.split()[0],
    }
    clean = [{k: records[s.name][k] for k in ("name", "count", "sha256", "bytes")} for s in specs]
    splits = {}
    for split in SPLITS:
        sub = [s for s in specs if s.split == split]
        if not sub:
            continue
        recs = [records[s.name] for s in sub]
        man = {
            "split": split,
            "count": sum(s.count for s in sub),
            "shards": [
                {
                    "name": Path(r["name"]).name,
                    "count": r["count"],
                    "sha256": r["sha256"],
                    "bytes": r["bytes"],
                    "seed": r["seed"],
                }
                for r in recs
            ],
            "labels": merge_label_stats(recs),
            "seed": fp["seed"],
            "versions": versions,
        }
        write_json_atomic(out / split / MANIFEST, man)
        splits[split] = {"count": man["count"], "shards": len(sub), "manifest": f"{split}/{MANIFEST}"}
    manifest = {
        "count": sum(s.count for s in specs),
        "shards": clean,
        "splits": splits,
        "labels": merge_label_stats(list(records.values())),
        "label_names": list(LABELS),
        "config": fp,
        "seed": fp["seed"],
        "versions": versions,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


def verify_set(out: Path) -> list[str]:
    """Problems found comparing ``OUT/manifest.json`` with the files (empty list: all good)."""
    import tarfile

    man_path = out / MANIFEST
    if not man_path.exists():
        return [f"no {MANIFEST} in '{out}' (the set is incomplete or was never written)"]
    man = json.loads(man_path.read_text())
    problems = []
    listed = set()
    for rec in man["shards"]:
        f = out / rec["name"]
        listed.add(f.resolve())
        if not f.exists():
            problems.append(f"missing shard {rec['name']}")
            continue
        if sha256_file(f) != rec["sha256"]:
            problems.append(f"sha256 mismatch for {rec['name']}")
        with tarfile.open(f) as tf:
            n = sum(1 for m in tf.getmembers() if m.name.endswith(".image.npy"))
        if n != rec["count"]:
            problems.append(f"{rec['name']} holds {n} samples, manifest says {rec['count']}")
    extra = [p for p in out.glob("*/shard-*.tar") if p.resolve() not in listed]
    problems += [f"shard not in manifest: {p.relative_to(out)}" for p in extra]
    if sum(r["count"] for r in man["shards"]) != man["count"]:
        problems.append("manifest count differs from the sum of its shard counts")
    return problems


def parse_range(r, total: int) -> range:
    """``"a:b"`` (global shard ids a..b-1) or None (all)."""
    if r is None or r == "":
        return range(total)
    try:
        a, b = (int(x) if x != "" else None for x in str(r).split(":"))
    except ValueError:
        raise ConfigError(f"shard_range must look like 'a:b', got '{r}'") from None
    a, b = a or 0, total if b is None else min(b, total)
    if not 0 <= a < b:
        raise ConfigError(f"shard_range '{r}' selects no shard of the {total} in this set")
    return range(a, b)
