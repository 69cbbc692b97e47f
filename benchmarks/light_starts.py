"""The light-only fit of real lenses under several start settings, side by side in one run.

For every lens folder of ``--data`` (default ``../shared/data/slacs_dev``), loaded and set up as
``lensexp.fit ... pixscale=0.05 lens_light=true`` does, the light-only stage
(:func:`lensexp.fit.optimise.light_stage`, Adam then L-BFGS, as the fit runs it) runs once per
setting ``STARTS:SCREEN`` (``adam.light_starts`` and ``lbfgs.light_screen_iters``); printed per
lens and summed: the kept robust chi-square and the seconds. A lower chi-square is a better
optimum of the same objective; the mass search starts from the light it is given.

    python benchmarks/light_starts.py                          # 1:0 3:0 3:40 3:80
    python benchmarks/light_starts.py --settings 1:0 3:60 --out benchmarks/results/light_starts.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from common import ensure_allocator_env, machine_info

from lensexp.config import compose_config
from lensexp.fit.data import Loader
from lensexp.fit.optimise import light_stage
from lensexp.fit.workflow import fit_settings, prepare_group, resolve_search
from lensexp.inputs import list_inputs
from lensexp.paths import SHARED_DATA
from lensexp.runtime import set_threads


def parse_setting(text: str) -> tuple[int, int]:
    """``STARTS:SCREEN`` -> (light starts, screen iterations)."""
    try:
        n, k = (int(v) for v in text.split(":"))
    except ValueError:
        raise SystemExit(f"--settings: expected STARTS:SCREEN such as 3:40, got '{text}'") from None
    return n, k


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(SHARED_DATA / "slacs_dev"))
    ap.add_argument("--settings", nargs="+", default=["1:0", "3:0", "3:40", "3:80"], help="STARTS:SCREEN each")
    ap.add_argument("--out", default=None, help="JSON with every figure and the machine")
    args = ap.parse_args(argv)
    ensure_allocator_env()
    settings = [parse_setting(s) for s in args.settings]
    cfg = resolve_search(compose_config("fit", [f"input={args.data}", "pixscale=0.05", "lens_light=true"]))
    set_threads()
    torch.set_flush_denormal(True)
    loader, files = Loader(cfg, None), list_inputs(cfg.input)
    n_light = int(cfg.lens_light_components)
    fs = fit_settings(cfg, n_light)
    ss = int(cfg.supersample or cfg.data.supersample)
    rows = []
    print(f"{'lens':12s} " + " ".join(f"{s:>18s}" for s in args.settings), "  (robust chi-square, seconds)")
    for f in files:
        item = {**loader(f), "name": f.name}
        space, model, obs = prepare_group([item], cfg, ss, n_light, getattr(torch, str(cfg.dtype)), "cpu")
        row = {"name": f.name}
        for (n, k), label in zip(settings, args.settings):
            t0 = time.perf_counter()
            light = light_stage(obs, space, model, replace(fs, light_starts=n, light_screen_iters=k))
            row[label] = {"chi2": float(light["chi2"].amin()), "seconds": time.perf_counter() - t0}
        rows.append(row)
        print(f"{f.name:12s} " + " ".join(f"{row[s]['chi2']:11.1f} {row[s]['seconds']:5.1f}s" for s in args.settings))
        sys.stdout.flush()
    best = [min(r[s]["chi2"] for s in args.settings) for r in rows]
    summary = {}
    for s in args.settings:
        gap = [r[s]["chi2"] - b for r, b in zip(rows, best)]
        summary[s] = {
            "seconds_per_lens": sum(r[s]["seconds"] for r in rows) / len(rows),
            "lenses_at_best_within_1": sum(g < 1.0 for g in gap),
            "summed_excess_chi2": sum(gap),
        }
        print(f"{s}: {summary[s]['seconds_per_lens']:.1f} s/lens, at the best optimum found (within 1) for "
              f"{summary[s]['lenses_at_best_within_1']} of {len(rows)}, summed excess {sum(gap):.1f}")  # fmt: skip
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"machine": machine_info(), "rows": rows, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
