"""Small numeric shapes every signal shares: clamping, smooth ramps between two points, noisy-OR.

Kept in one place so that "starts to count at X, is certain at Y" means the same curve for the copy,
lookalike, logo, price and seller signals.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def clamp01(x: float) -> float:
    """``x`` limited to [0, 1]; NaN becomes 0 so a broken input never raises risk."""
    if math.isnan(x):
        return 0.0
    return 0.0 if x < 0.0 else 1.0 if x > 1.0 else x


def ramp(x: float, start: float, end: float) -> float:
    """0 at ``start``, 1 at ``end``, a smoothstep in between, flat outside.

    ``end`` may lie below ``start`` for a falling quantity (a price ratio that is anomalous as it
    *drops*). Smoothstep rather than a straight line so that a small change near either end (a
    similarity just above the floor, a price just under the reference) moves the score only a little.
    """
    if start == end:
        raise ValueError("ramp needs start != end")
    t = clamp01((x - start) / (end - start))
    return t * t * (3.0 - 2.0 * t)


def noisy_or(values: Iterable[float]) -> float:
    """1 - prod(1 - v): independent pieces of evidence, each in [0, 1], combined without exceeding 1."""
    rest = 1.0
    for v in values:
        rest *= 1.0 - clamp01(v)
    return 1.0 - rest


def require_fraction(name: str, value: float) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is a finite number in [0, 1]."""
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
