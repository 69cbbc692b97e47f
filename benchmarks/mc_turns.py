"""MC-dropout passes spread over the pixel grid's 8 symmetries, against plain passes, on the
outside sets: does the network's disagreement with itself under turns widen the intervals
where images are unlike the training data? (Measured, not adopted: README "Training".)

    python benchmarks/mc_turns.py --run outputs/runs/quickstart --n 400 --labels prior

For each variant the run folder is copied, recalibrated on its validation split with
``lensexp.calibrate`` (as ``make quickstart`` does, n_mc=16) and evaluated on the
lenstronomy-made outside sets (``outside_sets.py``). With ``turns``, pass ``k`` sees the image
turned by ``D4[k mod 8]`` and its Gaussian (mean and sigma, network units) is turned back
(:func:`lensexp.labels.d4_back`, exact for the signed label permutations of the group), so the
mixture's spread holds the turns' disagreement; the posterior centre is unchanged.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch
from common import ensure_allocator_env, machine_info, write_results
from outside_coverage import evaluate, table_rows
from outside_sets import SETS, make_set, prior_ranges

from lensexp import module as lens_module
from lensexp.labels import D4, d4_back, d4_image, d4_supported
from lensexp.models import set_mc_dropout


@torch.no_grad()
def turned_passes(self, images: torch.Tensor, n_mc: int, psf_ee=None) -> tuple[torch.Tensor, torch.Tensor]:
    """:meth:`LensModule.predict_mc` with pass ``k`` on the image turned by ``D4[k % 8]``: means and
    sigmas [passes, B, D] in the original frame (network units)."""
    if not d4_supported(self.labels):
        raise SystemExit(f"labels {self.labels} have no known grid symmetry")
    was = self.training
    self.eval()
    n = self.mc_passes(n_mc)
    set_mc_dropout(self, n > 1)
    means, sigmas = [], []
    try:
        for k in range(n):
            t = D4[k % len(D4)]
            m, s = self.loss_fn.mean_std(self(d4_image(images, *t), psf_ee))

            def back(z, t=t):
                return self.to_net(d4_back(self.from_net(z), self.labels, *t))

            mb = back(m)
            means.append(mb)
            sigmas.append((back(m + s) - mb).abs())  # the map is affine per label: sigma moves exactly
    finally:
        set_mc_dropout(self, False)
        self.train(was)
    return torch.stack(means), torch.stack(sigmas)


def variant(run: Path, turns: bool, n: int, ranges, n_mc: int, work: Path) -> dict:
    from hydra import compose, initialize_config_dir

    from lensexp.calibrate import CAL_FILE, read_calibration
    from lensexp.calibrate import run as calibrate
    from lensexp.checkpoints import load_module
    from lensexp.paths import PROJECT_ROOT

    copy = work / ("turns" if turns else "plain")
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("calibration", "wandb"))
    ckpt = copy / "checkpoints" / "last.ckpt"
    plain = lens_module.LensModule.predict_mc
    if turns:
        lens_module.LensModule.predict_mc = turned_passes
    try:
        over = [f"ckpt={ckpt}", f"out={copy / 'calibration'}", f"n_mc={n_mc}", "wandb.mode=disabled", "progress=false"]
        with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
            m = calibrate(compose("calibrate", overrides=over))
        module = load_module(str(ckpt))
        cal = read_calibration(ckpt.parent / CAL_FILE, module.labels)
        per = m["per_label"]
        out = {"test": {k: {"rmse": v["rmse"], "cov68_after": v["coverage_after"]["0.683"]} for k, v in per.items()}}
        for name in SETS:
            d = make_set(name, n, 0, ranges)
            res = evaluate(module, torch.from_numpy(d["images"]), torch.from_numpy(d["labels"]), cal, n_mc,
                           psf_ee=torch.from_numpy(d["psf_ee"]))  # fmt: skip
            out[name] = table_rows(module.labels, res)["labels"]
            cov = out[name]["theta_E"]["cov68_after"]
            print(f"{'turns' if turns else 'plain'} {name}: theta_E 68.3 % after recalibration {cov:.3f}", flush=True)
        return out
    finally:
        lens_module.LensModule.predict_mc = plain


def markdown(res: dict, labels) -> str:
    lines = [
        f"Machine: {res['machine']['cpu']}, {res['machine']['cores']} cores; run `{res['run']}`; n={res['n']} per set; "
        f"n_mc={res['n_mc']}; lens parameters {res['labels']}; coverage after the recalibration fitted on the "
        "validation split with each variant's own passes.",
        "",
        "| set | label | 68.3 % after: plain → turns | 95.5 % after: plain → turns | RMSE |",
        "|---|---|---|---|---|",
    ]
    for name in ("test", *SETS):
        for lab in labels:
            p, t = res["plain"][name][lab], res["turns"][name][lab]
            c95 = f"{p['cov95_after']:.3f} → {t['cov95_after']:.3f}" if "cov95_after" in p else "–"
            c68 = f"{p['cov68_after']:.3f} → {t['cov68_after']:.3f}"
            lines.append(f"| {name} | {lab} | {c68} | {c95} | {p['rmse']:.4g} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a trained run folder (RUN/checkpoints/last.ckpt, RUN/.hydra)")
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--n-mc", type=int, default=16)
    ap.add_argument("--labels", choices=("narrow", "prior"), default="prior")
    ap.add_argument("--out", default="benchmarks/results/mc_turns")
    args = ap.parse_args()
    ensure_allocator_env()
    from lensexp.checkpoints import load_module

    module = load_module(str(Path(args.run) / "checkpoints" / "last.ckpt"))
    labels = module.labels
    ranges = None
    if args.labels == "prior":  # the checkpoint's training prior, as outside_coverage.py --labels prior
        ranges = prior_ranges(str((module.hparams.get("data_info") or {}).get("name", "tiny")))
    res = {"machine": machine_info(), "run": args.run, "n": args.n, "n_mc": args.n_mc, "labels": args.labels}
    with tempfile.TemporaryDirectory() as tmp:
        for turns in (False, True):
            res["turns" if turns else "plain"] = variant(Path(args.run), turns, args.n, ranges, args.n_mc, Path(tmp))
    write_results(args.out, "mc_turns", res, markdown(res, labels))


if __name__ == "__main__":
    main()
