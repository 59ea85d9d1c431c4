"""What every benchmark kind of a sweep is: a :class:`Benchmark` (its YAML keys, a check run before
any cell, ``run(cell)``) running on a :class:`Context` (the loaded model, the output directory)."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from kvx.eval.needle import PolicyRun
from kvx.eval.sweep.grid import Cell


@dataclass
class Context:
    """What every cell runs on: one loaded model and tokenizer, and the sweep's output directory."""

    model: Any
    tokenizer: Any
    model_path: str
    out_dir: Path


class Benchmark:
    """A benchmark kind: ``keys`` are its YAML keys (besides ``kind``, ``name``, ``lengths``), ``check``
    runs before any cell (missing data, unknown tasks), ``run`` scores one cell."""

    kind: ClassVar[str]
    keys: ClassVar[dict[str, str]]

    def __init__(self, name: str, settings: dict[str, Any]):
        self.name, self.settings = name, settings

    @property
    def digest(self) -> str:
        """A short digest of what shapes this benchmark's scores (its settings, lengths aside)."""
        from kvx.eval.needle import short_digest

        shaping = {k: v for k, v in self.settings.items() if k not in ("name", "lengths")}
        return short_digest(json.dumps(shaping, sort_keys=True, default=str))[:8]

    @classmethod
    def expand(cls, entry: dict[str, Any]) -> list[Benchmark]:
        """The benchmarks one YAML entry names (one per task where the kind has tasks)."""
        return [cls(entry.get("name", cls.kind), entry)]

    def check(self, context: Context, cells: list[Cell]) -> None:
        """Raise before any cell runs when this benchmark cannot run."""

    def run(self, cell: Cell, run: PolicyRun, context: Context) -> dict[str, Any]:
        raise NotImplementedError


def cell_result(rows: list[dict[str, Any]], metric: str,
                kept_tokens: Callable[[list[dict[str, Any]]], int | None]) -> dict[str, Any]:
    """A cell's result from its runner's rows (prompts or samples): the mean score and KV bytes,
    ``metric``, the fewest tokens kept (``kept_tokens(rows)``) and how many rows."""
    return {"score": statistics.fmean(r["score"] for r in rows), "metric": metric,
            "kv_bytes": statistics.fmean(r["kv_bytes"] for r in rows), "kept_tokens": kept_tokens(rows),
            "samples": len(rows)}
