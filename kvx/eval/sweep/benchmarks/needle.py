"""The ``needle`` benchmark kind of a sweep: ``kvx needle`` at the cell's length."""

from __future__ import annotations

import dataclasses
from typing import Any

from kvx.eval.needle import DENSE, NeedleConfig, NeedleRunner, PolicyRun
from kvx.eval.sweep.benchmarks.base import Benchmark, Context, cell_result
from kvx.eval.sweep.grid import Cell


class NeedleBenchmark(Benchmark):
    """``kvx needle`` at one length: the cell's score is the mean exact match over its depths,
    variants and samples; per-cell rows (and resumption inside a cell) under ``OUT/cells/``."""

    kind = "needle"
    keys = {f.name: "see kvx needle" for f in dataclasses.fields(NeedleConfig)
            if f.name not in ("lengths", "policies", "haystack_text")}

    def config(self, length: int, run: PolicyRun) -> NeedleConfig:
        return NeedleConfig(lengths=[length], policies=[run],
                            **{k: v for k, v in self.settings.items() if k in self.keys})

    def check(self, context: Context, cells: list[Cell]) -> None:
        from kvx.eval.needle import check_prompts

        for length in sorted({c.length for c in cells}):
            check_prompts(self.config(length, PolicyRun(DENSE)), context.tokenizer)

    def run(self, cell: Cell, run: PolicyRun, context: Context) -> dict[str, Any]:
        runner = NeedleRunner(context.model, context.tokenizer, self.config(cell.length, run),
                              context.out_dir / "cells" / cell.slug, model_path=context.model_path)
        rows = runner.run(progress=False)
        return cell_result(rows, "exact_match", _fewest_kept)


def _fewest_kept(rows: list[dict[str, Any]]) -> int:
    """The fewest tokens any prompt's cache kept."""
    return min(r["kept_tokens"] for r in rows)
