"""Network versus maximum-likelihood lens modelling: seconds per lens, the ratio, accuracy of each.

On one simulated FITS test set per case (``tiny`` grid, 64 px at 0.1"/px) runs, in this process:
``lensexp.predict`` (the CNN, ``n_mc`` MC-dropout passes), ``lensexp.fit init=prior`` (blind
multi-start), ``lensexp.fit init=cnn`` (started from the network's posterior) and
``lensexp.fit init=truth`` (started at the true mass: the reference optimum), then
``lensexp.compare_fit``. Cases: ``sersic`` (Sérsic sources, no artefacts: the fit's model is
exactly right, the classic method's best case) and ``realistic`` (the ``tiny`` training preset:
half real COSMOS galaxies, star-forming clumps, cosmic rays, hot pixels, masks).

Seconds per lens: the CNN's is the steady state of a loaded model on in-memory images (batches of
``--batch``), the fits' the mean of their ``seconds`` column (optimisation only); both also as
whole command wall time / lenses. Needs a trained checkpoint (``make quickstart`` writes one).

    python benchmarks/fit_vs_cnn.py --ckpt outputs/runs/quickstart/checkpoints/last.ckpt --n 24
    python benchmarks/fit_vs_cnn.py --render benchmarks/results/fit_vs_cnn.json   # tables again
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import ensure_allocator_env, machine_info

from lensexp.compare_fit import run as compare_fit
from lensexp.config import compose_config
from lensexp.fit import run as fit
from lensexp.io import read_fits, to_grid
from lensexp.inputs import list_inputs
from lensexp.predict import Predictor
from lensexp.predict import run as predict
from lensexp.simulate import run as simulate

CASES = {
    "sersic": [
        "data.source.kind=sersic",
        "data.source.clumps.n=[0,0]",
        "data.instrument.cosmic_rays.enabled=false",
        "data.instrument.hot_pixels.enabled=false",
        "data.instrument.masks.enabled=false",
    ],
    "realistic": [],
}
SHOWN = ("theta_E", "e1", "e2", "center_x", "gamma1", "mu_F")


def cnn_seconds_per_lens(ckpt: str, folder: Path, n_mc: int, batch: int) -> float:
    """Steady-state seconds per lens of the loaded network (MC dropout + posterior summaries)."""
    pred = Predictor(ckpt, "cpu", n_mc=n_mc, n_samples=1024)
    x = torch.from_numpy(np.stack([to_grid(read_fits(f.image)[0], pred.npix) for f in list_inputs(folder)]))
    pred.predict_arrays(x[:batch])  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(x), batch):
        pred.predict_arrays(x[i : i + batch])
    return (time.perf_counter() - t0) / len(x)


def timed(fn, cfg) -> float:
    t0 = time.perf_counter()
    fn(cfg)
    return time.perf_counter() - t0


def run_case(case: str, args, work: Path) -> list[dict]:
    d = work / case
    simulate(
        compose_config(
            "simulate",
            [
                "data=tiny",
                *CASES[case],
                f"n={args.n}",
                f"seed={args.seed}",
                "format=fits",
                f"out={d / 'fits'}",
                "progress=false",
            ],
        )
    )
    wall = {}
    common = [f"input={d / 'fits'}", "progress=false", f"seed={args.seed}"]
    wall["cnn"] = timed(
        predict, compose_config("predict", [*common, f"ckpt={args.ckpt}", f"out={d / 'cnn.csv'}", f"n_mc={args.n_mc}"])
    )
    cnn_s = cnn_seconds_per_lens(args.ckpt, d / "fits", args.n_mc, args.batch)
    fits = {
        "fit_truth": ["init=truth", f"truth={d / 'fits' / 'truth.csv'}", "n_starts=1"],
        "fit_cnn": ["init=cnn", f"ckpt={args.ckpt}", f"n_starts={args.starts}", f"n_mc={args.n_mc}"],
        "fit_prior": ["init=prior", f"n_starts={args.starts}"],
    }
    for name, over in fits.items():
        cfg = compose_config("fit", [*common, f"out={d / (name + '.csv')}", "resume=false", *over])
        wall[name] = timed(fit, cfg)
        print(f"  {case}: {name} done in {wall[name]:.0f} s", flush=True)
    methods = {"cnn": d / "cnn.csv", **{k: d / f"{k}.csv" for k in ("fit_prior", "fit_cnn", "fit_truth")}}
    rows = compare_fit(
        compose_config(
            "compare_fit",
            [
                f"truth={d / 'fits' / 'truth.csv'}",
                f"out={args.out_dir / ('fit_vs_cnn_' + case)}",
                "methods={" + ", ".join(f"{k}: {v}" for k, v in methods.items()) + "}",
                f"reference={d / 'fit_truth.csv'}",
                f"seconds={{cnn: {cnn_s}}}",
            ],
        )
    )
    for r in rows:
        r["case"] = case
        r["wall_seconds_per_lens"] = wall[r["method"]] / args.n
        r["ratio_to_cnn"] = r["seconds_per_lens"] / cnn_s
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: time, ratio to the CNN, optimum rate, chi2/dof and per label median |error| / RMSE."""
    head = [
        "case",
        "method",
        "s/lens",
        "x CNN",
        "wall s/lens",
        "reached optimum",
        "median chi2/dof",
        *[f"{p} median / RMSE" for p in SHOWN],
    ]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        opt = r.get("optimum_rate")
        chi = r.get("median_chi2_dof")
        cells = [
            r["case"],
            r["method"],
            f"{r['seconds_per_lens']:.3g}",
            f"{r['ratio_to_cnn']:.0f}",
            f"{r['wall_seconds_per_lens']:.3g}",
            "" if opt is None else f"{opt:.0%}",
            "" if chi is None else f"{chi:.2f}",
        ]
        cells += [
            f"{r.get(f'median_abs/{p}', float('nan')):.3f} / {r.get(f'rmse/{p}', float('nan')):.3f}" for p in SHOWN
        ]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def write(rows: list[dict], info: dict, args) -> None:
    md = table(rows)
    print(md)
    (args.out_dir / "fit_vs_cnn.md").write_text(
        f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, {info['date']}; "
        f"{args.n} lenses per case, {args.starts} starts, n_mc={args.n_mc}.\n\n{md}\n"
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default="outputs/runs/quickstart/checkpoints/last.ckpt")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--n", type=int, default=24, help="lenses per case")
    ap.add_argument("--starts", type=int, default=8, help="starts per lens for the prior and cnn fits")
    ap.add_argument("--n-mc", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64, help="CNN batch size")
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--render", type=Path, help="only re-print the tables of a saved fit_vs_cnn.json")
    args = ap.parse_args(argv)
    if args.render:
        rows = json.loads(args.render.read_text())
        args.n, args.starts, args.n_mc = (
            rows[0]["n"],
            rows[0].get("starts", args.starts),
            rows[0].get("n_mc", args.n_mc),
        )
        write(rows, rows[0], args)
        return
    if not Path(args.ckpt).is_file():
        sys.exit(f"error: checkpoint not found: '{args.ckpt}' (run `make quickstart` or pass --ckpt)")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for case in args.cases:
            rows += run_case(case, args, Path(work))
    info = machine_info()
    rows = [{**r, "starts": args.starts, "n_mc": args.n_mc, **info} for r in rows]
    (args.out_dir / "fit_vs_cnn.json").write_text(json.dumps(rows, indent=2))
    write(rows, info, args)


if __name__ == "__main__":
    ensure_allocator_env()
    main()
