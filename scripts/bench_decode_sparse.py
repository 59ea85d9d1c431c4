"""One layer's decode step (one new query) with quest and tidal against dense SDPA, in the same run.

For each length: a dense kvx storage layer holding random keys and values; every round appends one
token (untimed) and times, in a rotated order (so a burst of load on a shared machine falls on each
alike):

- ``dense``: the storage's own decode attention (SDPA over every stored token, GQA native);
- ``quest``: the whole method at ``--budget`` tokens: extend the page bounds with the new token,
  score the pages, pick the top ones, gather their tokens, attend;
- ``tidal_select``: a tidal selection layer (dense attention, plus the logits, softmax and top-k
  that choose the tokens);
- ``tidal_sparse``: a tidal layer after it (gather the chosen tokens, attend).

Reported per length and item: the median wall and CPU seconds over rounds and the median of the
per-round speed-ups against dense (lowest-highest in brackets). Run single threaded:
``OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_decode_sparse.py``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kvx.eval.bench import rotated_rounds
from kvx.eval.measure import stamp
from kvx.methods import Quest, Tidal
from kvx.storage import DenseLayer


class _Cache:
    """What a method reads of the forward's cache: its layers and the cross-layer state."""

    def __init__(self, layers: int):
        self.layers = [None] * layers
        self.method_state = {}


def _layer(length: int, kv_heads: int, dim: int, seed: int = 0) -> DenseLayer:
    g = torch.Generator().manual_seed(seed)
    layer = DenseLayer()
    layer.update(torch.randn(1, kv_heads, length, dim, generator=g), torch.randn(1, kv_heads, length, dim, generator=g))
    return layer


def _step(layer: DenseLayer, query: torch.Tensor, g: torch.Generator):
    kv_heads, dim = layer.keys.shape[1], layer.keys.shape[-1]
    return layer.update(torch.randn(1, kv_heads, 1, dim, generator=g), torch.randn(1, kv_heads, 1, dim, generator=g))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="8192,32768")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    print(stamp(torch.device("cpu")))
    scaling = args.dim ** -0.5
    quest = Quest(budget=args.budget, dense_layers=0)
    tidal = Tidal(budget=args.budget, select_layer=0, reselect_layer=-1)
    print("| length | item | wall ms | CPU ms | speed-up vs dense, wall (spread) | CPU-time speed-up (spread) |")
    print("|---|---|---|---|---|---|")
    for length in (int(n) for n in args.lengths.split(",")):
        g = torch.Generator().manual_seed(1)
        query = torch.randn(1, args.heads, 1, args.dim, generator=g)
        layers = {name: _layer(length, args.kv_heads, args.dim) for name in ("dense", "quest", "tidal")}
        cache = _Cache(2)
        calls = {
            "dense": lambda k, v, s: s.attend(query, k, v, None, scaling, None, None),
            "quest": lambda k, v, s: quest.attend_layer(cache, 0, s, query, k, v, None, scaling, None, None),
            "tidal_select": lambda k, v, s: tidal.attend_layer(cache, 0, s, query, k, v, None, scaling, None, None),
            "tidal_sparse": lambda k, v, s: tidal.attend_layer(cache, 1, s, query, k, v, None, scaling, None, None),
        }
        storage_of = {"dense": "dense", "quest": "quest", "tidal_select": "tidal", "tidal_sparse": "tidal"}
        times = {name: [] for name in calls}
        calls["quest"](layers["quest"].keys, layers["quest"].values, layers["quest"])  # warm up: build the bounds
        current = None
        for round_index, name in rotated_rounds(list(calls), args.rounds):
            if round_index != current:  # one new token per round in every layer, untimed
                current = round_index
                for layer in layers.values():
                    _step(layer, query, g)
            layer = layers[storage_of[name]]
            if name == "tidal_sparse":  # the selection of this round's step, untimed
                calls["tidal_select"](layer.keys, layer.values, layer)
            wall, cpu = time.perf_counter(), time.process_time()
            calls[name](layer.keys, layer.values, layer)
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
        for name in calls:
            wall = statistics.median(t[0] for t in times[name]) * 1e3
            cpu = statistics.median(t[1] for t in times[name]) * 1e3
            ratios = [[d[i] / t[i] for d, t in zip(times["dense"], times[name])] for i in (0, 1)]
            text = [f"{statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f})" for r in ratios]
            print(f"| {length} | {name} | {wall:.2f} | {cpu:.2f} | {text[0]} | {text[1]} |", flush=True)


if __name__ == "__main__":
    main()
