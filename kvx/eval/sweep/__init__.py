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

import dataclasses
import datetime
import json
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import kvx
from kvx.eval.needle import (
    DENSE,
    PolicyRun,
    _progress,
    _safe,
)
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

# --- running ---------------------------------------------------------------------------------


def distributed_rank() -> tuple[int, int, Any]:
    """``(rank, world, torch.distributed or None)``: a process group joined when torchrun started us,
    nccl when every process of this node has a GPU of its own, else gloo (CPU, or shared GPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, None
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        nccl = torch.cuda.is_available() and torch.cuda.device_count() >= per_node
        if nccl:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # the only collective is the barrier before the summary, where a shard that finished early waits
        # for the others for as long as their cells take (the default timeout is 30 minutes)
        dist.init_process_group("nccl" if nccl else "gloo", timeout=datetime.timedelta(days=7))
    return dist.get_rank(), dist.get_world_size(), dist


class Sweep:
    """Runs a :class:`SweepConfig`'s cells of one shard on one loaded model (see the module docstring)."""

    def __init__(self, config: SweepConfig, out_dir: Path, rank: int = 0, world: int = 1):
        self.config, self.out_dir, self.rank, self.world = config, Path(out_dir), rank, world
        self.log = ResultsLog(self.out_dir / "results.jsonl")
        self.cells = config.cells()

    def pending(self) -> list[Cell]:
        """This shard's cells not yet in the results file, in grid order."""
        done = {row_key(r) for r in self.log.rows()}
        return [cell for cell in shard(self.cells, self.rank, self.world) if cell.key not in done]

    def rows(self) -> list[dict[str, Any]]:
        """The results rows of this grid's cells (the file may hold others: cells since removed from
        the config, or measured with other benchmark settings)."""
        wanted = {cell.key for cell in self.cells}
        return [row for row in self.log.rows() if row_key(row) in wanted]

    def load(self) -> Context:
        from kvx.eval.needle import load_causal_lm, load_tokenizer

        device = self.config.device
        if device is None and self.world > 1:
            import torch

            if torch.cuda.is_available():
                device = f"cuda:{int(os.environ.get('LOCAL_RANK', self.rank)) % torch.cuda.device_count()}"
        tokenizer = load_tokenizer(self.config.model, self.config.tokenizer)
        model = load_causal_lm(self.config.model, self.config.dtype, device)
        return Context(model, tokenizer, self.config.model, self.out_dir)

    def check(self, context: Context) -> None:
        """Before any cell: every policy patches this model, every benchmark can run."""
        from kvx.eval.needle import check_patchable, parse_policies

        runs = {cell.policy for cell in self.cells if cell.policy != DENSE}
        check_patchable(context.model, [parse_policies([label], [], with_dense=False)[0] for label in sorted(runs)])
        for bench in self.config.benchmarks:
            bench.check(context, [c for c in self.cells if c.benchmark == bench.name])

    def run(self, progress: bool = True, context: Context | None = None) -> list[dict[str, Any]]:
        """Run this shard's pending cells, appending each row as it finishes; returns the rows written."""
        from kvx.eval.measure import stamp
        from kvx.eval.needle import model_identity

        context = context or self.load()
        self.check(context)
        self.log.open({**model_identity(context.model, context.tokenizer, context.model_path), "kvx": kvx.__version__})
        todo = self.pending()
        run_stamp = stamp(context.model.device) if todo else {}
        written = []
        for cell in _progress(todo, progress, desc=f"sweep {self.rank + 1}/{self.world}" if self.world > 1 else "sweep"):
            row = self.run_cell(cell, context)
            self.log.append({**row, "rank": self.rank, "stamp": run_stamp})
            written.append(row)
        return written

    def run_cell(self, cell: Cell, context: Context) -> dict[str, Any]:
        from kvx.eval.needle import parse_policies

        bench = self.config.benchmark(cell.benchmark)
        run = PolicyRun(DENSE) if cell.policy == DENSE else parse_policies([cell.policy], [], with_dense=False)[0]
        start = time.perf_counter()
        result = bench.run(cell, run, context)
        return {**dataclasses.asdict(cell), "kind": bench.kind, **result,
                "seconds": round(time.perf_counter() - start, 3)}


# --- summary ---------------------------------------------------------------------------------


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
        path = out_dir / f"accuracy-vs-kv-{_safe(bench)}.png"
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


def run_sweep(config_path: str | Path, out_dir: str | Path, rank: int | None = None, world: int | None = None,
              progress: bool = True, summary_only: bool = False) -> list[Path]:
    """Load, check and run a sweep (this process's shard), then write the summary (rank 0, once
    every shard is done when torch.distributed joined them); returns the summary's paths."""
    config = load_config(config_path)
    out_dir = Path(out_dir)
    dist = None
    if rank is None and world is None:
        rank, world, dist = distributed_rank()
    rank, world = rank or 0, world or 1
    sweep = Sweep(config, out_dir, rank, world)
    if not summary_only:
        sweep.run(progress=progress)
    if dist is not None:
        dist.barrier()
    paths: list[Path] = []
    if rank == 0:
        rows = sweep.rows()
        missing = len(sweep.cells) - len(rows)
        if missing:
            warnings.warn(f"{missing} of {len(sweep.cells)} cells are not in {sweep.log.path} yet "
                          "(other shards still running, or not started): the summary covers the rest", stacklevel=2)
        paths = write_summary(rows, out_dir)
    if dist is not None:
        dist.destroy_process_group()
    return paths


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
