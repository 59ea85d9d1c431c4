"""Block-sparse prefill attention of one layer against dense SDPA, in the same run.

For each length: random q, k, v of one attention layer; every round times, in a rotated order
(so a burst of load on a shared machine falls on each alike):

- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (causal; K/V expanded to the
  query heads beforehand, outside the timing: its fastest form);
- ``op``: :func:`kvx.kernels.block_sparse.block_sparse_attention` alone, on a block index built
  once at the density (block top-k of random scores, sink + local blocks);
- ``vertical_slash`` / ``block_topk`` / ``a_shape``: the whole method: estimate, index, op.

Reported per length and item: the median seconds over rounds, the median of the per-round speed-ups
against SDPA (and their spread), and the fraction of causal blocks really computed. Both wall time
and the process's CPU time are measured: on a shared, loaded machine a single-threaded call's CPU
time is the steadier figure (time spent descheduled is not in it; cache contention still is).
Run single threaded: ``OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_block_sparse.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from kvx.eval.bench import rotated_rounds
from kvx.eval.measure import stamp
from kvx.kernels import reference
from kvx.kernels.block_index import block_index, first_real_block
from kvx.kernels.block_sparse import block_sparse_attention
from kvx.methods import AShape, BlockTopK, VerticalSlash


class _Layer:
    """The least of a storage a method needs here: its keys as a causal view, a block counter."""

    def __init__(self, key, value):
        self.view = (key, value, None)
        self.attention_blocks = (0, 0)

    def causal_view(self, mask):
        return self.view

    def count_blocks(self, computed, causal):
        self.attention_blocks = (computed, causal)


def _inputs(length: int, heads: int, kv_heads: int, dim: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, length, dim, generator=g).to(dtype)
    k = torch.randn(1, kv_heads, length, dim, generator=g).to(dtype)
    v = torch.randn(1, kv_heads, length, dim, generator=g).to(dtype)
    return q, k, v


def _fixed_index(q, k, density: float, block_size: int) -> torch.Tensor:
    """Block lists at ``density`` from random scores, with one sink and one local block."""
    num_qb, num_kb, _ = reference.block_grid(q.shape[-2], k.shape[-2], block_size)
    scores = torch.rand(q.shape[0], q.shape[1], num_qb, num_kb, generator=torch.Generator().manual_seed(1))
    first = first_real_block(None, q.shape[0], q.shape[1], k.shape[-2], block_size, q.device)
    return block_index(scores, num_qb, num_kb, first, 1, 1, density=density)


def bench(length: int, args) -> list[dict]:
    dtype = getattr(torch, args.dtype)
    q, k, v = _inputs(length, args.heads, args.kv_heads, args.dim, dtype)
    groups = args.heads // args.kv_heads
    k_full, v_full = reference.expand_kv_heads(k, groups), reference.expand_kv_heads(v, groups)
    scaling = args.dim**-0.5
    index = _fixed_index(q, k, args.density, args.block_size)
    num_qb = index.shape[2]
    causal_blocks = args.heads * num_qb * (num_qb + 1) // 2
    methods = {
        "vertical_slash": VerticalSlash(density=args.density, block_size=args.block_size, min_length=0),
        "block_topk": BlockTopK(density=args.density, block_size=args.block_size, min_length=0),
        "a_shape": AShape(local=args.local, block_size=args.block_size, min_length=0),
    }
    methods = {name: method for name, method in methods.items() if name in args.methods}
    layers = {name: _Layer(k, v) for name in methods}
    calls = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k_full, v_full, is_causal=True, scale=scaling),
        "op": lambda: block_sparse_attention(q, k, v, index, None, scaling, block_size=args.block_size),
        **{name: (lambda m=method, layer=layers[name]: m.attend(layer, q, k, v, None, scaling, None, None))
           for name, method in methods.items()},
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    cpu_times: dict[str, list[float]] = {name: [] for name in calls}
    for round_index, name in rotated_rounds(list(calls), args.rounds + 1):  # round 0: warm-up
        start, cpu_start = time.perf_counter(), time.process_time()
        calls[name]()
        if round_index > 0:
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
    fractions = {"sdpa": 1.0, "op": int((index >= 0).sum()) / causal_blocks}
    fractions.update({name: layer.attention_blocks[0] / layer.attention_blocks[1] for name, layer in layers.items()})
    rows = []
    for name, samples in times.items():
        speedups = [dense / mine for dense, mine in zip(times["sdpa"], samples)]
        cpu_speedups = [dense / mine for dense, mine in zip(cpu_times["sdpa"], cpu_times[name])]
        rows.append({"length": length, "item": name, "seconds": statistics.median(samples),
                     "speedup": statistics.median(speedups), "speedup_low": min(speedups),
                     "speedup_high": max(speedups), "cpu_seconds": statistics.median(cpu_times[name]),
                     "cpu_speedup": statistics.median(cpu_speedups), "cpu_speedup_low": min(cpu_speedups),
                     "cpu_speedup_high": max(cpu_speedups), "blocks_computed": round(fractions[name], 4)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="32768", help="comma-separated prompt lengths")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--local", type=int, default=8, help="a_shape's local blocks")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (after one warm-up round)")
    parser.add_argument("--methods", default="vertical_slash,block_topk,a_shape")
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args()
    args.methods = [m for m in args.methods.split(",") if m]
    header = {**stamp(torch.device("cpu")), "threads": torch.get_num_threads(), "heads": args.heads,
              "kv_heads": args.kv_heads, "dim": args.dim, "dtype": args.dtype, "block_size": args.block_size,
              "density": args.density, "rounds": args.rounds}
    print(" ".join(f"{key}={value}" for key, value in header.items()))
    print("| length | item | wall s | wall speed-up vs SDPA (median, spread) | CPU s | CPU-time speed-up (median, "
          "spread) | blocks computed |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        for row in bench(length, args):
            rows.append({**header, **row})
            print(f"| {row['length']} | {row['item']} | {row['seconds']:.3f} | {row['speedup']:.2f}x "
                  f"({row['speedup_low']:.2f}-{row['speedup_high']:.2f}) | {row['cpu_seconds']:.3f} | "
                  f"{row['cpu_speedup']:.2f}x ({row['cpu_speedup_low']:.2f}-{row['cpu_speedup_high']:.2f}) | "
                  f"{row['blocks_computed']:.3f} |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
