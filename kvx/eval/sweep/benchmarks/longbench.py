"""The ``longbench`` benchmark kind of a sweep: one LongBench task through ``kvx longbench``'s runner."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvx.eval.needle import PolicyRun
from kvx.eval.sweep.benchmarks.base import Benchmark, Context, cell_result
from kvx.eval.sweep.grid import Cell


class LongBenchBenchmark(Benchmark):
    """One LongBench task (``kvx longbench``) with prompts middle-truncated to the cell's length;
    per-sample rows (and resumption inside a cell) under ``OUT/cells/``."""

    kind = "longbench"
    keys = {"data": "the directory of LongBench's JSONL files", "tasks": "task names (default: all)",
            "longbench_e": "LongBench-E (default false)", "limit": "samples per task",
            "use_chat_template": "(default true)", "compress": "prompt or context (query-aware)"}

    @classmethod
    def expand(cls, entry: dict[str, Any]) -> list[Benchmark]:
        from kvx.eval.longbench.tasks import check_data, select_tasks

        if "data" not in entry:
            raise ValueError("a longbench benchmark needs data: DIR (LongBench's JSONL files)")
        tasks = select_tasks(entry.get("tasks"), entry.get("longbench_e", False))
        check_data(Path(entry["data"]).expanduser(), tasks, entry.get("longbench_e", False))  # names what is missing
        return [cls(f"{entry.get('name', 'longbench')}/{task.name}", {**entry, "tasks": [task.name]}) for task in tasks]

    def config(self, length: int, run: PolicyRun):
        from kvx.eval.longbench.runner import LongBenchConfig

        options = {k: v for k, v in self.settings.items() if k in self.keys and k != "data"}
        return LongBenchConfig(data_dir=Path(self.settings["data"]).expanduser(), policies=[run], max_length=length,
                               **options)

    def run(self, cell: Cell, run: PolicyRun, context: Context) -> dict[str, Any]:
        from kvx.eval.longbench.runner import LongBenchRunner

        runner = LongBenchRunner(context.model, context.tokenizer, self.config(cell.length, run),
                                 context.out_dir / "cells" / cell.slug, model_path=context.model_path)
        rows = runner.run(progress=False)
        return cell_result(rows, "longbench", _fewest_kept)


def _fewest_kept(rows: list[dict[str, Any]]) -> int | None:
    """The fewest tokens any layer of any sample's cache kept (None: no layers reported)."""
    return min((layer["kept_min"] for r in rows for layer in r["layers"]), default=None)
