"""Checked parameter ranges and uniform draws from them.

A range is a ``[low, high]`` pair; draws are uniform. :func:`check_range` turns an impossible
range (empty, reversed, outside the physical domain) into one :class:`ConfigError` naming it.
"""

from __future__ import annotations

import math

import torch

from lensexp.errors import ConfigError


def check_range(
    name: str, value, lo_bound: float = -math.inf, hi_bound: float = math.inf, strict_low: bool = False
) -> tuple[float, float]:
    """Validate ``value`` as a [low, high] range inside [lo_bound, hi_bound]; return floats."""
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a [low, high] range of numbers, got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise ConfigError(f"{name} is an empty range: [{lo}, {hi}] (need finite low <= high)")
    if lo < lo_bound or hi > hi_bound or (strict_low and lo <= lo_bound):
        op = ">" if strict_low else ">="
        raise ConfigError(
            f"{name} = [{lo}, {hi}] is outside its domain (values must be {op} {lo_bound}"
            f"{'' if math.isinf(hi_bound) else f' and <= {hi_bound}'})"
        )
    return lo, hi


def draw(rng: torch.Generator, n: int, lohi, device=None, dtype=torch.float64) -> torch.Tensor:
    """``n`` uniform draws in [low, high] with generator ``rng``."""
    lo, hi = lohi
    u = torch.rand(n, generator=rng, device=device, dtype=dtype)
    return lo + (hi - lo) * u
