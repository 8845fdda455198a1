"""Detection metrics of a rescan of the benchmark: per track and per edit recall@1, TPR at 1 % FPR of the
relevant similarity and of ``risk``, ROC points, and a reliability table of ``risk``.

Definitions (docs/quality.md repeats them):

recall@1 (any signal)
    the first match of the rescan output (best first, over every signal) names the listing's brand and,
    for products, its sku.
recall@1 (own signal)
    the same for the best match of the track's own signal (copy track: copy, logo: logo, natural:
    lookalike).
similarity TPR at 1 % FPR
    a positive's score is its best similarity on the track's signal *to its own brand/sku* (0 when
    absent: a match to another brand finds nothing); a negative's is its best similarity on that signal
    to anything. The threshold lets through at most 1 % of the negatives (of that split).
flagging TPR at 1 % FPR of risk
    positives: the cheap (15-45 % of the reference price) listings of the product tracks (copy,
    natural); negatives: every negative and every normally priced positive of those tracks.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from scripts.eval.benchmark import SPLITS, TRACK_SIGNAL, Query

FPR = 0.01
PRODUCT_TRACKS = ("copy", "natural")
Result = Mapping[str, Any]
MatchOrder = Callable[[Sequence[Mapping[str, Any]]], list[Mapping[str, Any]]]


def tpr_at_fpr(pos: Sequence[float], neg: Sequence[float], fpr: float = FPR) -> tuple[float | None, float | None]:
    """(TPR, threshold): the threshold lets at most ``fpr`` of the negatives score above it (ties at the
    threshold count as negative decisions), TPR is the fraction of positives strictly above it."""
    if not pos or not neg:
        return None, None
    ranked = sorted(neg, reverse=True)
    k = math.floor(fpr * len(ranked))
    threshold = ranked[k] if k < len(ranked) else -math.inf
    return float(np.mean([p > threshold for p in pos])), float(threshold)


def auc(pos: Sequence[float], neg: Sequence[float]) -> float | None:
    """Area under the ROC curve (probability a positive outscores a negative, ties half)."""
    if not pos or not neg:
        return None
    p = np.asarray(pos, dtype=np.float64)[:, None]
    n = np.asarray(neg, dtype=np.float64)[None, :]
    return float(np.mean((p > n) + 0.5 * (p == n)))


def roc_points(pos: Sequence[float], neg: Sequence[float]) -> list[tuple[float, float]]:
    """(FPR, TPR) at every distinct threshold, for plotting."""
    if not pos or not neg:
        return []
    thresholds = sorted(set(pos) | set(neg), reverse=True)
    p, n = np.asarray(pos), np.asarray(neg)
    return [(0.0, 0.0)] + [(float(np.mean(n >= t)), float(np.mean(p >= t))) for t in thresholds]


def by_similarity(matches: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The rescan's own order (best similarity first over every signal)."""
    return list(matches)


def _first(matches: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    return matches[0] if matches else None


def _correct(match: Mapping[str, Any] | None, q: Query) -> bool:
    if match is None:
        return False
    if match.get("brand") != q.brand:
        return False
    return q.sku is None or match.get("sku") == q.sku


def own_similarity(result: Result | None, q: Query, signal: str) -> float:
    """Best similarity on ``signal`` to the listing's own brand (and sku); 0 if none."""
    if result is None:
        return 0.0
    return max((float(m["similarity"]) for m in result.get("matches", [])
                if m.get("signal") == signal and _correct(m, q)), default=0.0)


def any_similarity(result: Result | None, signal: str) -> float:
    if result is None:
        return 0.0
    return max((float(m["similarity"]) for m in result.get("matches", []) if m.get("signal") == signal),
               default=0.0)


KEYPOINTS = "keypoints"


@dataclass
class Rates:
    """Counts and rates of one group of positives."""

    n: int
    recall_at_1: float | None
    recall_at_1_own_signal: float | None
    recall_at_1_ranked: float | None
    brand_assessed: float | None
    similarity_tpr_at_1fpr: float | None
    similarity_threshold: float | None
    similarity_auc: float | None
    flag_tpr_at_1fpr: float | None  # cheap ones of this group vs the split's flagging negatives
    flagged_review: float | None  # fraction of the group's cheap listings with a verdict other than clear

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def _mean(xs: Iterable[bool]) -> float | None:
    xs = list(xs)
    return float(np.mean(xs)) if xs else None


def evaluate(queries: Sequence[Query], results: Mapping[str, Result], *, suffix: str = "",
             ranked: MatchOrder | None = None, tracks: Sequence[str] | None = None) -> dict[str, Any]:
    """Every metric, per split (``tune``, ``report``), for the listings in ``results`` (ids + suffix).

    ``ranked`` re-orders a result's matches (e.g. by each signal's ramp score) for the extra
    ``recall_at_1_ranked`` column; ``tracks`` limits the evaluation (negatives are always used).
    """
    out: dict[str, Any] = {}
    for split in SPLITS:
        qs = [q for q in queries if q.split == split and (q.listing_id + suffix) in results]
        if tracks is not None:
            qs = [q for q in qs if q.track in tracks or q.track == "negative"]
        if not qs:
            continue
        res = {q.listing_id: results[q.listing_id + suffix] for q in qs}
        out[split] = _evaluate_split(qs, res, ranked)
    return out


def _evaluate_split(qs: Sequence[Query], res: Mapping[str, Result], ranked: MatchOrder | None) -> dict[str, Any]:
    negatives = [q for q in qs if q.track == "negative"]
    neg_sim = {signal: [any_similarity(res[q.listing_id], signal) for q in negatives]
               for signal in {*TRACK_SIGNAL.values(), KEYPOINTS}}
    product_pos = [q for q in qs if q.track in PRODUCT_TRACKS]
    flag_neg = [float(res[q.listing_id]["risk"]) for q in negatives] + [
        float(res[q.listing_id]["risk"]) for q in product_pos if not q.cheap]

    def rates(group: Sequence[Query], signal: str) -> Rates:
        firsts = [_first(res[q.listing_id].get("matches", [])) for q in group]
        own = [next((m for m in res[q.listing_id].get("matches", []) if m.get("signal") == signal), None)
               for q in group]
        rk = ([_first(ranked(res[q.listing_id].get("matches", []))) for q in group]
              if ranked is not None else None)
        pos = [own_similarity(res[q.listing_id], q, signal) for q in group]
        tpr, thr = tpr_at_fpr(pos, neg_sim[signal])
        cheap = [q for q in group if q.cheap]
        ftpr, _ = tpr_at_fpr([float(res[q.listing_id]["risk"]) for q in cheap], flag_neg)
        return Rates(
            n=len(group),
            recall_at_1=_mean(_correct(m, q) for m, q in zip(firsts, group, strict=True)),
            recall_at_1_own_signal=_mean(_correct(m, q) for m, q in zip(own, group, strict=True)),
            recall_at_1_ranked=(_mean(_correct(m, q) for m, q in zip(rk, group, strict=True))
                                if rk is not None else None),
            brand_assessed=_mean(res[q.listing_id].get("brand") == q.brand for q in group),
            similarity_tpr_at_1fpr=tpr, similarity_threshold=thr,
            similarity_auc=auc(pos, neg_sim[signal]),
            flag_tpr_at_1fpr=ftpr if cheap else None,
            flagged_review=_mean(res[q.listing_id].get("verdict") != "clear" for q in cheap),
        )

    tracks: dict[str, Any] = {}
    edits: dict[str, Any] = {}
    for track, signal in TRACK_SIGNAL.items():
        group = [q for q in qs if q.track == track]
        if not group:
            continue
        tracks[track] = rates(group, signal).as_dict() | {"signal": signal}
        # The keypoints signal finds every track's references too (products and logos): its own rows.
        tracks[f"{track} / {KEYPOINTS}"] = rates(group, KEYPOINTS).as_dict() | {"signal": KEYPOINTS}
        if track == "copy":
            for variant in sorted({q.variant for q in group}):
                edits[variant] = rates([q for q in group if q.variant == variant], signal).as_dict()

    flag_pos = [float(res[q.listing_id]["risk"]) for q in product_pos if q.cheap]
    ftpr, fthr = tpr_at_fpr(flag_pos, flag_neg)
    flagging = {
        "positives": len(flag_pos), "negatives": len(flag_neg), "tpr_at_1fpr": ftpr, "threshold": fthr,
        "auc": auc(flag_pos, flag_neg),
        "negatives_flagged_review": _mean(res[q.listing_id].get("verdict") != "clear" for q in negatives),
        "normal_positives_flagged_review": _mean(res[q.listing_id].get("verdict") != "clear"
                                                 for q in product_pos if not q.cheap),
        "cheap_positives_flagged_review": _mean(res[q.listing_id].get("verdict") != "clear"
                                                for q in product_pos if q.cheap),
    }
    negs = {
        "n": len(negatives),
        "by_variant": {v: sum(1 for q in negatives if q.variant == v) for v in sorted({q.variant for q in negatives})},
        "max_similarity": {s: (round(max(v), 4) if v else None) for s, v in neg_sim.items()},
        "p99_similarity": {s: (round(float(np.quantile(v, 0.99)), 4) if v else None) for s, v in neg_sim.items()},
        "flagged_review": flagging["negatives_flagged_review"],
    }
    return {"tracks": tracks, "edits": edits, "flagging": flagging, "negatives": negs,
            "reliability": reliability([float(res[q.listing_id]["risk"]) for q in product_pos if q.cheap],
                                       flag_neg),
            "scores": _scores(qs, res, neg_sim)}


def reliability(pos: Sequence[float], neg: Sequence[float],
                edges: Sequence[float] = (0.0, 0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 1.0001)) -> list[dict[str, Any]]:
    """Per risk bin: how many listings and which fraction of them are flagging positives (cheap
    copies/lookalikes). A calibrated risk has that fraction near the bin's mean risk (given this
    benchmark's mix of positives and negatives)."""
    rows = []
    for lo, hi in itertools.pairwise(edges):
        p = [x for x in pos if lo <= x < hi]
        n = [x for x in neg if lo <= x < hi]
        total = len(p) + len(n)
        rows.append({"bin": f"{lo:.1f}-{min(hi, 1.0):.1f}", "n": total,
                     "mean_risk": round(float(np.mean(p + n)), 4) if total else None,
                     "positive_fraction": round(len(p) / total, 4) if total else None})
    return rows


def _scores(qs: Sequence[Query], res: Mapping[str, Result], neg_sim: Mapping[str, list[float]]) -> dict[str, Any]:
    """Raw per-listing scores, for plots and for checking a metric by hand."""
    out: dict[str, Any] = {"negative": {s: v for s, v in neg_sim.items()}}
    for track, signal in TRACK_SIGNAL.items():
        group = [q for q in qs if q.track == track]
        if group:
            out[track] = [own_similarity(res[q.listing_id], q, signal) for q in group]
    product = [q for q in qs if q.track in PRODUCT_TRACKS]
    out["risk_cheap"] = [float(res[q.listing_id]["risk"]) for q in product if q.cheap]
    out["risk_other"] = [float(res[q.listing_id]["risk"]) for q in product if not q.cheap] + [
        float(res[q.listing_id]["risk"]) for q in qs if q.track == "negative"]
    return out


def ramp_order(floors: Mapping[str, tuple[float, float]]) -> MatchOrder:
    """Matches ordered by how certain each is on its own signal's ramp (then similarity): a copy at 0.6
    (past the copy floor) before a lookalike at 0.7 (barely past the lookalike floor)."""

    def score(m: Mapping[str, Any]) -> tuple[float, float]:
        lo, hi = floors.get(str(m.get("signal")), (0.0, 1.0))
        s = float(m["similarity"])
        return (min(1.0, max(0.0, (s - lo) / (hi - lo))), s)

    def order(matches: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        return sorted(matches, key=score, reverse=True)

    return order
