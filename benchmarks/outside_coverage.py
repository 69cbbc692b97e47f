"""Accuracy and interval coverage on lenses from another simulator (lenstronomy), before and after
the checkpoint's recalibration, beside the in-distribution test split.

    python benchmarks/outside_coverage.py --ckpt outputs/runs/quickstart/checkpoints/last.ckpt \
        --n 400 --out benchmarks/results/outside_coverage

The sets (``outside_sets.py``): bright Sersic rings, faint arcs, real COSMOS sources, with Moffat
PSFs and noise unlike the training defaults. The recalibration is the one ``calibrate`` saved beside
the checkpoint (``calibration.json``; fitted on the validation split, never on these sets). Writes
``outside_coverage.json`` and ``.md``: RMSE, coverage of the 68.3/95.5 % intervals per label,
max |coverage - nominal| over the whole curve, and the 68.3 % coverage per image S/N bin.
``--labels prior`` draws the lens parameters from the checkpoint's training prior instead of the
sets' narrower ranges (coverage is nominal only averaged over the prior the posterior assumes);
``--psf-unknown`` withholds the kernels from a network trained with ``model.psf_input``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import ensure_allocator_env, machine_info, write_results
from outside_sets import SETS, make_set, prior_ranges

from lensexp.calibrate import CAL_FILE, collect, read_calibration, summarise
from lensexp.checkpoints import load_module


def evaluate(module, images, truth, cal, n_mc: int = 16, batch: int = 64, seed: int = 0, psf_ee=None) -> dict:
    """Before/after summaries (:func:`lensexp.calibrate.summarise`) of in-memory images [N, C, H, W]
    (``psf_ee`` [N, R]: their PSFs, told to a network that takes them)."""
    torch.manual_seed(seed)
    loader = [
        {"image": images[i : i + batch], "labels": truth[i : i + batch]}
        | ({"psf_ee": psf_ee[i : i + batch]} if psf_ee is not None else {})
        for i in range(0, len(images), batch)
    ]
    c = collect(module, loader, n_mc, progress=False)
    return {"before": summarise(module, c), "after": summarise(module, c, cal) if cal is not None else None, "c": c}


def table_rows(labels, res: dict) -> dict:
    """Plain numbers per label for one set."""
    out = {"n": int(res["before"]["n"]), "snr_median": float(res["c"]["snr"].median()), "labels": {}}
    for j, lab in enumerate(labels):
        row = {"rmse": float(res["before"]["rmse"][j])}
        for key in ("before", "after"):
            s = res[key]
            if s is None:
                continue
            row[f"cov68_{key}"] = float(s["coverage"][0.683][j])
            row[f"cov95_{key}"] = float(s["coverage"][0.955][j])
            row[f"max_dev_{key}"] = float(s["max_curve_deviation"][j])
            row[f"cov68_by_snr_{key}"] = {b: g["coverage"]["0.683"][j] for b, g in s["groups"]["snr"].items()}
        out["labels"][lab] = row
    return out


def markdown(results: dict, labels) -> str:
    lines = [
        f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores; checkpoint "
        f"`{results['ckpt']}`; recalibration `{results['method']}`; n_mc={results['n_mc']}; lens parameters "
        f"{results.get('labels', 'narrow')} {results.get('ranges') or ''}.",
        "",
        "| set | n | median S/N | label | RMSE | 68.3 % before → after | 95.5 % before → after | max dev. after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["sets"].items():
        for lab in labels:
            v = r["labels"][lab]
            after68 = f"{v.get('cov68_after', float('nan')):.3f}"
            after95 = f"{v.get('cov95_after', float('nan')):.3f}"
            lines.append(
                f"| {name} | {r['n']} | {r['snr_median']:.0f} | {lab} | {v['rmse']:.4g} | "
                f"{v['cov68_before']:.3f} → {after68} | {v['cov95_before']:.3f} → {after95} | "
                f"{v.get('max_dev_after', float('nan')):.3f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--n", type=int, default=400, help="lenses per outside set")
    ap.add_argument("--n-mc", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sets", nargs="+", default=list(SETS))
    ap.add_argument("--out", default="benchmarks/results/outside_coverage")
    ap.add_argument("--psf-unknown", action="store_true", help="withhold the PSF from a psf_input network")
    ap.add_argument(
        "--labels",
        choices=("narrow", "prior"),
        default="narrow",
        help="lens parameters from the sets' narrow ranges, or from the checkpoint's training prior (data preset)",
    )
    args = ap.parse_args()
    ensure_allocator_env()
    module = load_module(args.ckpt)
    cal_path = Path(args.ckpt).parent / CAL_FILE
    cal = read_calibration(cal_path, module.labels) if cal_path.is_file() else None
    if cal is None:
        print(f"no {cal_path}: run python -m lensexp.calibrate ckpt={args.ckpt} first; coverage before only")
    ranges = None
    if args.labels == "prior":
        ranges = prior_ranges(str((module.hparams.get("data_info") or {}).get("name", "tiny")))
    results = {
        "machine": machine_info(),
        "ckpt": args.ckpt,
        "method": cal.method if cal is not None else None,
        "n_mc": args.n_mc,
        "labels": args.labels,
        "ranges": ranges,
        "psf_input": bool(getattr(module, "psf_input", False)) and not args.psf_unknown,
        "sets": {},
    }
    for name in args.sets:
        t0 = time.perf_counter()
        d = make_set(name, args.n, args.seed, ranges)
        t1 = time.perf_counter()
        psf_ee = None if args.psf_unknown else torch.from_numpy(d["psf_ee"])
        images, truth = torch.from_numpy(d["images"]), torch.from_numpy(d["labels"])
        res = evaluate(module, images, truth, cal, args.n_mc, psf_ee=psf_ee)
        results["sets"][name] = table_rows(module.labels, res)
        r = results["sets"][name]["labels"]
        print(
            f"{name}: made in {t1 - t0:.0f} s, evaluated in {time.perf_counter() - t1:.0f} s; theta_E RMSE "
            f"{r['theta_E']['rmse']:.4f}, cov68 {r['theta_E']['cov68_before']:.3f} -> "
            f"{r['theta_E'].get('cov68_after', float('nan')):.3f}",
            flush=True,
        )
    write_results(args.out, "outside_coverage", results, markdown(results, module.labels))


if __name__ == "__main__":
    main()
