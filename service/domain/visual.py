"""The visual signals: copy (re-used official photo), lookalike (same product), logo (brand mark in a
crop) and keypoints (local features of a reference found in the photo under one geometric transform),
each turned from raw similarities into a score in [0, 1] with the best match as evidence.

Photos are numbered from 1 in reasons (people read them) and by their 0-based ``image_index`` in
evidence (machines read it, as in :meth:`Match.as_contract`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from service.domain.curves import ramp
from service.domain.model import Match, ReferenceInfo, ReferenceKind, Signal, SignalName

VISUAL_SIGNALS: tuple[SignalName, ...] = (SignalName.COPY, SignalName.LOOKALIKE, SignalName.LOGO,
                                          SignalName.KEYPOINTS)

KEYPOINT_HALF = 20
"""Inliers at which a keypoint match's similarity is 0.5: ``similarity = inliers / (inliers + 20)``.

A keypoint match is counted in geometrically consistent feature matches (inliers), not a cosine; this
maps the count onto [0, 1) so matches of every signal share one "similarity, best first" field."""


def keypoint_similarity(inliers: int) -> float:
    """The similarity reported for a keypoint match of ``inliers`` consistent feature matches."""
    if inliers < 0:
        raise ValueError(f"inliers must be >= 0, got {inliers}")
    return inliers / (inliers + KEYPOINT_HALF)


def keypoint_inliers(similarity: float) -> int:
    """The inverse of :func:`keypoint_similarity` (for reasons people read)."""
    s = min(max(similarity, 0.0), 0.999)
    return round(KEYPOINT_HALF * s / (1.0 - s))


@dataclass(frozen=True, slots=True)
class SimilarityRamp:
    """A similarity below ``floor`` counts for nothing; at ``certain`` and above it is certain."""

    floor: float
    certain: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.floor) and math.isfinite(self.certain)) or self.floor >= self.certain:
            raise ValueError(f"similarity ramp needs floor < certain, got {self.floor} and {self.certain}")

    def score(self, similarity: float) -> float:
        return ramp(similarity, self.floor, self.certain)


@dataclass(frozen=True, slots=True)
class VisualThresholds:
    """Where each visual signal starts to count and where it is certain (``ScoringSettings`` fills it).

    Defaults are those of ``ScoringSettings``: SSCD copy similarities are low for unrelated photos
    (~0.1) and high for edited copies (>0.7); semantic similarities are high even between different
    products of one category, hence the higher lookalike floor.
    """

    copy: SimilarityRamp = field(default_factory=lambda: SimilarityRamp(0.30, 0.60))
    lookalike: SimilarityRamp = field(default_factory=lambda: SimilarityRamp(0.45, 0.85))
    logo: SimilarityRamp = field(default_factory=lambda: SimilarityRamp(0.30, 0.50))
    # 10 inliers (0.333) start to count, 20 (0.5) are certain: unrelated photos reach 4-5 (docs/quality.md).
    keypoints: SimilarityRamp = field(default_factory=lambda: SimilarityRamp(0.333, 0.50))

    def for_signal(self, name: SignalName) -> SimilarityRamp:
        if name is SignalName.COPY:
            return self.copy
        if name is SignalName.LOOKALIKE:
            return self.lookalike
        if name is SignalName.LOGO:
            return self.logo
        if name is SignalName.KEYPOINTS:
            return self.keypoints
        raise ValueError(f"{name.value!r} is not a visual signal")


def match_score(match: Match, thresholds: VisualThresholds) -> float:
    """How certain one match is, in [0, 1], on the ramp of its own signal."""
    return thresholds.for_signal(match.signal).score(match.similarity)


def describe_reference(ref: ReferenceInfo) -> str:
    """"SKU-1 (ref r-12)", falling back to the catalog image id when the brand gave no names."""
    label = ref.sku or ref.title or f"image {ref.image_id}"
    return f"{label} (ref {ref.ref_id})" if ref.ref_id else label


def match_reason(match: Match) -> str:
    """One sentence a reviewer can check by opening the two photos."""
    ref = match.reference
    photo = f"photo {match.image_index + 1}"
    sim = f"similarity {match.similarity:.2f}"
    if match.signal is SignalName.COPY:
        return f"{photo} is a copy of {ref.brand}'s official photo {describe_reference(ref)}, {sim}"
    if match.signal is SignalName.LOOKALIKE:
        return f"{photo} shows a product like {ref.brand}'s {describe_reference(ref)}, {sim}"
    where = f" at {list(match.box)}" if match.box is not None else ""
    if match.signal is SignalName.KEYPOINTS:
        what = "logo" if ref.kind is ReferenceKind.LOGO else "official photo"
        return (f"{photo} shows {ref.brand}'s {what} {describe_reference(ref)}{where}: "
                f"{keypoint_inliers(match.similarity)} keypoints agree on one geometric transform, {sim}")
    how = " by its shape and colour" if match.method == "template" else ""
    return f"{ref.brand}'s logo {describe_reference(ref)} found in {photo}{where}{how}, {sim}"


def visual_signal(
    name: SignalName,
    matches: Iterable[Match],
    thresholds: VisualThresholds,
    brand: str | None = None,
) -> Signal:
    """The ``name`` signal from the matches of that kind (others are ignored), limited to ``brand``
    when given: score of the best match on the signal's ramp, that match as evidence.

    The best match alone decides (not a count of matching photos): one re-used official photo is as
    telling as three, and listings with many photos must not score higher for that alone.
    """
    ramp_ = thresholds.for_signal(name)
    own = [m for m in matches if m.signal is name and (brand is None or m.reference.brand == brand)]
    sig = Signal(name=name)
    sig.evidence = {"matches": len(own), "floor": ramp_.floor, "certain": ramp_.certain}
    if not own:
        return sig
    best = max(own, key=lambda m: (m.similarity, -m.image_index))
    sig.score = ramp_.score(best.similarity)
    sig.evidence["best"] = best.as_contract()
    sig.evidence["images"] = sorted({m.image_index for m in own if ramp_.score(m.similarity) > 0.0})
    if sig.score > 0.0:
        sig.reasons.append(match_reason(best))
    return sig
