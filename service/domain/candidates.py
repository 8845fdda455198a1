"""Candidate brands: which brand's product a listing presents, from its visual matches and the brands
its texts name, with how strong that evidence is.

This is the first half of "counterfeit = presents brand X's product AND something is off"; the
strength (``BrandCandidate.evidence``) is the brand-evidence feature of fusion. It is cheap (no OCR, no
logo search needed), so the score use case can also call it early to decide whether the expensive
signals are worth running.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from service.domain.curves import noisy_or, require_fraction
from service.domain.model import Match, Money, ReferenceKind, SignalName
from service.domain.textmatch import DESCRIPTION, TITLE, BrandMention
from service.domain.visual import VISUAL_SIGNALS, VisualThresholds, match_score


@dataclass(frozen=True, slots=True)
class BrandEvidenceWeights:
    """How much each kind of evidence, when certain, says "this listing presents the brand's product".

    A re-used official photo (copy) is proof; a logo nearly so; a lookalike may be a similar product
    of another maker; a brand named in the title or printed in a photo is a claim, in the description
    often keyword stuffing ("fits Acme, Beta, Gamma"). The pieces are combined by noisy-OR.
    """

    copy: float = 1.0
    logo: float = 0.9
    # The photo shows the reference's printed design (packaging, label, logo) under one geometric
    # transform: the brand's product or a copy of it, nearly as telling as a re-used photo.
    keypoints: float = 0.95
    lookalike: float = 0.8
    mention_title: float = 0.7
    mention_photo: float = 0.7
    mention_description: float = 0.5

    def __post_init__(self) -> None:
        for name in ("copy", "logo", "keypoints", "lookalike", "mention_title", "mention_photo", "mention_description"):
            require_fraction(f"brand evidence weights {name}", getattr(self, name))

    def for_signal(self, name: SignalName) -> float:
        return {SignalName.COPY: self.copy, SignalName.LOGO: self.logo, SignalName.KEYPOINTS: self.keypoints,
                SignalName.LOOKALIKE: self.lookalike}.get(name, 0.0)

    def for_mention(self, where: str) -> float:
        if where == TITLE:
            return self.mention_title
        if where == DESCRIPTION:
            return self.mention_description
        return self.mention_photo


@dataclass(frozen=True, slots=True)
class BrandCandidate:
    """One brand a listing may present, with its evidence.

    ``copy``/``lookalike``/``logo``/``keypoints`` are the best match scores of the brand on each signal's ramp and
    ``mention`` the strongest weighted text mention; ``evidence`` is their weighted noisy-OR.
    ``product_match`` is the brand's best product match (copy, lookalike or keypoints): its reference tells the
    product (``sku``) and the ``reference_price`` the price signal compares with.
    """

    brand: str
    evidence: float
    copy: float = 0.0
    lookalike: float = 0.0
    logo: float = 0.0
    keypoints: float = 0.0
    mention: float = 0.0
    product_match: Match | None = None
    mentions: tuple[BrandMention, ...] = field(default_factory=tuple)

    @property
    def sku(self) -> str | None:
        return self.product_match.reference.sku if self.product_match else None

    @property
    def reference_price(self) -> Money | None:
        return self.product_match.reference.reference_price if self.product_match else None

    def weighted_components(self, weights: BrandEvidenceWeights) -> dict[str, float]:
        """Each piece of evidence after its weight (the terms of the noisy-OR), by signal name."""
        terms = _weighted_terms(weights, self.copy, self.lookalike, self.logo, self.keypoints, self.mention)
        return dict(zip(_COMPONENTS, terms, strict=True))


_COMPONENTS = (SignalName.COPY.value, SignalName.LOOKALIKE.value, SignalName.LOGO.value,
               SignalName.KEYPOINTS.value, "mention")


def _weighted_terms(w: BrandEvidenceWeights, copy: float, lookalike: float, logo: float, keypoints: float,
                    mention: float) -> tuple[float, float, float, float, float]:
    """The terms of a candidate's noisy-OR, in :data:`_COMPONENTS` order: its evidence and the split of
    its share in the reasons both come from here."""
    return (w.copy * copy, w.lookalike * lookalike, w.logo * logo, w.keypoints * keypoints, mention)


def candidate_brands(
    matches: Iterable[Match],
    mentions: Sequence[BrandMention] = (),
    thresholds: VisualThresholds | None = None,
    weights: BrandEvidenceWeights | None = None,
) -> list[BrandCandidate]:
    """Every brand with some evidence (> 0), strongest first (ties by brand slug, for stable output).

    Matches below their signal's floor are no evidence; text mentions count by where they were seen.
    """
    th = thresholds or VisualThresholds()
    w = weights or BrandEvidenceWeights()
    best: dict[str, dict[SignalName, float]] = {}
    product: dict[str, tuple[float, int, float, Match]] = {}
    for m in matches:
        if m.signal not in VISUAL_SIGNALS:
            raise ValueError(f"match signal must be one of {[s.value for s in VISUAL_SIGNALS]}, "
                             f"got {m.signal.value!r}")
        s = match_score(m, th)
        if s <= 0.0:
            continue
        per = best.setdefault(m.reference.brand, {})
        per[m.signal] = max(per.get(m.signal, 0.0), s)
        if m.signal is not SignalName.LOGO and m.reference.kind is ReferenceKind.PRODUCT:
            # The product is told by the strongest weighted product match; a copy or a keypoint match
            # beats a lookalike of equal strength because it names the exact catalog photo.
            rank = (w.for_signal(m.signal) * s, int(m.signal is not SignalName.LOOKALIKE), m.similarity, m)
            if m.reference.brand not in product or rank[:3] > product[m.reference.brand][:3]:
                product[m.reference.brand] = rank
    by_brand_mentions: dict[str, list[BrandMention]] = {}
    for mention in mentions:
        by_brand_mentions.setdefault(mention.brand, []).append(mention)

    out: list[BrandCandidate] = []
    for brand in set(best) | set(by_brand_mentions):
        per = best.get(brand, {})
        brand_mentions = tuple(by_brand_mentions.get(brand, ()))
        copy = per.get(SignalName.COPY, 0.0)
        lookalike = per.get(SignalName.LOOKALIKE, 0.0)
        logo = per.get(SignalName.LOGO, 0.0)
        keypoints = per.get(SignalName.KEYPOINTS, 0.0)
        said = max((w.for_mention(x.where) for x in brand_mentions), default=0.0)
        # (No throwaway candidate is built to ask its weighted_components: candidates are made for every
        # listing, several times by the cascade.)
        evidence = noisy_or(_weighted_terms(w, copy, lookalike, logo, keypoints, said))
        if evidence > 0.0:
            out.append(BrandCandidate(
                brand=brand, evidence=evidence, copy=copy, lookalike=lookalike, logo=logo, keypoints=keypoints,
                mention=said, product_match=product[brand][3] if brand in product else None,
                mentions=brand_mentions,
            ))
    out.sort(key=lambda c: (-c.evidence, c.brand))
    return out



def one_product_per_photo(matches: Iterable[Match], margin: float = 0.0) -> list[Match]:
    """The matches that count as brand evidence: per photo and signal, only the product matches within
    ``margin`` of that photo's best product match on the signal; matches to logos all stay.

    One photo shows one product, so a weaker match of the same photo to *another* brand's product (a
    carton of another dairy) is the nearest wrong answer, not evidence that the listing presents that
    brand too. Measured (docs/quality.md): without this rule 9.4 % of normally priced copies were sent to
    review, because the weaker match made them look cheap against the other product's price.
    """
    ms = list(matches)
    best: dict[tuple[int, SignalName], float] = {}

    def of_logo(m: Match) -> bool:
        return m.signal is SignalName.LOGO or m.reference.kind is ReferenceKind.LOGO

    for m in ms:
        if not of_logo(m):
            key = (m.image_index, m.signal)
            best[key] = max(best.get(key, -1.0), m.similarity)
    return [m for m in ms if of_logo(m) or m.similarity >= best[(m.image_index, m.signal)] - margin]
