"""Scores from LongBench result rows: per task and policy (the official ``eval.py`` numbers: the
mean sample score x 100, rounded to 2 places), category and overall averages of the task scores,
LongBench-E's length buckets, and how much of the dense KV cache each policy kept."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from kvx.eval.longbench.tasks import CATEGORIES, LENGTH_BUCKETS, TASKS
from kvx.eval.needle import DENSE, aligned_table


def bucket(length: int) -> str:
    """LongBench-E's range of a sample ``length``: 0-4k (< 4000), 4-8k (< 8000), 8k+."""
    return LENGTH_BUCKETS[0] if length < 4000 else LENGTH_BUCKETS[1] if length < 8000 else LENGTH_BUCKETS[2]


def _percent(scores: list[float]) -> float | None:
    return round(100 * sum(scores) / len(scores), 2) if scores else None


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 2) if values else None


def summarize(rows: list[dict[str, Any]], policies: list[str], buckets: bool = False) -> dict[str, Any]:
    """Per policy: task scores, category averages (the mean of the task scores in each category
    that ran), the average over tasks, samples run, the share of samples whose cache was compressed
    at all, and KV bytes relative to dense on the same samples; with ``buckets``, each task's
    scores per LongBench-E length range and their average over tasks."""
    by_policy: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_policy[row["policy"]].append(row)
    dense_bytes = {(r["task"], r["index"]): r["kv_bytes"] for r in by_policy.get(DENSE, [])}
    tasks = [t for t in TASKS if any(r["task"] == t for r in rows)]
    summary: dict[str, Any] = {"tasks": tasks, "policies": {}}
    for policy in policies:
        mine = by_policy.get(policy, [])
        if not mine:
            continue
        task_scores = {t: _percent([r["score"] for r in mine if r["task"] == t]) for t in tasks}
        ran = {t: s for t, s in task_scores.items() if s is not None}
        ratios = [r["kv_bytes"] / dense_bytes[(r["task"], r["index"])] for r in mine
                  if dense_bytes.get((r["task"], r["index"]))]
        entry = {
            "tasks": task_scores,
            "categories": {c: _mean([s for t, s in ran.items() if TASKS[t].category == c]) for c in CATEGORIES},
            "average": _mean(list(ran.values())),
            "samples": len(mine),
            "compressed": sum(1 for r in mine if r.get("compressed")) / len(mine),
            "kv_vs_dense": round(sum(ratios) / len(ratios), 4) if ratios else None,
        }
        if buckets:
            entry["buckets"] = {t: {b: _percent([r["score"] for r in mine
                                                 if r["task"] == t and bucket(r["length"]) == b])
                                    for b in LENGTH_BUCKETS} for t in tasks}
            entry["bucket_average"] = {b: _mean([v[b] for v in entry["buckets"].values() if v[b] is not None])
                                       for b in LENGTH_BUCKETS}
        summary["policies"][policy] = entry
    return summary


def _cell(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_summary(summary: dict[str, Any]) -> str:
    """One column per policy: task scores, category averages, the average, samples, the share of
    samples compressed and KV vs dense; then, for LongBench-E, one bucket table per policy."""
    policies = summary["policies"]
    if not policies:
        return "no results"
    names = list(policies)
    rows = [[t] + [_cell(policies[p]["tasks"][t]) for p in names] for t in summary["tasks"]]
    categories = [c for c in CATEGORIES if any(policies[p]["categories"][c] is not None for p in names)]
    rows += [[f"[{c}]"] + [_cell(policies[p]["categories"][c]) for p in names] for c in categories]
    rows.append(["average"] + [_cell(policies[p]["average"]) for p in names])
    rows.append(["samples"] + [str(policies[p]["samples"]) for p in names])
    rows.append(["compressed"] + [f"{100 * policies[p]['compressed']:.0f}%" for p in names])
    rows.append(["KV vs dense"] + [_cell(policies[p]["kv_vs_dense"], 3) for p in names])
    text = aligned_table(["task"] + names, rows)
    for policy in names:
        if "buckets" in policies[policy]:
            entry = policies[policy]
            bucket_rows = [[t] + [_cell(entry["buckets"][t][b]) for b in LENGTH_BUCKETS] for t in summary["tasks"]]
            bucket_rows.append(["average"] + [_cell(entry["bucket_average"][b]) for b in LENGTH_BUCKETS])
            text += f"\n\nLongBench-E, {policy}, by length\n" + aligned_table(["task", *LENGTH_BUCKETS], bucket_rows)
    return text
