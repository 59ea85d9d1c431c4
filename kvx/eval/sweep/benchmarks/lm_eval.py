"""The ``lm_eval`` benchmark kind of a sweep: one lm-eval task through kvx's model type."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from kvx.eval.needle import DENSE, PolicyRun, nonempty_list
from kvx.eval.sweep.benchmarks.base import Benchmark, Context
from kvx.eval.sweep.grid import Cell


class LmEvalBenchmark(Benchmark):
    """One lm-eval task through kvx's model type; the length goes to the task's metadata as
    ``max_seq_lengths`` (what RULER reads) with the model as ``tokenizer``."""

    kind = "lm_eval"
    keys = {"tasks": "lm-eval task names", "include_path": "a directory of task YAML files",
            "default_tasks": "index the harness's own tasks too (default true)", "limit": "examples per task",
            "metadata": "a mapping given to the tasks", "batch_size": "requests per batch (default 1)",
            "max_length": "the harness's context limit"}

    @classmethod
    def expand(cls, entry: dict[str, Any]) -> list[Benchmark]:
        tasks = entry.get("tasks")
        if isinstance(tasks, str):
            tasks = [tasks]
        tasks = nonempty_list("tasks (of an lm_eval benchmark)", tasks)
        if importlib.util.find_spec("lm_eval") is None:
            raise ImportError("an lm_eval benchmark needs lm-evaluation-harness: pip install 'kvx[lm-eval]'")
        path = entry.get("include_path")
        if path is not None and not Path(path).expanduser().is_dir():
            raise FileNotFoundError(f"include path {path}: no such directory (it holds task YAML files)")
        return [cls(f"{entry.get('name', 'lm_eval')}/{task}", {**entry, "task": task}) for task in tasks]

    def metadata(self, length: int, context: Context) -> dict[str, Any]:
        """The tasks' metadata at ``length``: the config's, the model as ``tokenizer``, ``max_seq_lengths``."""
        return {"tokenizer": context.model_path, **(self.settings.get("metadata") or {}), "max_seq_lengths": [length]}

    def manager(self, metadata: dict[str, Any]):
        """lm-eval's task manager for ``metadata`` (the harness gives tasks the manager's metadata, not
        the evaluation's, so there is one per length), built once each."""
        from kvx.eval import lm_eval_bridge as bridge

        managers = self.__dict__.setdefault("_managers", {})
        key = json.dumps(metadata, sort_keys=True, default=str)
        if key not in managers:
            managers[key] = bridge.task_manager(self.settings.get("include_path"), metadata,
                                                include_defaults=self.settings.get("default_tasks", True))
        return managers[key]

    def check(self, context: Context, cells: list[Cell]) -> None:
        from kvx.eval import lm_eval_bridge as bridge

        bridge.check_tasks([self.settings["task"]], self.manager(self.metadata(cells[0].length, context)))

    def run(self, cell: Cell, run: PolicyRun, context: Context) -> dict[str, Any]:
        from kvx.eval import lm_eval_bridge as bridge

        metadata = self.metadata(cell.length, context)
        (row,) = bridge.evaluate_policy(context.model, context.tokenizer, None if run.name == DENSE else run.label,
                                        [self.settings["task"]], self.manager(metadata), limit=self.settings.get("limit"),
                                        metadata=metadata, batch_size=self.settings.get("batch_size", 1),
                                        max_length=self.settings.get("max_length"))
        return {"score": row["score"], "metric": row["metric"], "kv_bytes": row["kv_bytes_mean"],
                "kept_tokens": row["kept_tokens_min"], "samples": row["calls"], "metrics": row["metrics"]}
