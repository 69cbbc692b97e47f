"""Prediction throughput: lenses/s and the time for 170 000 lenses (a Euclid-sized sample).

Times :meth:`lensexp.predict.Predictor.predict_arrays` (``n_mc`` MC-dropout passes, posterior
samples, recalibrated intervals) on in-memory batches, for the ``tiny`` network at 64 px and
Inception-v4 at the ``hst`` size (192 px, 1 band after ICA); FITS reading is excluded. Target on
one GPU: 170 000 lenses x 32 MC samples in under 10 minutes.

    python benchmarks/predict_throughput.py                       # CPU
    python benchmarks/predict_throughput.py --device cuda --batch 256
    python benchmarks/predict_throughput.py --set model.channels_last=false   # the NCHW layout
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import items_per_s, report, save

from lensexp.config import compose_config
from lensexp.build import lens_module
from lensexp.predict import Predictor

CASES = {"tiny": ("tiny", 64, 0.1), "hst": ("inception_v4", 192, 0.04)}
N_LENSES = 170_000


def lenses_per_s(case: str, n_mc: int, batch: int, n_batches: int, device: str, overrides=()) -> float:
    model, npix, pix = CASES[case]
    cfg = compose_config("train", [f"model={model}", *overrides])
    module = lens_module(cfg.model, cfg.loss, data_info={"npix": npix, "pixscale": pix})
    with tempfile.TemporaryDirectory() as d:
        ck = Path(d) / "m.ckpt"
        torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, ck)
        pred = Predictor(str(ck), device=device, n_mc=n_mc, n_samples=256, calibration=None)
    x = torch.randn(batch, 1, npix, npix)
    pred.predict_arrays(x)  # warm-up
    return items_per_s(lambda: pred.predict_arrays(x), n_batches, batch, device)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", default=["tiny", "hst"], choices=sorted(CASES))
    ap.add_argument("--n-mc", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--set", nargs="*", default=[], help="train-config overrides, e.g. model.channels_last=false")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = []
    for case in args.cases:
        rate = lenses_per_s(case, args.n_mc, args.batch, args.batches, args.device, args.set)
        minutes = N_LENSES / rate / 60
        report(
            rows,
            {
                "case": case,
                "backbone": CASES[case][0],
                "lenses_per_s": rate,
                "n_mc": args.n_mc,
                "batch": args.batch,
                "device": args.device,
                "minutes_170k": minutes,
                "threads": torch.get_num_threads(),
                "overrides": list(args.set),
            },
            f"{case:5s} {CASES[case][0]:13s} {rate:9.2f} lenses/s at n_mc={args.n_mc}: 170 000 lenses in "
            f"{minutes:8.1f} min ({args.device}, batch {args.batch}; target on one GPU: < 10 min)",
        )
    save(rows, args.json)
    return rows


if __name__ == "__main__":
    main()
