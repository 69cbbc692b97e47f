"""Fingerprints of simulated shards for the pin test (``test_shard_pin.py``).

Float kernels (oneDNN convolutions, MKL FFTs, vectorised transcendentals) round differently on
different CPUs, so the exact shard bytes of a seed hold only for one *float environment*:
``float_environment()`` names it by hashing a fixed run of those kernels. A pin file keeps, per
preset case,

- ``structure``: sha256 of the member names, array dtypes/shapes and JSON keys (any CPU);
- ``values``: per sample and member, the JSON numbers and the mean and standard deviation of
  every array (compared with a relative tolerance on any CPU);
- ``sha256``: the exact shard bytes, per float environment where measured.

Run ``python tests/shard_fingerprint.py`` to rewrite ``tests/data/shard_pins.json`` after a
change meant to alter the data (say why in the commit), or to add this machine's exact bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import torch

PIN_FILE = Path(__file__).parent / "data" / "shard_pins.json"
CASES = {
    "tiny_sersic": ["data=tiny", "data.source.kind=sersic", "n=24"],
    "tiny": ["data=tiny", "n=24"],
    "hst": ["data=hst", "n=6"],
    "hst_capped": ["data=hst", "n=60", "batch_size=256"],  # drawn in batches of 56 (MAX_BATCH_RAYS)
    "kappa": ["data=kappa", "n=12"],
    "slacs": ["data=slacs", "n=4"],
}
COMMON = [
    "seed=7",
    "shard_size=100",
    "splits={train: 1.0, val: 0, test: 0}",
    "progress=false",
    "batch_size=8",
    "compile=false",
]


def float_environment() -> str:
    """Short hash of the float kernels the simulator uses, run on fixed inputs."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 2, 96, 96, generator=g, dtype=torch.float32)
    outs = []
    for k in (5, 9, 25):
        w = torch.rand(2, 1, k, k, generator=g)
        outs.append(torch.nn.functional.conv2d(x, w, padding=k // 2, groups=2))
    f = torch.fft.rfft2(x)
    outs += [torch.fft.irfft2(f * f.conj().sqrt(), s=x.shape[-2:]), f.real, f.imag]
    v = x.flatten() * 7.0 + 0.01
    outs += [v.exp(), v.log(), v.pow(0.37), v.sin(), v.cos(), v.sqrt(), torch.atan2(v, v.flip(0))]
    outs.append(torch.special.gammaln(v))
    outs.append(x[0, 0] @ x[1, 1])
    h = hashlib.sha256()
    for o in outs:
        h.update(o.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _numbers(obj, prefix=""):
    """Flatten the numbers of a JSON value to ``{dotted key: float}`` (booleans as 0 / 1)."""
    if isinstance(obj, (dict, list)):
        out = {}
        for k, v in obj.items() if isinstance(obj, dict) else enumerate(obj):
            out.update(_numbers(v, f"{prefix}{k}."))
        return out
    if not isinstance(obj, (int, float)):  # bool is an int
        return {}
    return {prefix.rstrip("."): float(obj)}


def fingerprint(out: Path) -> dict:
    """``structure``, ``values`` and ``sha256`` of the shards under ``out``."""
    shards = sorted(out.glob("*/shard-*.tar"))
    if not shards:
        raise FileNotFoundError(f"no shards under {out}")
    exact, struct = hashlib.sha256(), hashlib.sha256()
    values: dict[str, list[float]] = {}
    for p in shards:
        exact.update(p.read_bytes())
        with tarfile.open(p) as tar:
            for m in tar.getmembers():
                data = tar.extractfile(m).read()
                name = f"{p.parent.name}/{m.name}"
                if m.name.endswith(".npy"):
                    a = np.load(io.BytesIO(data), allow_pickle=False)
                    struct.update(f"{name}|{a.dtype.str}|{a.shape}\n".encode())
                    a = a.astype(np.float64)
                    values[name] = [float(a.mean()), float(a.std())]
                elif m.name.endswith(".json"):
                    nums = _numbers(json.loads(data))
                    struct.update(f"{name}|{sorted(nums)}\n".encode())
                    values[name] = [nums[k] for k in sorted(nums)]
                else:
                    struct.update(f"{name}|{len(data)}\n".encode())
    return {"structure": struct.hexdigest(), "values": values, "sha256": exact.hexdigest()}


RTOL, ATOL = 1e-4, 1e-6


def mismatches(ref: dict, got: dict) -> list[str]:
    """Members whose numbers differ beyond float rounding (``RTOL``, ``ATOL``), or are missing."""
    bad = sorted(set(ref) ^ set(got))
    for k in sorted(set(ref) & set(got)):
        a, b = np.asarray(ref[k]), np.asarray(got[k])
        if a.shape != b.shape or not np.allclose(b, a, rtol=RTOL, atol=ATOL):
            bad.append(k)
    return bad


def simulate_case(case: str, out: Path) -> dict:
    """Simulate one pinned case into ``out`` and return its fingerprint."""
    from lensexp.config import compose_config
    from lensexp.simulate import run

    run(compose_config("simulate", [*COMMON, *CASES[case], f"out={out}"]))
    return fingerprint(out)


def update(tmp: Path) -> None:
    """Rewrite the pin file with this environment's exact bytes; a case whose data agree with
    its pin up to rounding keeps its reference values and the other environments' bytes."""
    env = float_environment()
    old = json.loads(PIN_FILE.read_text()) if PIN_FILE.exists() else {}
    pins = {}
    for case in sorted(CASES):
        fp = simulate_case(case, tmp / case)
        ref = old.get(case)
        same = ref is not None and ref["structure"] == fp["structure"] and not mismatches(ref["values"], fp["values"])
        # same data up to rounding: keep the reference values and the other environments' bytes
        pins[case] = {
            "structure": fp["structure"],
            "sha256": {**(ref["sha256"] if same else {}), env: fp["sha256"]},
            "values": ref["values"] if same else fp["values"],
        }
        print(f"{case}: {fp['sha256']} (float environment {env})")
    PIN_FILE.parent.mkdir(parents=True, exist_ok=True)
    PIN_FILE.write_text(json.dumps(pins, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        update(Path(d))
