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
"""

from __future__ import annotations

from kvx.eval.sweep.benchmarks import (  # noqa: F401
    BENCHMARKS,
    Benchmark,
    Context,
    LmEvalBenchmark,
    LongBenchBenchmark,
    NeedleBenchmark,
)
from kvx.eval.sweep.config import TOP_KEYS, SweepConfig, load_config  # noqa: F401
from kvx.eval.sweep.grid import Cell, _option_names, expand, row_key, shard, with_options, with_ratio  # noqa: F401
from kvx.eval.sweep.log import IDENTITY_KEY, ROW_KEYS, ResultsLog  # noqa: F401
from kvx.eval.sweep.runner import Sweep, distributed_rank, run_sweep  # noqa: F401
from kvx.eval.sweep.summary import (  # noqa: F401
    markdown,
    summarize,
    write_needle_heatmaps,
    write_plots,
    write_summary,
)

# --- the command -----------------------------------------------------------------------------


def add_sweep_command(sub) -> None:
    """Register ``kvx sweep`` on the ``kvx`` command's sub-parsers."""
    from kvx.cli import int_at_least

    p = sub.add_parser(
        "sweep", help="a grid of policies x options x ratios x benchmarks x lengths, resumable and sharded",
        description="Runs every cell of CONFIG's grid not yet in OUT/results.jsonl (a rerun resumes), appending each as "
                    "it finishes, then writes OUT/summary.md, summary.json and plots. Under torchrun each process runs "
                    "its shard of the cells (torchrun --nproc-per-node N -m kvx.cli sweep CONFIG).",
    )
    p.add_argument("config", help="the sweep's YAML file (see docs/sweep.md and configs/)")
    p.add_argument("--out", help="output directory (default runs/sweep-<config name>)")
    p.add_argument("--rank", type=int_at_least(0), help="run shard RANK of --world by hand, without torch.distributed")
    p.add_argument("--world", type=int_at_least(1), help="number of shards (with --rank)")
    p.add_argument("--summary-only", action="store_true", help="write the summary from the results file, run nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_sweep)


def _cmd_sweep(args) -> int:
    from kvx.cli import input_file, output_dir

    path = input_file(args.config, "config")
    if (args.rank is None) != (args.world is None):
        raise ValueError("--rank and --world go together (shard RANK of WORLD), or neither")
    if args.rank is not None and args.rank >= args.world:
        raise ValueError(f"--rank {args.rank} must be below --world {args.world}")
    out = output_dir(args.out or f"runs/sweep-{path.stem}")
    for written in run_sweep(path, out, args.rank, args.world, progress=not args.no_progress,
                             summary_only=args.summary_only):
        print(f"wrote {written}")
    return 0
