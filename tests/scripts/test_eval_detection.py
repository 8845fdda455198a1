"""Smoke test of the detection evaluation harness (scripts/eval_detection.py) on its smallest benchmark:
the real ``counterlens catalog import`` and ``counterlens rescan`` run as subprocesses, and the metrics
JSON it writes must hold every track, edit and metric with values that mean something."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from scripts.eval.benchmark import SPLITS, load_labels
from scripts.eval.edits import EDIT_NAMES
from scripts.eval.metrics import tpr_at_fpr

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory: pytest.TempPathFactory,
               shared_models: tuple[Path, dict[str, Any]]) -> tuple[dict[str, Any], Path]:
    work = tmp_path_factory.mktemp("eval")
    out = work / "metrics.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "eval_detection.py"), "--size", "small", "--seed", "3",
         "--work", str(work), "--models-from", str(shared_models[0]), "--json", str(out)],
        capture_output=True, text=True, timeout=300, check=False, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), work


def test_every_track_edit_and_metric_is_reported(evaluation: tuple[dict[str, Any], Path]) -> None:
    metrics, _ = evaluation
    for split in SPLITS:
        s = metrics["splits"][split]
        tracks = {"copy", "logo", "natural"}
        assert set(s["tracks"]) == tracks | {f"{t} / keypoints" for t in tracks}
        assert {r["signal"] for t, r in s["tracks"].items() if t.endswith("/ keypoints")} == {"keypoints"}
        assert set(s["edits"]) == set(EDIT_NAMES)
        for row in [*s["tracks"].values(), *s["edits"].values()]:
            for key in ("n", "recall_at_1", "recall_at_1_own_signal", "similarity_tpr_at_1fpr", "similarity_auc"):
                assert row[key] is not None, (split, key)
            assert 0.0 <= row["recall_at_1"] <= 1.0
        f = s["flagging"]
        assert f["positives"] > 0 and f["negatives"] > 0
        assert 0.0 <= f["tpr_at_1fpr"] <= 1.0
        assert sum(r["n"] for r in s["reliability"]) == f["positives"] + f["negatives"]
    assert list(metrics["logo_search"]) == [metrics["config"]["logo_search"], "always"]
    assert metrics["config"]["logo_search"] == "never"  # the default: crops searched only when asked
    assert metrics["timing"]["listings_per_s"] > 0


def test_edited_copies_are_found(evaluation: tuple[dict[str, Any], Path]) -> None:
    """Copies through JPEG 30 and mirroring are easy for SSCD: below half found means something broke."""
    metrics, _ = evaluation
    for edit in ("jpeg30", "mirror", "colour_jitter"):
        found = [metrics["splits"][s]["edits"][edit]["recall_at_1"] for s in SPLITS]
        assert sum(found) / len(found) > 0.5, (edit, found)
    copy = [metrics["splits"][s]["tracks"]["copy"] for s in SPLITS]
    assert min(r["similarity_auc"] for r in copy) > 0.8


def test_benchmark_labels_are_split_and_seeded(evaluation: tuple[dict[str, Any], Path]) -> None:
    """Every listing has one split; no catalog brand's listings are in both; counts match the JSON."""
    metrics, work = evaluation
    labels = load_labels(work / "bench-small-seed3" / "labels.jsonl")
    split_of: dict[str, set[str]] = {}
    for q in labels:
        if q.brand is not None:
            split_of.setdefault(q.brand, set()).add(q.split)
        assert q.positive == (q.track != "negative")
    assert all(len(v) == 1 for v in split_of.values()), split_of
    counts: dict[str, int] = {}
    for q in labels:
        counts[f"{q.split}/{q.track}"] = counts.get(f"{q.split}/{q.track}", 0) + 1
    assert counts == metrics["config"]["counts"]


def test_tpr_at_fpr_lets_through_at_most_the_allowed_negatives() -> None:
    neg = [i / 200 for i in range(200)]  # 0.000 .. 0.995
    tpr, thr = tpr_at_fpr([0.999, 0.994, 0.5], neg)
    assert thr == pytest.approx(0.985)  # two negatives (1 % of 200) above it
    assert tpr == pytest.approx(2 / 3)
    assert tpr_at_fpr([], neg) == (None, None)
