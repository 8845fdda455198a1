"""Fusion: the signals of one listing for one candidate brand into a risk in [0, 1].

A counterfeit needs both "this listing presents brand X's product" (brand evidence B: copy, lookalike,
logo, brand named in the text) and "something is off" (an anomalously low price P, counterfeit
vocabulary T, a suspicious seller S). A small logistic model says exactly that::

    logit = bias + w_B B + w_P P + w_T T + w_S S + w_BP B P + w_BT B T + w_BS B S + w_A A

with every feature in [0, 1] and A = 1 when the seller is authorized by the brand. The interaction
terms carry the weight: with the defaults, anomalies without brand evidence stay clear (at most
sigmoid(-2.5) = 0.08 with P = T = S = 1), brand evidence without anomalies stays clear (sigmoid(-2.5)
for a perfect copy), both together rise fast. Anomaly and interaction weights must be >= 0, so risk is
monotone in every anomaly, and the authorized weight <= 0, so authorization can only lower risk.

The features are plain numbers so that issue "Detection quality" can fit the weights by logistic
regression on labelled listings (:meth:`FusionFeatures.vector`, :meth:`FusionWeights.from_vector`)
and hand the result back as a :class:`FusionWeights`.

Each feature's contribution to the logit is its exact Shapley value against the all-zero listing: a
main effect belongs to its feature, an interaction is split half and half. Reasons are ranked by it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import numpy.typing as npt

from service.domain.curves import require_fraction

FEATURE_NAMES: tuple[str, ...] = (
    "brand", "price", "text", "seller", "authorized", "brand_x_price", "brand_x_text", "brand_x_seller",
)


@dataclass(frozen=True, slots=True)
class FusionWeights:
    """Coefficients of the logistic model (defaults chosen by hand, to be calibrated on data).

    With the default verdict policy (review 0.5, likely 0.8), they give:

    =====================================================  ======  ==================
    listing                                                 risk    verdict
    =====================================================  ======  ==================
    perfect copy, normal price, ordinary seller             0.08    clear
    same, seller missing from the brand's authorized list   0.17    clear
    same, authorized seller                                 ~0.00   clear
    perfect copy at 30 % of the reference price             0.95+   likely_counterfeit
    perfect copy at 50 % of the reference price             0.56    review
    brand in title + "replica"                              0.57    review
    brand in title + "fake"                                 0.84    likely_counterfeit
    no brand evidence, 10 % price, "replica", bad seller    <0.08   clear
    =====================================================  ======  ==================
    """

    bias: float = -4.0
    brand: float = 1.5
    price: float = 0.5
    text: float = 0.5
    seller: float = 0.5
    authorized: float = -3.5
    brand_x_price: float = 5.0
    brand_x_text: float = 7.0
    brand_x_seller: float = 4.0

    def __post_init__(self) -> None:
        for name in (*FEATURE_NAMES, "bias"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"fusion weight {name} must be finite")
        negative = [n for n in ("brand", "price", "text", "seller", "brand_x_price", "brand_x_text",
                                "brand_x_seller") if getattr(self, n) < 0]
        if negative:
            raise ValueError(f"fusion weights {negative} must be >= 0 (risk must rise with each anomaly)")
        if self.authorized > 0:
            raise ValueError("fusion weight authorized must be <= 0 (authorization cannot raise risk)")

    def vector(self) -> npt.NDArray[np.float64]:
        """The coefficients in :data:`FEATURE_NAMES` order (without the bias)."""
        return np.array([getattr(self, n) for n in FEATURE_NAMES], dtype=np.float64)

    @classmethod
    def from_vector(cls, bias: float, coefficients: Sequence[float]) -> FusionWeights:
        """Weights from a fitted model: ``coefficients`` in :data:`FEATURE_NAMES` order."""
        if len(coefficients) != len(FEATURE_NAMES):
            raise ValueError(f"need {len(FEATURE_NAMES)} coefficients ({', '.join(FEATURE_NAMES)})")
        named = {n: float(c) for n, c in zip(FEATURE_NAMES, coefficients, strict=True)}
        return cls(bias=float(bias), **named)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class FusionFeatures:
    """The inputs of fusion for one listing and one candidate brand, each in [0, 1]."""

    brand: float = 0.0
    price: float = 0.0
    text: float = 0.0
    seller: float = 0.0
    authorized: bool = False

    def __post_init__(self) -> None:
        for name in ("brand", "price", "text", "seller"):
            require_fraction(f"fusion feature {name}", getattr(self, name))

    def vector(self) -> npt.NDArray[np.float64]:
        """The model's inputs in :data:`FEATURE_NAMES` order, for fitting the weights."""
        b, a = self.brand, float(self.authorized)
        return np.array([b, self.price, self.text, self.seller, a, b * self.price, b * self.text,
                         b * self.seller], dtype=np.float64)


@dataclass(frozen=True, slots=True)
class FusionOutcome:
    """Risk, its logit, and each feature's share of the logit (above the bias)."""

    risk: float
    logit: float
    contributions: dict[str, float]  # brand, price, text, seller, authorized


def sigmoid(z: float) -> float:
    # Written for both signs so that large |z| never overflows exp().
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def fuse(features: FusionFeatures, weights: FusionWeights | None = None) -> FusionOutcome:
    """Risk in [0, 1] from the features; contributions are Shapley shares of the logit."""
    w = weights or FusionWeights()
    f = features
    bp = w.brand_x_price * f.brand * f.price
    bt = w.brand_x_text * f.brand * f.text
    bs = w.brand_x_seller * f.brand * f.seller
    contributions = {
        "brand": w.brand * f.brand + (bp + bt + bs) / 2.0,
        "price": w.price * f.price + bp / 2.0,
        "text": w.text * f.text + bt / 2.0,
        "seller": w.seller * f.seller + bs / 2.0,
        "authorized": w.authorized * float(f.authorized),
    }
    z = w.bias + sum(contributions.values())
    return FusionOutcome(risk=sigmoid(z), logit=z, contributions=contributions)
