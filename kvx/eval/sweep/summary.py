"""A sweep's summary: per benchmark, policy line and ratio, the mean score and KV bytes relative to
dense, as ``summary.md``, ``summary.json``, accuracy-vs-KV plots and the needle heatmaps."""

from __future__ import annotations

import json
import statistics
import warnings
from pathlib import Path
from typing import Any

from kvx.eval.needle import DENSE, safe_filename
from kvx.eval.sweep.benchmarks import NeedleBenchmark
from kvx.eval.sweep.grid import Cell


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per benchmark, policy line and ratio: mean score and KV bytes relative to dense (each cell
    against the dense cell of the same benchmark and length), over the lengths present."""
    dense = {(r["benchmark"], r["length"]): r["kv_bytes"] for r in rows if r["policy"] == DENSE}
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["benchmark"], row["line"], row["ratio"]), []).append(row)
    summary = []
    for (bench, line, ratio), mine in groups.items():
        ratios = [r["kv_bytes"] / dense[(bench, r["length"])] for r in mine
                  if dense.get((bench, r["length"])) and r["kv_bytes"] is not None]
        scores = [r["score"] for r in mine if r["score"] is not None]
        summary.append({"benchmark": bench, "policy": line, "ratio": ratio, "cells": len(mine),
                        "lengths": sorted(r["length"] for r in mine),
                        "score": statistics.fmean(scores) if scores else None,
                        "kv_vs_dense": statistics.fmean(ratios) if ratios else None})
    return sorted(summary, key=lambda s: (s["benchmark"], s["policy"] != DENSE, s["policy"], s["ratio"] or 0))


def markdown(summary: list[dict[str, Any]]) -> str:
    """One table per benchmark: a row per policy, a column per ratio, each cell ``score (KV x dense)``."""
    parts = []
    for bench in sorted({s["benchmark"] for s in summary}):
        mine = [s for s in summary if s["benchmark"] == bench]
        ratios = sorted({s["ratio"] for s in mine if s["ratio"] is not None})
        columns = ["-"] * bool(any(s["ratio"] is None for s in mine)) + ratios
        header = ["policy"] + [("no ratio" if r == "-" else f"ratio {r:g}") for r in columns]
        lines = [f"### {bench}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for policy in dict.fromkeys(s["policy"] for s in mine):
            by_ratio = {("-" if s["ratio"] is None else s["ratio"]): s for s in mine if s["policy"] == policy}
            lines.append("| " + " | ".join([policy] + [_score_text(by_ratio.get(r)) for r in columns]) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n\nEach entry: mean score over the lengths run (KV bytes relative to dense).\n"


def _score_text(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return ""
    score = "-" if entry["score"] is None else f"{entry['score']:.3f}"
    return score if entry["kv_vs_dense"] is None else f"{score} ({entry['kv_vs_dense']:.2f}x)"


def write_summary(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """``summary.md``, ``summary.json``, one accuracy-vs-KV plot per benchmark and the needle heatmaps."""
    summary = summarize(rows)
    paths = [out_dir / "summary.md", out_dir / "summary.json"]
    paths[0].write_text(markdown(summary))
    paths[1].write_text(json.dumps(summary, indent=1))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        warnings.warn("no plots: matplotlib is not installed (pip install 'kvx[eval]')", stacklevel=2)
        return paths
    paths += write_plots(summary, out_dir)
    paths += write_needle_heatmaps(rows, out_dir)
    return paths


def write_plots(summary: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Per benchmark: score against KV bytes relative to dense, one line per policy (dense a point at 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for bench in sorted({s["benchmark"] for s in summary}):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        mine = [s for s in summary if s["benchmark"] == bench and s["kv_vs_dense"] is not None and s["score"] is not None]
        for policy in dict.fromkeys(s["policy"] for s in mine):
            points = sorted((s["kv_vs_dense"], s["score"]) for s in mine if s["policy"] == policy)
            style = dict(marker="*", markersize=12, color="black") if policy == DENSE else dict(marker="o")
            ax.plot(*zip(*points), label=policy, **style)
        ax.set_xlabel("KV bytes relative to dense")
        ax.set_ylabel("score")
        ax.set_title(bench, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        path = out_dir / f"accuracy-vs-kv-{safe_filename(bench)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_needle_heatmaps(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """``kvx needle``'s heatmaps (depth x length) per policy and ratio, from the needle cells' own rows."""
    from kvx.eval.needle import load_results, write_heatmaps

    needle_rows = []
    for row in rows:
        if row.get("kind") != NeedleBenchmark.kind:
            continue
        label = row["line"] if row["ratio"] is None else f"{row['line']} @ ratio {row['ratio']:g}"
        cell = Cell(row["benchmark"], row["length"], row["policy"], row["line"], row["ratio"], row.get("settings", ""))
        for needle_row in load_results(out_dir / "cells" / cell.slug / "results.jsonl"):
            needle_rows.append({**needle_row, "policy": f"{row['benchmark']} {label}"})
    if not needle_rows:
        return []
    heatmaps = out_dir / "heatmaps"
    heatmaps.mkdir(exist_ok=True)
    return write_heatmaps(needle_rows, heatmaps)
