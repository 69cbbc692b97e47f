"""Real SLACS lenses end to end: the fit and (given a checkpoint) the network against Bolton et al.

Runs, in this process, on the lens folders of ``--data`` (default ``../shared/data/slacs_dev``):
``lensexp.fit input=DATA pixscale=0.05 lens_light=true`` (the contract command), optionally
``lensexp.predict ckpt=CKPT input=DATA pixscale=0.05 n_mc=32``, then ``lensexp.compare_real``
with the peer code's values (``peer_tinylensgpu.csv``): fraction within 5 % / 10 % of the
published theta_E, median |fractional error|, failures over 20 %, seconds per lens, and the
Hezaveh et al. 2017 Fig. 1 figure. Wall time per lens is printed for each command.

    python benchmarks/real_lenses.py --ckpt outputs/runs/slacs_cpu/checkpoints/last.ckpt
    python benchmarks/real_lenses.py --fit-csv existing_fits.csv --ckpt CKPT   # reuse a fit
    python benchmarks/real_lenses.py --preds-csv existing_preds.csv            # reuse a network's predictions
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from common import ensure_allocator_env, machine_info

from lensexp.compare_real import run as compare_real
from lensexp.config import compose_config
from lensexp.fit import run as fit
from lensexp.inputs import list_inputs
from lensexp.paths import SHARED_DATA
from lensexp.predict import run as predict


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(SHARED_DATA / "slacs_dev"))
    ap.add_argument("--ckpt", default=None, help="network checkpoint (e.g. from experiment=slacs_cpu)")
    ap.add_argument("--fit-csv", default=None, help="reuse this fit table instead of fitting")
    ap.add_argument("--preds-csv", default=None, help="reuse this network prediction table instead of --ckpt")
    ap.add_argument("--out", default="benchmarks/results/real_lenses")
    ap.add_argument("--fit-over", nargs="*", default=[], help="extra fit overrides")
    args = ap.parse_args(argv)
    data = Path(args.data)
    if not data.is_dir():
        print(f"error: no lens folders at {data} (../shared/data absent?)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n = len(list_inputs(data))
    timing = {}
    methods = {}
    fit_csv = out / "fits.csv"
    if args.fit_csv:
        if Path(args.fit_csv).resolve() != fit_csv.resolve():  # reusing the table already in place is fine
            shutil.copyfile(args.fit_csv, fit_csv)
        timing["fit_reused"] = str(args.fit_csv)  # its seconds per lens are the table's own, from its machine
    else:
        t0 = time.perf_counter()
        fit(
            compose_config(
                "fit",
                [
                    f"input={data}",
                    f"out={fit_csv}",
                    "pixscale=0.05",
                    "lens_light=true",
                    "resume=false",
                    "progress=true",
                    *args.fit_over,
                ],
            )
        )
        timing["fit_wall_s_per_lens"] = (time.perf_counter() - t0) / n
        print(f"fit: {timing['fit_wall_s_per_lens']:.1f} s per lens (wall)", flush=True)
    methods["fit"] = str(fit_csv)
    if args.preds_csv:
        preds = out / "preds.csv"
        if Path(args.preds_csv).resolve() != preds.resolve():
            shutil.copyfile(args.preds_csv, preds)
        methods["cnn"] = str(preds)
    elif args.ckpt:
        t0 = time.perf_counter()
        predict(
            compose_config(
                "predict",
                [
                    f"ckpt={args.ckpt}",
                    f"input={data}",
                    f"out={out / 'preds.csv'}",
                    "pixscale=0.05",
                    "n_mc=32",
                    "progress=false",
                ],
            )
        )
        timing["cnn_wall_s_per_lens"] = (time.perf_counter() - t0) / n
        print(f"network: {timing['cnn_wall_s_per_lens']:.2f} s per lens (wall, model loading included)", flush=True)
        methods["cnn"] = str(out / "preds.csv")
    rows = compare_real(
        compose_config(
            "compare_real",
            [
                f"published={data / 'published.csv'}",
                f"peer={data / 'peer_tinylensgpu.csv'}",
                "peer_name=TinyLensGpu",
                f"methods={{{', '.join(f'{k}: {v}' for k, v in methods.items())}}}",
                f"out={out}",
            ],
        )
    )
    (out / "real_lenses.json").write_text(json.dumps({"rows": rows, **timing, **machine_info()}, indent=2))
    print((out / "real_comparison.md").read_text())
    return 0


if __name__ == "__main__":
    ensure_allocator_env()
    sys.exit(main())
