"""``kvx sweep CONFIG.yaml``: a grid of policies x options x compression ratios x benchmarks x
context lengths, run cell by cell, resumable and sharded.

A cell is one policy (after the grid's options and ratio) on one benchmark at one context length.
Each finished cell is appended to ``OUT/results.jsonl`` at once; a rerun skips the cells already
there, so an interrupted sweep loses at most the cell it was in (and the needle and LongBench
runners resume even that from their own per-cell files under ``OUT/cells/``).

Shards: launched by ``torchrun --nproc-per-node N -m kvx.cli sweep CONFIG`` each process joins a
``torch.distributed`` group (gloo on CPU, nccl with one GPU per process) and runs the pending cells
whose index in the grid is its rank modulo the world size; rank 0 writes the summary once all are
done. ``--rank R --world W`` does the same split without torch.distributed (one process per shard,
started by hand); ``--summary-only`` rebuilds the summary from the results file.

Benchmark kinds are a registry (:data:`BENCHMARKS`): ``needle`` (``kvx.eval.needle``), ``lm_eval``
(``kvx.eval.lm_eval_bridge``) and ``longbench`` (``kvx.eval.longbench``); a kind is one class with
its YAML keys, a check run before any cell, and ``run(cell)``.

- :mod:`.config`: the YAML read and checked; :mod:`.grid`: cells, ratios, options and shards;
- :mod:`.benchmarks`: the benchmark kinds, one module each; :mod:`.log`: ``OUT/results.jsonl``;
- :mod:`.runner`: a shard's cells run, then the summary; :mod:`.summary`: tables and plots;
  :mod:`.cli`: the command.
"""

from kvx.eval.sweep.benchmarks import (
    BENCHMARKS,
    Benchmark,
    Context,
    LmEvalBenchmark,
    LongBenchBenchmark,
    NeedleBenchmark,
)
from kvx.eval.sweep.cli import add_sweep_command
from kvx.eval.sweep.config import TOP_KEYS, SweepConfig, load_config
from kvx.eval.sweep.grid import Cell, expand, row_key, shard, with_options, with_ratio
from kvx.eval.sweep.log import IDENTITY_KEY, ROW_KEYS, check_row, results_file
from kvx.eval.sweep.runner import Sweep, distributed_rank, run_sweep
from kvx.eval.sweep.summary import markdown, summarize, write_needle_heatmaps, write_plots, write_summary

__all__ = [
    "BENCHMARKS", "IDENTITY_KEY", "ROW_KEYS", "TOP_KEYS", "Benchmark", "Cell", "Context", "LmEvalBenchmark",
    "LongBenchBenchmark", "NeedleBenchmark", "Sweep", "SweepConfig", "add_sweep_command", "check_row",
    "distributed_rank", "expand", "load_config", "markdown", "results_file", "row_key", "run_sweep", "shard",
    "summarize", "with_options", "with_ratio", "write_needle_heatmaps", "write_plots", "write_summary",
]
