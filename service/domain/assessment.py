"""The one scoring entry point: a listing's facts, matches and text in; risk, verdict, brand, signals
and reasons out. ``/score``, the CLI rescan and a Ray map step all call :func:`assess`; nothing about
scoring is written anywhere else.

Pure: every input is a plain value the caller has already gathered (matches from the indexes, OCR
text, the candidate brand's authorized sellers and market prices from storage), so :func:`assess`
does no I/O and its inputs and outputs pickle.

The caller's order of work::

    scan = scan_text(title, description, brands=names)              # cheap
    cands = candidate_brands(matches, scan.mentions, params.visual, params.brand_evidence)
    if wants_closer_look(cands, scan): ... OCR, logo search -> more matches, photo text, rescan
    contexts = {c.brand: BrandContext(c.brand, authorized, {c.sku: market prices}, brand policy)
                for c in cands[: params.max_candidates]}
    result = assess(facts, matches, scan, contexts, params, skipped={...}, candidates=cands)

When several brands are candidates, each is assessed and the riskiest is reported: a listing is as
suspicious as its most suspicious reading.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from service.domain.candidates import BrandCandidate, BrandEvidenceWeights, candidate_brands
from service.domain.fusion import FusionFeatures, FusionOutcome, FusionWeights, fuse
from service.domain.model import (
    Listing,
    Match,
    Money,
    ScoreResult,
    SellerInfo,
    Signal,
    SignalName,
    Verdict,
)
from service.domain.policy import VerdictPolicy
from service.domain.pricing import CurrencyTable, PriceReading, PriceThresholds, explain_price, read_price
from service.domain.seller import SellerReading, SellerThresholds, authorized_reason, explain_seller, read_seller
from service.domain.textmatch import (
    TextScan,
    TextWeights,
    mention_reason,
    text_signal,
    vocabulary_reason,
    vocabulary_score,
)
from service.domain.visual import VISUAL_SIGNALS, VisualThresholds, visual_signal

SIGNAL_ORDER: tuple[SignalName, ...] = (
    SignalName.COPY, SignalName.LOOKALIKE, SignalName.LOGO, SignalName.KEYPOINTS, SignalName.TEXT,
    SignalName.PRICE, SignalName.SELLER,
)


@dataclass(frozen=True, slots=True)
class ListingFacts:
    """What scoring needs of the listing beyond its matches and text (which are passed apart)."""

    listing_id: str
    price: Money | None = None
    seller: SellerInfo | None = None
    # From ListingHistory.confirmed_counterfeits(seller_id); None: not looked up / unknown.
    seller_confirmed_counterfeits: int | None = None

    @classmethod
    def of(cls, listing: Listing, seller_confirmed_counterfeits: int | None = None) -> ListingFacts:
        return cls(listing.listing_id, listing.price, listing.seller, seller_confirmed_counterfeits)


@dataclass(frozen=True)
class BrandContext:
    """What the catalog and the history say about one candidate brand.

    ``market_prices`` maps a sku to other listings' prices of it (ListingHistory.market_sample narrowed
    by ``MarketSample.others``: this listing left out); only the candidate's product sku is read. An empty
    ``authorized_sellers`` means the brand keeps no list. ``policy`` overrides the default one.
    """

    brand: str
    authorized_sellers: frozenset[str] = frozenset()
    market_prices: Mapping[str, Sequence[Money]] = field(default_factory=dict)
    policy: VerdictPolicy | None = None


def _usd_only() -> CurrencyTable:
    return CurrencyTable({"USD": 1.0})


@dataclass(frozen=True)
class ScoringParams:
    """Every threshold and weight of scoring; the composition root fills it from ``ScoringSettings``."""

    currencies: CurrencyTable = field(default_factory=_usd_only)
    visual: VisualThresholds = field(default_factory=VisualThresholds)
    text: TextWeights = field(default_factory=TextWeights)
    price: PriceThresholds = field(default_factory=PriceThresholds)
    seller: SellerThresholds = field(default_factory=SellerThresholds)
    brand_evidence: BrandEvidenceWeights = field(default_factory=BrandEvidenceWeights)
    weights: FusionWeights = field(default_factory=FusionWeights)
    policy: VerdictPolicy = field(default_factory=VerdictPolicy)
    max_candidates: int = 3
    max_reasons: int = 5
    # Contributions (logit units) smaller than this are not worth a reason.
    min_reason_contribution: float = 0.05

    def __post_init__(self) -> None:
        if self.max_candidates < 1 or self.max_reasons < 1:
            raise ValueError("scoring params need max_candidates >= 1 and max_reasons >= 1")


@dataclass(slots=True)
class Assessment:
    """The outcome of :func:`assess` for one listing."""

    listing_id: str
    risk: float
    verdict: Verdict
    brand: str | None
    signals: list[Signal]
    reasons: list[str]
    candidates: list[BrandCandidate]
    features: FusionFeatures
    fusion: FusionOutcome
    policy: VerdictPolicy

    def signal(self, name: SignalName) -> Signal | None:
        return next((s for s in self.signals if s.name == name), None)

    def to_result(
        self, matches: Sequence[Match], model_versions: Mapping[str, str] | None = None
    ) -> ScoreResult:
        return ScoreResult(
            listing_id=self.listing_id, risk=self.risk, verdict=self.verdict, brand=self.brand,
            matches=list(matches), signals=self.signals, reasons=self.reasons,
            model_versions=dict(model_versions or {}),
        )


def wants_closer_look(candidates: Sequence[BrandCandidate], scan: TextScan) -> bool:
    """Whether the expensive signals (OCR, logo search in crops) are worth running: some brand is a
    candidate already, or the text uses counterfeit vocabulary (then a brand may be in the photos)."""
    return bool(candidates) or any(not h.negated for h in scan.hits)


def _skipped(name: SignalName, why: str | None) -> Signal:
    return Signal(name=name, ran=False, skipped_because=why)


@dataclass(slots=True)
class _Reading:
    """One candidate brand's reading of the listing (or the no-brand reading): the numbers fusion needs.
    Signals and reasons are written only for the reading that is reported (:func:`_explain`)."""

    candidate: BrandCandidate | None
    price: PriceReading | None  # None: the price signal was skipped (``price_skip`` says why)
    price_skip: str | None
    seller: SellerReading | None
    seller_ran: bool
    features: FusionFeatures
    fusion: FusionOutcome


@dataclass(frozen=True, slots=True)
class RiskReading:
    """What :func:`assess_risk` answers: the risk :func:`assess` would report, the brand it reads and
    the verdict policy that applies to it. It also keeps the reading itself, so that :func:`assess` of
    the same inputs can report it without making it again (``prior``)."""

    risk: float
    brand: str | None
    policy: VerdictPolicy
    candidates: tuple[BrandCandidate, ...] = field(default=(), repr=False, compare=False)
    best: _Reading | None = field(default=None, repr=False, compare=False)
    skipped: Mapping[SignalName, str] = field(default_factory=dict, repr=False, compare=False)


def assess(
    facts: ListingFacts,
    matches: Sequence[Match],
    text: TextScan,
    contexts: Mapping[str, BrandContext],
    params: ScoringParams | None = None,
    skipped: Mapping[SignalName, str] | None = None,
    *,
    candidates: Sequence[BrandCandidate] | None = None,
    prior: RiskReading | None = None,
) -> Assessment:
    """Score one listing.

    ``matches``: every copy, lookalike and logo match of its photos; ``text``: :func:`scan_text` of its
    title, description and photo text; ``contexts``: per candidate brand, authorized sellers, market
    prices and policy override (a candidate without one is assessed with nothing known about it);
    ``skipped``: signals the caller did not run, with why (e.g. ``{LOGO: "no candidate brand"}``);
    ``candidates``: :func:`candidate_brands` of these ``matches`` and ``text.mentions`` with
    ``params.visual`` and ``params.brand_evidence``, where the caller has made them already (the cascade
    does, to decide what to run): they are not made again unless ``skipped`` leaves some out;
    ``prior``: :func:`assess_risk`'s answer for these same facts, matches, text, contexts, params and
    candidates (the cascade's preliminary reading, where what the cascade ran added no evidence): its
    reading is reported rather than made again, unless ``skipped`` differs from the prior's in a way that
    changes a reading (a skipped price, seller or text signal, or one that leaves matches out).

    Raises ValueError (naming the field) for invalid prices or seller counts and
    :class:`~service.domain.pricing.UnknownCurrencyError` for a currency the table does not know.
    """
    p = params or ScoringParams()
    skip = dict(skipped or {})
    if prior is not None and prior.best is not None and (
            prior.skipped == skip or _reading_skips(prior.skipped, matches) == _reading_skips(skip, matches)):
        candidates, best = list(prior.candidates), prior.best
    else:
        candidates, best = _best_reading(facts, matches, text, contexts, p, skip, candidates)
    brand = best.candidate.brand if best.candidate else None
    policy = _policy(contexts, brand, p)
    text_sig = _skipped(SignalName.TEXT, skip[SignalName.TEXT]) if SignalName.TEXT in skip else (
        text_signal(text, p.text))
    signals, reasons = _explain(best, facts, matches, text, text_sig, p, skip)
    return Assessment(
        listing_id=facts.listing_id,
        risk=best.fusion.risk,
        verdict=policy.verdict(best.fusion.risk),
        brand=brand,
        signals=signals,
        reasons=reasons,
        candidates=candidates,
        features=best.features,
        fusion=best.fusion,
        policy=policy,
    )


def assess_risk(
    facts: ListingFacts,
    matches: Sequence[Match],
    text: TextScan,
    contexts: Mapping[str, BrandContext],
    params: ScoringParams | None = None,
    skipped: Mapping[SignalName, str] | None = None,
    *,
    candidates: Sequence[BrandCandidate] | None = None,
) -> RiskReading:
    """The risk, brand and policy :func:`assess` would report for the same inputs, without writing its
    signals and reasons: for the cascade's "would this change the verdict?" questions, which ask it
    for hypothetical evidence on every listing. Raises as :func:`assess` does."""
    p = params or ScoringParams()
    skip = dict(skipped or {})
    made, best = _best_reading(facts, matches, text, contexts, p, skip, candidates)
    brand = best.candidate.brand if best.candidate else None
    # (Which of the skips shape the reading is worked out only if ``assess`` is handed it: the cascade's
    # hypothetical readings never are.)
    return RiskReading(best.fusion.risk, brand, _policy(contexts, brand, p), tuple(made), best, skip)


# The signals whose skipping changes a reading whether or not a match has them (a match of a skipped
# signal is not counted either: see _best_reading).
_READ_SIGNALS = (SignalName.TEXT, SignalName.PRICE, SignalName.SELLER)


def _reading_skips(skip: Mapping[SignalName, str], matches: Sequence[Match]) -> frozenset[tuple[SignalName, str]]:
    """The part of ``skip`` a reading depends on: skipped text, price and seller signals (with why: the
    price's reason is part of its reading), and skipped signals some match has (those matches are left
    out). A skipped logo search with no logo match changes nothing read."""
    found = {m.signal for m in matches}
    return frozenset((name, why) for name, why in skip.items() if name in _READ_SIGNALS or name in found)


def _policy(contexts: Mapping[str, BrandContext], brand: str | None, p: ScoringParams) -> VerdictPolicy:
    ctx = contexts.get(brand) if brand else None
    return ctx.policy if ctx is not None and ctx.policy is not None else p.policy


def _best_reading(
    facts: ListingFacts,
    matches: Sequence[Match],
    text: TextScan,
    contexts: Mapping[str, BrandContext],
    p: ScoringParams,
    skip: Mapping[SignalName, str],
    known: Sequence[BrandCandidate] | None = None,
) -> tuple[list[BrandCandidate], _Reading]:
    """The candidate brands and the riskiest reading: each candidate (at most ``max_candidates``) is
    read, or the no-brand reading when there is none. ``known``: the caller's candidates of the same
    matches and mentions (see :func:`assess`). Fusion needs only the text signal's score; its evidence
    and reasons are written by :func:`assess` for the reported reading."""
    if facts.price is not None:  # bad input fails whether or not a price comparison happens
        p.currencies.to_usd(facts.price, "price")
    text_ran = SignalName.TEXT not in skip
    text_score = vocabulary_score(text, p.text) if text_ran else None
    counted = [m for m in matches if m.signal not in skip]
    if known is not None and text_ran and len(counted) == len(matches):
        candidates = list(known)
    else:
        candidates = candidate_brands(counted, text.mentions if text_ran else (), p.visual, p.brand_evidence)
    readings = [_read(facts, text_score, c, contexts.get(c.brand), p, skip)
                for c in candidates[: p.max_candidates]]
    if not readings:
        readings = [_read(facts, text_score, None, None, p, skip)]
    best = max(readings, key=lambda r: r.fusion.risk)  # first (strongest evidence) wins ties
    return candidates, best


def _read(
    facts: ListingFacts,
    text_score: float | None,
    cand: BrandCandidate | None,
    ctx: BrandContext | None,
    p: ScoringParams,
    skip: Mapping[SignalName, str],
) -> _Reading:
    price: PriceReading | None = None
    price_skip: str | None = None
    if SignalName.PRICE in skip:
        price_skip = skip[SignalName.PRICE]
    elif cand is None or cand.product_match is None:
        price_skip = "no candidate product to compare the price with"
    else:
        market = ctx.market_prices.get(cand.sku, ()) if ctx is not None and cand.sku else ()
        price = read_price(facts.price, cand.reference_price, market, p.currencies, p.price)

    seller: SellerReading | None = None
    seller_ran = SignalName.SELLER not in skip
    authorized = None
    if seller_ran:
        authorized_list = ctx.authorized_sellers if ctx is not None else frozenset()
        seller = read_seller(facts.seller, authorized_list, facts.seller_confirmed_counterfeits, p.seller)
        authorized = seller.authorized if seller is not None else None

    features = FusionFeatures(
        brand=cand.evidence if cand else 0.0,
        price=price.score if price is not None and price.ran else 0.0,
        text=text_score if text_score is not None else 0.0,
        seller=seller.score if seller is not None else 0.0,
        authorized=bool(authorized),
    )
    return _Reading(cand, price, price_skip, seller, seller_ran, features, fuse(features, p.weights))


def _explain(
    r: _Reading,
    facts: ListingFacts,
    matches: Sequence[Match],
    text: TextScan,
    text_sig: Signal,
    p: ScoringParams,
    skip: Mapping[SignalName, str],
) -> tuple[list[Signal], list[str]]:
    """The reported reading's signals (in :data:`SIGNAL_ORDER`) and its reasons, most telling first."""
    brand = r.candidate.brand if r.candidate else None
    signals: dict[SignalName, Signal] = {}
    for name in VISUAL_SIGNALS:
        signals[name] = _skipped(name, skip[name]) if name in skip else visual_signal(
            name, matches, p.visual, brand)
    signals[SignalName.TEXT] = text_sig
    signals[SignalName.PRICE] = (explain_price(r.price, p.currencies) if r.price is not None
                                 else _skipped(SignalName.PRICE, r.price_skip))
    signals[SignalName.SELLER] = (explain_seller(r.seller, brand) if r.seller_ran
                                  else _skipped(SignalName.SELLER, skip[SignalName.SELLER]))
    shares = _reasons(r.candidate, signals, text, r.fusion, p, facts, brand)
    ranked = sorted(shares, key=lambda t: -abs(t[0]))
    reasons = list(dict.fromkeys(t for c, t in ranked if abs(c) >= p.min_reason_contribution))
    return [signals[n] for n in SIGNAL_ORDER], reasons[: p.max_reasons]


def _reasons(
    cand: BrandCandidate | None,
    signals: Mapping[SignalName, Signal],
    text: TextScan,
    outcome: FusionOutcome,
    p: ScoringParams,
    facts: ListingFacts,
    brand: str | None,
) -> list[tuple[float, str]]:
    """(share of the logit, sentence) for everything that moved the risk."""
    shares = outcome.contributions
    out: list[tuple[float, str]] = []
    if cand is not None:
        # The brand's share is split over its pieces of evidence in proportion to their weight.
        parts = cand.weighted_components(p.brand_evidence)
        total = sum(parts.values())
        for name in VISUAL_SIGNALS:
            part = parts[name.value]
            sig = signals[name]
            if part > 0.0 and sig.reasons:
                out.append((shares["brand"] * part / total, sig.reasons[0]))
        if parts["mention"] > 0.0:
            share = shares["brand"] * parts["mention"] / total
            out.append((share, mention_reason(cand.brand, cand.mentions)))
    vocab = vocabulary_reason(text)
    if vocab and signals[SignalName.TEXT].ran:
        out.append((shares["text"], vocab))
    out += [(shares["price"], r) for r in signals[SignalName.PRICE].reasons]
    seller_sig = signals[SignalName.SELLER]
    own = authorized_reason(facts.seller.seller_id, brand) if facts.seller else None
    out += [(shares["seller"], r) for r in seller_sig.reasons if r != own]
    if shares["authorized"] < 0.0 and own:
        out.append((shares["authorized"], f"{own} (lowers risk)"))
    return out
