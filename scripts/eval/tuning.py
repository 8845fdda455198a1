"""Choosing scoring defaults by data: similarity ramps and fusion weights, fitted on the ``tune`` split and
reported on both.

The features of a scored listing are not in the rescan output, so the listings are scored once more in
this process through the same composition root (:func:`service.container.build_container`) on a copy of
the rescan's data dir (every photo and crop embedding is in its cache by then, so no model runs), with
a tap on :func:`service.usecases.scoring.assess` that keeps its exact inputs (facts, matches, text,
brand contexts, skipped signals). :func:`assess` is pure, so any ramps or weights can then be tried on
those inputs in microseconds: a candidate setting is what ``assess`` would have answered with it.
(Limits: the cascade's decision to run the logo search in crops was taken with the rescan's ramps;
market prices are those of the whole rescan's history, not of the listings before each one.)
"""

from __future__ import annotations

import dataclasses
import shutil
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from scripts.eval.benchmark import SPLITS, Benchmark, Query
from scripts.eval.metrics import PRODUCT_TRACKS, auc, evaluate, ramp_order, tpr_at_fpr
from scripts.eval.runner import DataDir, RescanRun
from service.domain.assessment import Assessment, ScoringParams, assess
from service.domain.candidates import one_product_per_photo
from service.domain.fusion import FEATURE_NAMES, FusionWeights, sigmoid
from service.domain.visual import SimilarityRamp, VisualThresholds

# Only these coefficients (and the bias) are fitted. Text, seller and authorization never vary in this
# benchmark (generic titles, unknown sellers, no authorized lists); the price main effect is held at its
# default because fusion's design says an anomaly without brand evidence stays clear, and a free fit
# learns the opposite from negatives whose only "brand" is a weak lookalike.
FITTED: tuple[str, ...] = ("brand", "brand_x_price")


@dataclass
class Captured:
    """The exact inputs :func:`assess` got for one listing."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def assess(self, params: ScoringParams, exclusive: float | None = None) -> Assessment:
        """``assess`` again with other params; ``exclusive`` applies :func:`one_product_per_photo`."""
        facts, matches, text, contexts = self.args[:4]
        skipped = self.kwargs.get("skipped", self.args[5] if len(self.args) > 5 else None)
        if exclusive is not None:
            matches = one_product_per_photo(matches, exclusive)
        return assess(facts, matches, text, contexts, params, skipped)


def capture(bench: Benchmark, data: DataDir, settings: Any, queries: Sequence[Query]) -> dict[str, Captured]:
    """Score ``queries`` in this process (nothing persisted) and keep what ``assess`` was called with."""
    from unittest import mock

    import service.usecases.scoring as scoring
    from service.container import build_container
    from service.usecases.rescan import ListingRescanner
    from service.usecases.rescan_io import iter_raw_rows, parse_row

    s = settings.model_copy(update={"data_dir": data.path})
    container = build_container(s)
    taken: dict[str, Captured] = {}
    lock = threading.Lock()

    def tap(*args: Any, **kwargs: Any) -> Assessment:
        with lock:
            taken[args[0].listing_id] = Captured(args, kwargs)
        return assess(*args, **kwargs)

    wanted = {q.listing_id for q in queries}
    # The scorer calls the name ``assess`` of its own module: replacing it there taps every call.
    with mock.patch.object(scoring, "assess", new=tap):
        try:
            rescanner = ListingRescanner(container.scorer, container.images, bench.listings.parent,
                                         persist=False)
            for raw in iter_raw_rows(bench.listings):
                row = parse_row(raw)
                if row.listing_id in wanted:
                    outcome = rescanner.rescan(row)
                    if outcome.error is not None:
                        raise RuntimeError(f"in-process rescoring failed: {outcome.error}")
        finally:
            container.close()
    return taken


def params_with(base: ScoringParams, ramps: Mapping[str, tuple[float, float]] | None = None,
                weights: FusionWeights | None = None) -> ScoringParams:
    p = base
    if ramps is not None:
        p = dataclasses.replace(p, visual=VisualThresholds(
            SimilarityRamp(*ramps["copy"]), SimilarityRamp(*ramps["lookalike"]), SimilarityRamp(*ramps["logo"])))
    if weights is not None:
        p = dataclasses.replace(p, weights=weights)
    return p


def results_under(captured: Mapping[str, Captured], matches: Mapping[str, Mapping[str, Any]],
                  params: ScoringParams, exclusive: float | None = None) -> dict[str, dict[str, Any]]:
    """Rescan-shaped results (matches from the rescan, risk/verdict/brand re-assessed under ``params``)."""
    out = {}
    for lid, cap in captured.items():
        a = cap.assess(params, exclusive)
        out[lid] = {"listing_id": lid, "risk": a.risk, "verdict": a.verdict.value, "brand": a.brand,
                    "matches": matches[lid]["matches"] if lid in matches else []}
    return out


def _flag_sets(queries: Sequence[Query], split: str) -> tuple[list[str], list[str]]:
    pos = [q.listing_id for q in queries if q.split == split and q.track in PRODUCT_TRACKS and q.cheap]
    neg = [q.listing_id for q in queries if q.split == split and (
        q.track == "negative" or (q.track in PRODUCT_TRACKS and not q.cheap))]
    return pos, neg


def flag_score(captured: Mapping[str, Captured], queries: Sequence[Query], split: str,
               params: ScoringParams, exclusive: float | None = None) -> tuple[float, float, float]:
    """How well ``params`` flag on a split, as a tuple compared in order: risk TPR at 1 % FPR, minus the
    fraction of negatives (and normally priced positives) sent to review, AUC.

    The second term is there because with ~100 negatives TPR at 1 % FPR moves in steps of a whole
    listing and is capped by positives that have no brand evidence at all; what a reviewer sees (false
    reviews at the policy's threshold) then decides."""
    pos_ids, neg_ids = _flag_sets(queries, split)
    risk = {lid: captured[lid].assess(params, exclusive).risk for lid in (*pos_ids, *neg_ids) if lid in captured}
    pos = [risk[i] for i in pos_ids if i in risk]
    neg = [risk[i] for i in neg_ids if i in risk]
    tpr, _ = tpr_at_fpr(pos, neg)
    false_review = float(np.mean([r >= params.policy.review_threshold for r in neg])) if neg else 0.0
    return (tpr or 0.0), -false_review, (auc(pos, neg) or 0.0)


Ramps = dict[str, tuple[float, float]]

RAMP_GRIDS: dict[str, list[tuple[float, float]]] = {
    "copy": [(f, c) for f in (0.25, 0.3, 0.35, 0.4, 0.45, 0.5) for c in (0.6, 0.65, 0.7, 0.75, 0.8)],
    "lookalike": [(f, c) for f in (0.45, 0.5, 0.55, 0.6, 0.65, 0.7) for c in (0.8, 0.85, 0.9, 0.95)],
    "logo": [(f, c) for f in (0.25, 0.3, 0.35, 0.4, 0.45) for c in (0.45, 0.5, 0.55, 0.6, 0.7) if f < c],
}


def search_ramps(captured: Mapping[str, Captured], queries: Sequence[Query], base: ScoringParams,
                 start: Mapping[str, tuple[float, float]], exclusive: float | None = None,
                 ) -> tuple[Ramps, list[dict[str, Any]]]:
    """Coordinate search of (floor, certain) per visual signal on the tune split: best risk TPR at 1 % FPR,
    then AUC; a candidate must beat the current value strictly (defaults do not move without evidence)."""
    current = dict(start)
    trail: list[dict[str, Any]] = []
    for _ in range(2):
        for signal, grid in RAMP_GRIDS.items():
            best = (flag_score(captured, queries, SPLITS[0], params_with(base, current), exclusive), current[signal])
            for cand in grid:
                trial = current | {signal: cand}
                score = flag_score(captured, queries, SPLITS[0], params_with(base, trial), exclusive)
                if score > best[0]:
                    best = (score, cand)
            current[signal] = best[1]
            trail.append({"signal": signal, "chosen": best[1], "tune_tpr": best[0][0],
                          "tune_false_review": -best[0][1], "tune_auc": best[0][2]})
    return current, trail


def fit_weights(captured: Mapping[str, Captured], queries: Sequence[Query], params: ScoringParams,
                exclusive: float | None = None, l2: float = 0.01) -> FusionWeights:
    """Logistic regression of "cheap copy/lookalike" on the fusion features of the tune split, with the
    signs fusion requires (anomaly and interaction weights >= 0); features that never vary here keep
    their default weights. Classes are weighted equally, so the bias does not echo this benchmark's mix."""
    from scipy.optimize import minimize

    pos_ids, neg_ids = _flag_sets(queries, SPLITS[0])
    rows, ys = [], []
    for lid, label in [(i, 1.0) for i in pos_ids] + [(i, 0.0) for i in neg_ids]:
        if lid in captured:
            rows.append(captured[lid].assess(params, exclusive).features.vector())
            ys.append(label)
    x = np.asarray(rows)
    y = np.asarray(ys)
    idx = [FEATURE_NAMES.index(n) for n in FITTED]
    fixed = params.weights.vector()
    w = np.where(y == 1, 0.5 / max(1.0, y.sum()), 0.5 / max(1.0, (1 - y).sum()))

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        coef = fixed.copy()
        coef[idx] = theta[1:]
        z = theta[0] + x @ coef
        p = 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))
        eps = 1e-9
        ll = -np.sum(w * (y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps))) + l2 * np.sum(theta[1:] ** 2)
        g_z = w * (p - y)
        grad = np.concatenate([[g_z.sum()], (x[:, idx] * g_z[:, None]).sum(axis=0) + 2 * l2 * theta[1:]])
        return float(ll), grad

    theta0 = np.concatenate([[params.weights.bias], fixed[idx]])
    bounds = [(-20.0, 5.0)] + [(0.0, 30.0)] * len(idx)
    res = minimize(loss, theta0, jac=True, method="L-BFGS-B", bounds=bounds)
    coef = fixed.copy()
    coef[idx] = res.x[1:]
    return FusionWeights.from_vector(float(res.x[0]), coef.tolist())


def tune(bench: Benchmark, data: DataDir, run: RescanRun, settings: Any, console: Console) -> dict[str, Any]:
    """Choices made on ``tune``, every split evaluated before and after (in-process replay):
    the one-product-per-photo rule and its margin, then the ramps, then the fusion weights."""
    from service.container import scoring_params

    copy = data.snapshot(data.path.parent.parent / "tuning" / "data")
    queries = bench.queries
    with console.status("re-scoring the benchmark in-process for its fusion features..."):
        captured = capture(bench, copy, settings, queries)
    shutil.rmtree(copy.path.parent, ignore_errors=True)
    base = scoring_params(settings)
    s = settings.scoring
    start: Ramps = {"copy": (s.copy_floor, s.copy_certain), "lookalike": (s.lookalike_floor, s.lookalike_certain),
                    "logo": (s.logo_floor, s.logo_certain)}
    margins = {m: flag_score(captured, queries, SPLITS[0], base, m) for m in (0.0, 0.02, 0.05, 0.1, 0.2)}
    none = flag_score(captured, queries, SPLITS[0], base, None)
    margin = max(margins, key=lambda m: (margins[m], -m))
    exclusive = margin if margins[margin] > none else None
    chosen, trail = search_ramps(captured, queries, base, start, exclusive)
    with_ramps = params_with(base, chosen)
    weights = fit_weights(captured, queries, with_ramps, exclusive)
    after = params_with(with_ramps, weights=weights)
    configs: dict[str, tuple[ScoringParams, Ramps, float | None]] = {
        "current defaults": (base, start, None),
        f"one product per photo (margin {margin})": (base, start, margin),
        "+ ramps tuned": (with_ramps, chosen, exclusive),
        "+ fitted weights": (after, chosen, exclusive),
    }
    out: dict[str, Any] = {
        "exclusive_margin": exclusive, "margin_search": {str(k): v for k, v in margins.items()},
        "margin_none": none, "ramps": chosen, "ramp_search": trail, "weights": weights.as_dict(),
        "default_weights": FusionWeights().as_dict(), "configs": {}, "replayed": len(captured)}
    for name, (params, rmp, excl) in configs.items():
        res = results_under(captured, run.results, params, excl)
        metrics = evaluate(queries, res, ranked=ramp_order(rmp))
        out["configs"][name] = {split: {"flagging": m["flagging"], "reliability": m["reliability"],
                                        "brand_assessed": {t: r["brand_assessed"] for t, r in m["tracks"].items()}}
                                for split, m in metrics.items()}
    out["risk_examples"] = _examples(after)
    return out


def _examples(params: ScoringParams) -> dict[str, float]:
    """What the fitted weights say about a few typical listings (compare FusionWeights' docstring)."""
    w = params.weights

    def risk(b: float, p: float) -> float:
        return round(sigmoid(w.bias + w.brand * b + w.price * p + w.brand_x_price * b * p), 4)

    return {"perfect copy, normal price": risk(1, 0), "perfect copy at 30% of the reference": risk(1, 1),
            "perfect copy at 50% of the reference": risk(1, 0.5), "no brand evidence, 10% price": risk(0, 1),
            "half-certain lookalike at 30%": risk(0.5, 1)}


def print_tuning(console: Console, tuning: Mapping[str, Any], splits: Sequence[str]) -> None:
    t = Table("configuration", "split", "risk TPR@1%FPR", "threshold", "AUC", "cheap flagged", "normal flagged",
              "negatives flagged", title="tuning (in-process replay of the same listings)", title_justify="left")
    for name, per in tuning["configs"].items():
        for split in splits:
            if split not in per:
                continue
            f = per[split]["flagging"]
            t.add_row(name, split, _f(f["tpr_at_1fpr"]), _f(f["threshold"]), _f(f["auc"]),
                      _f(f["cheap_positives_flagged_review"]), _f(f["normal_positives_flagged_review"]),
                      _f(f["negatives_flagged_review"]))
    console.print(t)
    console.print(f"ramps chosen on tune: {tuning['ramps']}")
    console.print("fitted weights: " + ", ".join(f"{k}={v:.3g}" for k, v in tuning["weights"].items()))
    console.print("fitted risk of typical listings: " + ", ".join(f"{k}: {v}" for k, v in
                                                                  tuning["risk_examples"].items()))
    for name, per in tuning["configs"].items():
        for split in splits:
            if split in per:
                rel = " | ".join(f"{r['bin']}: n={r['n']} pos={_f(r['positive_fraction'], 2)}"
                                 for r in per[split]["reliability"] if r["n"])
                console.print(f"reliability {name} / {split}: {rel}")


def _f(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


__all__ = ["Captured", "capture", "fit_weights", "print_tuning", "search_ramps", "tune"]
