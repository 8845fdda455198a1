"""Probes of changes that no setting can switch on, measured on an evaluated benchmark (``--work`` of an
earlier run: its labels and its main data dir with the catalog imported): the evidence behind the
proposals in docs/quality.md.

``crop-copy``
    Search the crops the logo search already embeds (the logo model is the copy model by default) in the
    copy index of product photos too: does a product pasted onto a new background, or framed in a
    screenshot, become a copy match, and do negatives rise?
``logo``
    Logo detection by model and crop grid: each listing's crops (and the whole photo) against every
    catalog logo's index variants, straight from the model registry (no cascade, no thresholds).

Both embed every crop of every listing they look at, so they take minutes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from scripts.eval.benchmark import SPLITS, Query, load_labels
from scripts.eval.metrics import tpr_at_fpr
from service.domain.model import ReferenceKind
from service.usecases.matching import CropGrid, logo_variants


def _pixels(bench_dir: Path, q: Query) -> np.ndarray:
    with Image.open(bench_dir / "listings" / q.image) as im:
        return np.asarray(im.convert("RGB"))


def _crops(px: np.ndarray, grid: CropGrid) -> list[np.ndarray]:
    return [px] + [np.ascontiguousarray(c) for _, c in grid.crops(px)]


def crop_copy(work: Path, bench_name: str, settings: Any, grid: CropGrid,
              edits: Sequence[str] = ("background", "screenshot", "crop", "text_overlay")) -> dict[str, Any]:
    """Per split and edit: copy TPR at 1 % FPR and top-1 (right sku) of the whole photo alone and of the
    whole photo plus its crops, against negatives scored the same way."""
    from service.container import build_container

    bench_dir = work / bench_name
    queries = load_labels(bench_dir / "labels.jsonl")
    c = build_container(settings.model_copy(update={"data_dir": work / "runs" / "main" / "data"}), reconcile=False)
    try:
        emb = c.embedders[c.roles.copy]
        index = c.indexes.open(c.roles.copy, ReferenceKind.PRODUCT, model_id=emb.model_id, dim=emb.embedder.dim)
        refs = c.catalog_repo.references(set(range(1, 100_000)))

        def best(q: Query) -> tuple[dict[tuple[str, str | None], float], dict[tuple[str, str | None], float]]:
            vecs = emb.embedder.embed(_crops(_pixels(bench_dir, q), grid))
            sims, ids = index.search(np.ascontiguousarray(vecs, dtype=np.float32), 5)
            whole: dict[tuple[str, str | None], float] = {}
            crops: dict[tuple[str, str | None], float] = {}
            for row in range(len(vecs)):
                for sim, vid in zip(sims[row], ids[row], strict=True):
                    ref = refs.get(int(vid)) if vid >= 0 else None
                    if ref is None:
                        continue
                    key = (ref.brand, ref.sku)
                    crops[key] = max(crops.get(key, -1.0), float(sim))
                    if row == 0:
                        whole[key] = max(whole.get(key, -1.0), float(sim))
            return whole, crops

        out: dict[str, Any] = {"grid": list(grid.fractions)}
        for split in SPLITS:
            neg_w, neg_c = [], []
            for q in queries:
                if q.split == split and q.track == "negative":
                    w, cr = best(q)
                    neg_w.append(max(w.values(), default=0.0))
                    neg_c.append(max(cr.values(), default=0.0))
            per: dict[str, Any] = {}
            for edit in edits:
                rows = []
                for q in queries:
                    if q.split == split and q.track == "copy" and q.variant == edit:
                        w, cr = best(q)
                        key = (q.brand or "", q.sku)
                        rows.append((w.get(key, 0.0), cr.get(key, 0.0), bool(cr) and max(cr, key=cr.__getitem__) == key,
                                     bool(w) and max(w, key=w.__getitem__) == key))
                if rows:
                    per[edit] = {
                        "n": len(rows),
                        "tpr_whole": tpr_at_fpr([r[0] for r in rows], neg_w)[0],
                        "tpr_with_crops": tpr_at_fpr([r[1] for r in rows], neg_c)[0],
                        "top1_whole": float(np.mean([r[3] for r in rows])),
                        "top1_with_crops": float(np.mean([r[2] for r in rows])),
                    }
            out[split] = {"edits": per, "negatives": len(neg_w), "negative_max_whole": max(neg_w, default=0.0),
                          "negative_max_with_crops": max(neg_c, default=0.0)}
        return out
    finally:
        c.close()


def logo(work: Path, bench_name: str, settings: Any, model: str, grid: CropGrid,
         max_negatives: int | None = None) -> dict[str, Any]:
    """Per split: logo TPR at 1 % FPR and top-1 brand of the best crop, for ``model`` and ``grid``."""
    from service.container import build_embedders
    from service.demo import logo_on_white

    bench_dir = work / bench_name
    queries = load_labels(bench_dir / "labels.jsonl")
    s = settings.model_copy(update={
        "data_dir": work / "runs" / "main" / "data",
        "models": settings.models.model_copy(update={"copy_model": model, "semantic_model": "", "logo_model": ""})})
    embedders, _ = build_embedders(s)
    e = embedders[model]
    brands = sorted({q.brand for q in queries if q.track == "logo" and q.brand})
    vecs, owner = [], []
    for b in brands:
        v = e.embed([np.ascontiguousarray(x) for x in logo_variants(np.asarray(logo_on_white(b, 256)))])
        vecs.append(v)
        owner += [b] * len(v)
    refs = np.concatenate(vecs).astype(np.float32)
    owners = np.array(owner)
    out: dict[str, Any] = {"model": model, "grid": list(grid.fractions)}
    for split in SPLITS:
        pos, top1, neg = [], [], []
        negatives = [q for q in queries if q.split == split and q.track == "negative"][:max_negatives]
        for q in [q for q in queries if q.split == split and q.track == "logo"] + negatives:
            sims = e.embed(_crops(_pixels(bench_dir, q), grid)).astype(np.float32) @ refs.T
            if q.track == "logo":
                pos.append(float(sims[:, owners == q.brand].max()))
                top1.append(bool(owners[np.unravel_index(int(sims.argmax()), sims.shape)[1]] == q.brand))
            else:
                neg.append(float(sims.max()))
        tpr, thr = tpr_at_fpr(pos, neg)
        out[split] = {"n": len(pos), "negatives": len(neg), "tpr_at_1fpr": tpr, "threshold": thr,
                      "top1": float(np.mean(top1)) if top1 else None,
                      "positive_median": float(np.median(pos)) if pos else None}
    return out
