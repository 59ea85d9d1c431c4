"""Decode step time of ``quest`` composed with a storage against that storage with dense attention,
interleaved in one run, on the bench's random-weight ``tiny-llama`` (4 layers, 8 query / 2 KV heads,
head dim 64).

For each length, one model copy per item is patched and prefilled (untimed, ``kvx.prefill``, which
ends the prompt: quantized storage quantizes it then); every round then times one greedy decode step
(the whole model forward) of each item in a rotated order, so load on a shared machine falls on
each alike. Items:

- ``base``: the storage alone (``--storage``), dense attention over it (packed decode kernel);
- ``quest``: ``--quest`` composed with it, reading only its chosen pages (this branch);
- ``quest_view``: the same, but read through the transient dense view (the behaviour before:
  :meth:`kvx.storage.base.Storage.decode_reader`'s default), for reference.

Reported per length and item: the median step time and the median of the per-round ratios
``base / item`` (lowest-highest in brackets), and quest's ``decode_keys_read / decode_keys_total``.
Run single threaded: ``OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_quest_storage.py``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import kvx
from kvx.compat import cache_kwargs, cache_of
from kvx.compose import from_spec
from kvx.eval.bench import build_model, rotated_rounds
from kvx.eval.measure import stamp
from kvx.storage.base import Storage
from kvx.storage.prefix import PrefixTailLayer


def _through_view(cache) -> None:
    """Make every layer of ``cache`` read through the transient dense view (the old behaviour)."""
    for layer in cache.layers:
        if isinstance(layer, PrefixTailLayer):
            layer.decode_reader = lambda mask, layer=layer: (
                PrefixTailLayer.decode_reader(layer, mask) if not layer.has_prefix
                else Storage.decode_reader(layer, mask))


def _prefilled(model, spec: str, ids: torch.Tensor, chunk: int):
    """A patched copy of ``model`` and its cache after the prompt ``ids``, and the next token."""
    mine = copy.deepcopy(model)
    kvx.patch(mine, from_spec(spec))
    with torch.inference_mode():
        out = kvx.prefill(mine, ids, chunk_size=chunk)
    return mine, cache_of(out), out.logits[:, -1:].argmax(-1)


def _step(model, cache, token):
    with torch.inference_mode():
        out = model(token, **cache_kwargs(cache))
    return out.logits[:, -1:].argmax(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="8192,16384")
    parser.add_argument("--storage", default="kivi:bits=4")
    parser.add_argument("--quest", default="quest:budget=256,dense_layers=0")
    parser.add_argument("--rounds", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=2048, help="prefill chunk (untimed)")
    parser.add_argument("--prefill-threads", type=int, default=0, help="threads for the untimed prefill (0: as is)")
    args = parser.parse_args()
    print(stamp(torch.device("cpu")))
    decode_threads = torch.get_num_threads()
    specs = {"base": args.storage, "quest": f"{args.quest}+{args.storage}", "quest_view": f"{args.quest}+{args.storage}"}
    print("| length | item | spec | step ms | speed-up vs base (spread) | keys read / stored |")
    print("|---|---|---|---|---|---|")
    for length in (int(n) for n in args.lengths.split(",")):
        model = build_model("tiny-llama", torch.device("cpu"), torch.float32, length + args.rounds + 8)
        ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
        if args.prefill_threads:
            torch.set_num_threads(args.prefill_threads)
        runs = {name: list(_prefilled(model, spec, ids, args.chunk)) for name, spec in specs.items()}
        torch.set_num_threads(decode_threads)
        _through_view(runs["quest_view"][1])
        times = {name: [] for name in runs}
        for _, name in rotated_rounds(list(runs), args.rounds + 1):
            patched, cache, token = runs[name]
            start = time.perf_counter()
            runs[name][2] = _step(patched, cache, token)
            times[name].append(time.perf_counter() - start)
        times = {name: t[len(runs):] for name, t in times.items()}  # the first round warms up
        for name, (patched, cache, _) in runs.items():
            ratios = [b / t for b, t in zip(times["base"], times[name])]
            stats = [s for s in cache.stats() if "decode_keys_total" in s]
            share = (f"{sum(s['decode_keys_read'] for s in stats) / sum(s['decode_keys_total'] for s in stats):.3f}"
                     if stats else "-")
            print(f"| {length} | {name} | {specs[name]} | {statistics.median(times[name]) * 1e3:.1f} | "
                  f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) | {share} |", flush=True)


if __name__ == "__main__":
    main()
