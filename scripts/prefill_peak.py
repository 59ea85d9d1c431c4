"""Tracked peak memory of a chunked prefill against the dense model's prefill in one piece.

A random-weight model (a ``kvx bench`` preset, ``tiny-llama`` by default), one random prompt per
length; the peak counts every tensor storage torch allocates during the call (weights and inputs
excluded, see :func:`kvx.eval.measure.measure_peak`), so it is deterministic and noise-free.
Run: ``python scripts/prefill_peak.py --lengths 2k,4k,8k,16k,32k --chunk-size 4096 snapkv:budget=1024 h2o:budget=1024``.
"""

from __future__ import annotations

import argparse

import torch

import kvx
from kvx.compose import from_spec
from kvx.eval import bench
from kvx.eval.measure import measure_peak
from kvx.eval.needle import parse_length


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("policies", nargs="+", help="policy specs (name:key=value,...[+name...])")
    parser.add_argument("--model", default="tiny-llama", help="a kvx bench preset (default tiny-llama)")
    parser.add_argument("--lengths", default="2k,4k,8k", help="prompt lengths (default 2k,4k,8k)")
    parser.add_argument("--chunk-size", type=int, default=kvx.api.DEFAULT_CHUNK_SIZE,
                        help=f"prefill chunk size (default kvx's, {kvx.api.DEFAULT_CHUNK_SIZE})")
    args = parser.parse_args()
    lengths = [parse_length(part) for part in args.lengths.split(",")]
    device = torch.device("cpu")
    model = bench.build_model(args.model, device, torch.float32, max(lengths) + 8)
    print(f"tracked peak of a prefill in chunks of {args.chunk_size} against dense in one piece, {args.model}")
    for length in lengths:
        ids = torch.randint(3, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            _, dense = measure_peak(lambda: model(ids, logits_to_keep=1), device, track_rss=False)
        row = [f"{length:>6}: dense {dense.tracked / 2**20:.0f} MiB"]
        for spec in args.policies:
            with kvx.patched(model, from_spec(spec)), torch.inference_mode():
                _, peak = measure_peak(lambda: kvx.prefill(model, ids, chunk_size=args.chunk_size), device,
                                       track_rss=False)
            row.append(f"{spec} {peak.tracked / dense.tracked:.3f}")
        print(" | ".join(row), flush=True)


if __name__ == "__main__":
    main()
