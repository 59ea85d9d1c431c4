"""Running a sweep: this process's shard of the cells on one loaded model (joining torchrun's
process group when it started us), each row appended as its cell finishes, then the summary."""

from __future__ import annotations

import dataclasses
import datetime
import os
import time
import warnings
from pathlib import Path
from typing import Any

import kvx
from kvx.eval.needle import DENSE, PolicyRun, progress_bar
from kvx.eval.sweep.benchmarks import Context
from kvx.eval.sweep.config import SweepConfig, load_config
from kvx.eval.sweep.grid import Cell, row_key, shard
from kvx.eval.sweep.log import results_file
from kvx.eval.sweep.summary import write_summary


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
        self.results = results_file(self.out_dir / "results.jsonl")
        self.cells = config.cells()

    def pending(self) -> list[Cell]:
        """This shard's cells not yet in the results file, in grid order."""
        done = {row_key(r) for r in self.results.read().rows}
        return [cell for cell in shard(self.cells, self.rank, self.world) if cell.key not in done]

    def rows(self) -> list[dict[str, Any]]:
        """The results rows of this grid's cells (the file may hold others: cells since removed from
        the config, or measured with other benchmark settings); a line that cannot be read is a warning."""
        results = self.results.read()
        for problem in results.problems:
            warnings.warn(problem, stacklevel=2)
        wanted = {cell.key for cell in self.cells}
        return [row for row in results.rows if row_key(row) in wanted]

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
        self.results.open({**model_identity(context.model, context.tokenizer, context.model_path), "kvx": kvx.__version__})
        todo = self.pending()
        run_stamp = stamp(context.model.device) if todo else {}
        written = []
        desc = f"sweep {self.rank + 1}/{self.world}" if self.world > 1 else "sweep"
        with self.results.appender() as append:
            for cell in progress_bar(todo, progress, desc=desc):
                row = self.run_cell(cell, context)
                append({**row, "rank": self.rank, "stamp": run_stamp})
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
            warnings.warn(f"{missing} of {len(sweep.cells)} cells are not in {sweep.results.path} yet "
                          "(other shards still running, or not started): the summary covers the rest", stacklevel=2)
        paths = write_summary(rows, out_dir)
    if dist is not None:
        dist.destroy_process_group()
    return paths

