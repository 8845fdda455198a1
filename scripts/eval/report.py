"""Printing the evaluation: rich tables per split (tracks, edits, flagging, reliability), timing, and an
optional PNG of ROC curves and score histograms per track."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from scripts.eval.metrics import roc_points


def _f(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _rate_row(name: str, r: Mapping[str, Any]) -> list[str]:
    thr = r.get("similarity_threshold")
    return [name, str(r["n"]), _f(r["recall_at_1"]), _f(r["recall_at_1_own_signal"]), _f(r["recall_at_1_ranked"]),
            _f(r["brand_assessed"]), f"{_f(r['similarity_tpr_at_1fpr'])} (>{_f(thr, 2)})", _f(r["similarity_auc"]),
            _f(r["flag_tpr_at_1fpr"]), _f(r["flagged_review"])]


_RATE_COLUMNS = ("", "n", "R@1 any", "R@1 own", "R@1 ramp", "brand", "sim TPR@1%FPR (thr)", "sim AUC",
                 "flag TPR@1%FPR", "cheap flagged")


def print_split(console: Console, title: str, split: Mapping[str, Any]) -> None:
    t = Table(*_RATE_COLUMNS, title=f"{title}: tracks", title_justify="left")
    for track, r in split["tracks"].items():
        t.add_row(*_rate_row(f"{track} ({r['signal']})", r))
    console.print(t)
    if split.get("edits"):
        t = Table(*_RATE_COLUMNS, title=f"{title}: copy track per edit", title_justify="left")
        for edit, r in split["edits"].items():
            t.add_row(*_rate_row(edit, r))
        console.print(t)
    f = split["flagging"]
    neg = split["negatives"]
    t = Table("", "", title=f"{title}: flagging (risk) and negatives", title_justify="left", show_header=False)
    t.add_row("risk TPR at 1% FPR (cheap copies+lookalikes)",
              f"{_f(f['tpr_at_1fpr'])} at risk > {_f(f['threshold'], 3)}  (AUC {_f(f['auc'])}; "
              f"{f['positives']} positives, {f['negatives']} negatives)")
    t.add_row("verdict != clear: cheap / normal positives", f"{_f(f['cheap_positives_flagged_review'])} / "
              f"{_f(f['normal_positives_flagged_review'])}")
    t.add_row("verdict != clear: negatives", _f(f["negatives_flagged_review"]))
    t.add_row("negatives", f"{neg['n']} ({', '.join(f'{k} {v}' for k, v in neg['by_variant'].items())})")
    t.add_row("negatives: max / p99 similarity", ", ".join(
        f"{s} {_f(neg['max_similarity'][s], 2)}/{_f(neg['p99_similarity'][s], 2)}"
        for s in sorted(neg["max_similarity"])))
    console.print(t)
    t = Table("risk bin", "n", "mean risk", "fraction cheap positives", title=f"{title}: reliability of risk",
              title_justify="left")
    for row in split["reliability"]:
        t.add_row(row["bin"], str(row["n"]), _f(row["mean_risk"]), _f(row["positive_fraction"]))
    console.print(t)


def print_comparison(console: Console, title: str, rows: Sequence[tuple[str, Mapping[str, Any], float | None]],
                     track: str) -> None:
    """One line per configuration: a track's metrics on each split and the rescan's listings/s."""
    t = Table("configuration", "split", "n", "R@1 any", "R@1 own", "sim TPR@1%FPR", "flag TPR@1%FPR",
              "listings/s", title=title, title_justify="left")
    for name, metrics, rate in rows:
        for split, m in metrics.items():
            r = m["tracks"].get(track)
            if r is None:
                continue
            flag = m["flagging"]["tpr_at_1fpr"] if track != "logo" else None
            t.add_row(name, split, str(r["n"]), _f(r["recall_at_1"]), _f(r["recall_at_1_own_signal"]),
                      _f(r["similarity_tpr_at_1fpr"]), _f(flag), _f(rate, 2))
    console.print(t)


def plot(path: Path, metrics: Mapping[str, Any]) -> None:
    """ROC curves (similarity per track, risk) and histograms per split, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = list(metrics)
    fig, axes = plt.subplots(len(splits), 3, figsize=(15, 4.5 * len(splits)), squeeze=False)
    signal_of = {"copy": "copy", "logo": "logo", "natural": "lookalike"}
    for row, split in enumerate(splits):
        sc = metrics[split]["scores"]
        ax = axes[row][0]
        for track, signal in signal_of.items():
            if track in sc:
                pts = roc_points(sc[track], sc["negative"][signal])
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=f"{track} ({signal})")
        pts = roc_points(sc["risk_cheap"], sc["risk_other"])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "k--", label="risk (cheap vs rest)")
        ax.axvline(0.01, color="grey", lw=0.5)
        ax.set_xscale("symlog", linthresh=0.01)
        ax.set_xlim(0.0, 1.0)
        ax.set_xlabel("FPR")
        ax.set_ylabel("TPR")
        ax.set_title(f"{split}: ROC")
        ax.legend(fontsize=8)
        ax = axes[row][1]
        for track, signal in signal_of.items():
            if track in sc:
                ax.hist(sc[track], bins=30, range=(0, 1), alpha=0.5, label=f"{track} positives ({signal})")
                ax.hist(sc["negative"][signal], bins=30, range=(0, 1), alpha=0.3, histtype="step", lw=1.5,
                        label=f"negatives ({signal})")
        ax.set_title(f"{split}: best similarity")
        ax.legend(fontsize=7)
        ax = axes[row][2]
        ax.hist(sc["risk_cheap"], bins=20, range=(0, 1), alpha=0.6, label="cheap copies/lookalikes")
        ax.hist(sc["risk_other"], bins=20, range=(0, 1), alpha=0.6, label="negatives + normal price")
        ax.set_yscale("log")
        ax.set_title(f"{split}: risk")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def markdown(out: Mapping[str, Any]) -> str:
    """The main tables of a run as Markdown (for docs/quality.md)."""
    lines: list[str] = []
    head = ("| track / edit | split | n | R@1 any | R@1 own | sim TPR@1%FPR | sim AUC | flag TPR@1%FPR |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- |")
    lines.append(head)
    for split, m in out["splits"].items():
        for track, r in m["tracks"].items():
            lines.append(f"| **{track}** | {split} | {r['n']} | {_f(r['recall_at_1'], 2)} | "
                         f"{_f(r['recall_at_1_own_signal'], 2)} | {_f(r['similarity_tpr_at_1fpr'], 2)} | "
                         f"{_f(r['similarity_auc'], 2)} | {_f(r['flag_tpr_at_1fpr'], 2)} |")
        for edit, r in m["edits"].items():
            lines.append(f"| copy/{edit} | {split} | {r['n']} | {_f(r['recall_at_1'], 2)} | "
                         f"{_f(r['recall_at_1_own_signal'], 2)} | {_f(r['similarity_tpr_at_1fpr'], 2)} | "
                         f"{_f(r['similarity_auc'], 2)} | {_f(r['flag_tpr_at_1fpr'], 2)} |")
    lines.append("")
    lines.append("| split | flag TPR@1%FPR (risk threshold) | AUC | verdict != clear: cheap / normal / negatives |")
    lines.append("| --- | --- | --- | --- |")
    for split, m in out["splits"].items():
        f = m["flagging"]
        lines.append(f"| {split} | {_f(f['tpr_at_1fpr'], 3)} (> {_f(f['threshold'], 3)}) | {_f(f['auc'], 3)} | "
                     f"{_f(f['cheap_positives_flagged_review'], 3)} / {_f(f['normal_positives_flagged_review'], 3)}"
                     f" / {_f(f['negatives_flagged_review'], 3)} |")
    return "\n".join(lines) + "\n"
