"""The shards of every preset are pinned for a fixed seed.

A refactor of the simulator (priors, rendering, PSF, detector, tar writing) must leave the data
unchanged: on any CPU the member names, dtypes, shapes and keys must match exactly and every
number (JSON values, mean and standard deviation of every array) within float rounding; on a CPU
whose float environment was measured (``shard_fingerprint.float_environment``), the sha256 of the
shard bytes must match exactly. Only a change meant to alter the data (a new sample encoding, a
new prior) rewrites the pins (``python tests/shard_fingerprint.py``), in the same commit, saying
why. ``compile=false``, pinned torch.
"""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from shard_fingerprint import CASES, PIN_FILE, fingerprint, float_environment, mismatches, simulate_case

PINS = json.loads(PIN_FILE.read_text())


def test_every_case_is_pinned():
    assert sorted(PINS) == sorted(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_shard_data_are_pinned(tmp_path, case):
    pin, got = PINS[case], simulate_case(case, tmp_path / case)
    assert got["structure"] == pin["structure"], f"{case}: member names, shapes or keys changed"
    bad = mismatches(pin["values"], got["values"])
    assert not bad, f"{case}: {len(bad)} members changed beyond float rounding, e.g. {bad[:3]}"
    env = float_environment()
    if env in pin["sha256"]:
        assert got["sha256"] == pin["sha256"][env], (
            f"{case}: shard bytes changed in float environment {env} (sha256 {got['sha256']})"
        )


def test_fingerprint_sees_a_changed_pixel(tmp_path):
    """The tolerance check is not blind: one pixel of one image moved by 1 % of its std fails."""
    ref = simulate_case("tiny", tmp_path / "a")
    shard = next((tmp_path / "a").glob("*/shard-*.tar"))
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    out = tmp_path / "b" / "train"
    out.mkdir(parents=True)
    with tarfile.open(out / shard.name, "w") as tar:
        for i, (m, data) in enumerate(members):
            if i == 0 and m.name.endswith(".npy"):
                a = np.load(io.BytesIO(data))
                a.flat[100] += 0.01 * a.std() * a.size  # the mean moves by 1 % of the std
                buf = io.BytesIO()
                np.save(buf, a)
                data = buf.getvalue()
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    got = fingerprint(tmp_path / "b")
    assert got["structure"] == ref["structure"]
    assert mismatches(ref["values"], got["values"]) == [f"train/{members[0][0].name}"]
