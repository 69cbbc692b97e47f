"""Training throughput (images/s) of the lensexp network for several timm backbones.

One optimisation step = forward with dropout before every weight layer, Gaussian NLL, backward,
AdamW step, on in-memory batches at the ``tiny`` (64 px, 1 band) and ``hst`` (192 px, 2 bands)
sizes; data loading is excluded (see ``shard_throughput.py`` for the data side). CPU by default
(all cores), ``--device cuda`` on a GPU (``--amp`` for bf16 autocast).

    python benchmarks/train_throughput.py
    python benchmarks/train_throughput.py --models tiny resnet50 inception_v4 --sizes hst --device cuda --amp
    python benchmarks/train_throughput.py --compare --models tiny resnet10t --sizes tiny --batch 64 --steps 15

``--compare`` measures, side by side in one run and alternating twice, float32 with torch's
``F.dropout`` (the CPU baseline before 2026-12-05 evening), float32 with lensexp's CPU dropout
(:func:`lensexp.models._cpu_dropout`), bf16 autocast with the 16-bit masks of
:func:`lensexp.models._bits_dropout` at every rate (the CPU dropout before 2026-12-08) and bf16
with the CPU dropout, and prints each one's ratio to the baseline; ``--dropout 0.02`` is the
CPU experiments' rate.
"""

from __future__ import annotations

import argparse
import contextlib

import torch
import torch.nn.functional as F
from common import items_per_s, report, save

from lensexp.config import compose_config
from lensexp.build import build_loss, build_net

SIZES = {"tiny": (64, 1), "hst": (192, 2)}


VARIANTS = {  # name: (bf16 autocast, dropout route: torch's F.dropout | 16-bit masks | lensexp's CPU dropout)
    "float32, F.dropout": (False, "torch"),
    "float32": (False, "cpu"),
    "bf16, 16-bit masks": (True, "bits"),
    "bf16": (True, "cpu"),
}


@contextlib.contextmanager
def dropout_route(route: str):
    """Route the CPU dropout of :class:`lensexp.models.MCDropout` through ``F.dropout``
    (``torch``, the baseline), the 16-bit masks of :func:`lensexp.models._bits_dropout` at every
    rate (``bits``, the CPU dropout before 2026-12-08) or leave it (``cpu``), then restore it."""
    from lensexp import models

    chosen = models._cpu_dropout
    if route == "torch":
        models._cpu_dropout = lambda x, p: F.dropout(x, p, training=True)
    elif route == "bits":
        models._cpu_dropout = models._bits_dropout
    try:
        yield
    finally:
        models._cpu_dropout = chosen


def step_rate(
    model_name: str, size: str, batch: int, steps: int, device: str, amp: bool, dropout: float | None = None
) -> float:
    npix, bands = SIZES[size]
    extra = [] if dropout is None else [f"model.dropout={dropout}"]
    cfg = compose_config("train", [f"model={model_name}", f"data={size}", *extra])
    loss = build_loss("gaussian_nll")
    net = build_net(cfg.model, bands, loss.n_outputs(8)).to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = torch.randn(batch, bands, npix, npix, device=device)
    y = torch.randn(batch, 8, device=device)

    def one():
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
            out = net(x)
        lo = loss(out.float(), y)
        opt.zero_grad(set_to_none=True)
        lo.backward()
        opt.step()

    one()  # warm-up
    return items_per_s(one, steps, batch, device)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--models",
        nargs="+",
        default=["tiny", "resnet18", "efficientnet_b0", "convnext_tiny", "vit_small", "inception_v4"],
    )
    ap.add_argument("--sizes", nargs="+", default=["tiny", "hst"], choices=sorted(SIZES))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", action="store_true")
    ap.add_argument("--dropout", type=float, default=None, help="dropout rate (default: the model's; quickstart 0.02)")
    ap.add_argument("--compare", action="store_true", help="F.dropout / 16-bit masks / CPU dropout, side by side")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.compare:
        return compare(args)
    rows = []
    for size in args.sizes:
        for m in args.models:
            rate = step_rate(m, size, args.batch, args.steps, args.device, args.amp, args.dropout)
            report(
                rows,
                {
                    "model": m,
                    "size": size,
                    "img_s": rate,
                    "batch": args.batch,
                    "device": args.device,
                    "amp": args.amp,
                    "dropout": args.dropout,
                    "threads": torch.get_num_threads(),
                },
                f"{size:5s} {m:16s} {rate:9.1f} img/s  (train step, batch {args.batch}, {args.device}, "
                f"{torch.get_num_threads()} threads)",
            )
    save(rows, args.json)
    return rows


def compare(args) -> list[dict]:
    """Each variant of :data:`VARIANTS` twice, alternating, per model and size; best of the two."""
    rows = []
    for size in args.sizes:
        for m in args.models:
            best = dict.fromkeys(VARIANTS, 0.0)
            for _ in range(2):
                for name, (amp, route) in VARIANTS.items():
                    with dropout_route(route):
                        rate = step_rate(m, size, args.batch, args.steps, args.device, amp, args.dropout)
                    best[name] = max(best[name], rate)
            base = best[next(iter(VARIANTS))]
            p = args.dropout
            if p is None:
                p = float(compose_config("train", [f"model={m}"]).model.dropout)
            for name, rate in best.items():
                report(
                    rows,
                    dict(model=m, size=size, variant=name, img_s=rate, ratio=rate / base, batch=args.batch, dropout=p),
                    f"{size:5s} {m:12s} {name:20s} {rate:8.1f} img/s  {rate / base:4.2f}x  (dropout {p}, "
                    f"batch {args.batch}, {args.device}, {torch.get_num_threads()} threads)",
                )
    save(rows, args.json)
    return rows


if __name__ == "__main__":
    main()
