"""Reading training batches from shards: lensexp's tar reader against webdataset's, side by side.

The same resampled, shuffled training stream (``lensexp.data.shard_dataset``: webdataset's
``ResampledShards`` and ``shuffle`` stages, ``decode_sample``) read with
``webdataset.tarfile_to_samples`` (the standard library's ``tarfile``) and with
``lensexp.shard_reader.tar_samples``, on one core, alternating ``--repeats`` times; prints ms per
batch of ``--batch`` samples (the fastest run of each) and the ratio, after checking that both
give the same samples.

    python benchmarks/shard_reading.py --root shards/tiny_broad --json benchmarks/results/shard_reading.json

Without ``--root`` a small ``tiny`` set is simulated into a temporary folder first.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from common import machine_info

from lensexp.data import decode_sample, shard_dataset, shard_urls


def reference_stream(urls, shuffle: int, n: int, seed: int):
    """The training stream on webdataset's own tarfile reader (lensexp's reader before 2026-12-07)."""
    import webdataset as wds

    shards = wds.ResampledShards(urls, seed=seed, deterministic=True)
    shards.epoch = -1
    stages = [shards, wds.tarfile_to_samples(), wds.shuffle(shuffle, seed=seed), wds.map(decode_sample)]
    return wds.DataPipeline(*stages).with_epoch(n)


def ms_per_batch(make, batch: int) -> float:
    t0 = time.perf_counter()
    count = sum(1 for _ in make())
    return (time.perf_counter() - t0) / count * batch * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", help="a shard set (default: simulate a small tiny set first)")
    ap.add_argument("--n", type=int, default=4096, help="samples per timed run")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--shuffle", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tmp = None
    root = args.root
    if root is None:
        from lensexp.config import compose_config
        from lensexp.simulate import run as simulate

        tmp = tempfile.TemporaryDirectory()
        root = tmp.name
        simulate(compose_config("simulate", ["data=tiny", "n=2048", "seed=0", "workers=1", f"out={root}"]))
    urls = shard_urls(root, "train")
    ref = list(reference_stream(urls, args.shuffle, 512, 0))
    new = list(shard_dataset(urls, args.shuffle, True, 512, 0))
    same = [a["__key__"] for a in ref] == [b["__key__"] for b in new] and all(
        torch.equal(a["image"], b["image"]) for a, b in zip(ref, new)
    )
    if not same:
        raise SystemExit("the two readers gave different samples")
    runs = {"webdataset (tarfile)": [], "lensexp.shard_reader": []}
    for _ in range(args.repeats):
        runs["webdataset (tarfile)"].append(
            ms_per_batch(lambda: reference_stream(urls, args.shuffle, args.n, 0), args.batch)
        )
        runs["lensexp.shard_reader"].append(
            ms_per_batch(lambda: shard_dataset(urls, args.shuffle, True, args.n, 0), args.batch)
        )
    best = {k: min(v) for k, v in runs.items()}
    ratio = best["webdataset (tarfile)"] / best["lensexp.shard_reader"]
    for k, v in best.items():
        print(f"{k:24s} {v:6.2f} ms per batch of {args.batch} (runs: {', '.join(f'{x:.2f}' for x in runs[k])})")
    print(f"ratio {ratio:.2f}x (same samples in the same order: {same})")
    res = {"machine": machine_info(), "root": str(args.root), "n": args.n, "batch": args.batch, "ms_per_batch": runs}
    res |= {"ratio": ratio, "same_samples": same}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
