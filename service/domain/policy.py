"""The verdict policy: which risk is worth a human review, which is likely a counterfeit.

One default policy comes from ``ScoringSettings``; a brand may override it (a luxury brand may want
every doubtful listing reviewed, a brand with a large grey market fewer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from service.domain.model import Verdict


@dataclass(frozen=True, slots=True)
class VerdictPolicy:
    """``risk >= likely_threshold`` -> likely_counterfeit; ``>= review_threshold`` -> review; else clear."""

    review_threshold: float = 0.5
    likely_threshold: float = 0.8

    def __post_init__(self) -> None:
        r, lk = self.review_threshold, self.likely_threshold
        if not (math.isfinite(r) and math.isfinite(lk) and 0.0 <= r <= lk <= 1.0):
            raise ValueError(
                f"verdict policy needs 0 <= review_threshold <= likely_threshold <= 1, got {r} and {lk}"
            )

    def verdict(self, risk: float) -> Verdict:
        if not math.isfinite(risk):
            raise ValueError(f"risk must be a finite number, got {risk!r}")
        if risk >= self.likely_threshold:
            return Verdict.LIKELY_COUNTERFEIT
        if risk >= self.review_threshold:
            return Verdict.REVIEW
        return Verdict.CLEAR
