"""The shard bytes of every preset are pinned for a fixed seed.

A refactor of the simulator (priors, rendering, PSF, detector, tar writing) must leave these
sha256 values unchanged. Only a change meant to alter the data (a new sample encoding, a new
prior) updates a pin, in the same commit, saying why. Values measured on x86-64 CPU with the
pinned torch (``compile=false``; float kernels are deterministic for a given build).
"""

from __future__ import annotations

import hashlib

import pytest

from lensexp.config import compose_config
from lensexp.simulate import run

PINS = {
    "tiny_sersic": (
        ["data=tiny", "data.source.kind=sersic", "n=24"],
        "325c7f206ff85473ed0b1ebdf49dd446737d1fc9a5fafd2ee960d675f64503f1",
    ),
    "tiny": (["data=tiny", "n=24"], "26d5cb18ae490a4916f3e47d8518ae327006407cfa034dad8aa4d8b4a26d2aac"),
    "hst": (["data=hst", "n=6"], "32a6d84e6c90b21100d379730d342f5a3c55e46b4aad94112e401ba0f7dbb08b"),
    "kappa": (["data=kappa", "n=12"], "72a510de5e337aaafc9cf4d1ff8b79edd995433ed98933fcaa9c8f519f1149fa"),
    "slacs": (["data=slacs", "n=4"], "62ffeb455b430934e2bff8347165addba79c96d6ae3e52dd5a2ce88de3806d1e"),
}
COMMON = [
    "seed=7",
    "shard_size=100",
    "splits={train: 1.0, val: 0, test: 0}",
    "progress=false",
    "batch_size=8",
    "compile=false",
]


@pytest.mark.parametrize("case", sorted(PINS))
def test_shard_bytes_are_pinned(tmp_path, case):
    over, pin = PINS[case]
    out = tmp_path / case
    run(compose_config("simulate", [*over, *COMMON, f"out={out}"]))
    h = hashlib.sha256()
    for p in sorted(out.glob("*/shard-*.tar")):
        h.update(p.read_bytes())
    assert h.hexdigest() == pin, f"{case}: shard bytes changed (sha256 {h.hexdigest()})"
