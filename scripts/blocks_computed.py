"""The share of causal attention blocks each block-sparse policy really computes on needle prompts
(``cache.stats()``: ``blocks_computed / blocks_causal`` summed over layers and prompts), per length;
with ``--time``, also the prefill's process CPU time (median over rounds, policies in rotated order).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/blocks_computed.py --lengths 1k,2k,4k \\
        --policy vertical_slash:density=0.1,min_length=0,block_size=16 \\
        --policy head_patterns:patterns=runs/patterns-10.safetensors,min_length=0,block_size=16
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

import kvx
from kvx.cli import _parse_ints
from kvx.compose import from_spec
from kvx.eval.haystack import PromptTemplate, build_prompt, make_needles
from kvx.eval.needle import DEFAULT_MODEL, load_model


def prompt(tokenizer, length: int, depth: float) -> torch.Tensor:
    rng = random.Random(f"blocks:{length}:{depth}")
    spec = make_needles("single", rng)
    return torch.tensor([build_prompt(tokenizer, length, depth, spec, rng, template=PromptTemplate(tokenizer)).ids])


def prefill(model, spec: str, ids: torch.Tensor) -> tuple[int, int, float]:
    """``(blocks computed, causal blocks, process CPU seconds)`` of one prefill under ``spec``."""
    with kvx.patched(model, from_spec(spec)), torch.inference_mode():
        start = time.process_time()
        out = model(ids, use_cache=True)
        seconds = time.process_time() - start
    stats = kvx.cache_of(out).stats()
    return sum(s["blocks_computed"] for s in stats), sum(s["blocks_causal"] for s in stats), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--lengths", default="1k,2k,4k")
    parser.add_argument("--depths", default="0,50,100")
    parser.add_argument("--policy", action="append", required=True)
    parser.add_argument("--time", type=int, default=0, metavar="ROUNDS",
                        help="also time the prefill at the middle depth: ROUNDS rounds after a warm-up one")
    args = parser.parse_args()
    model, tokenizer = load_model(args.model)
    lengths = _parse_ints(args.lengths, "--lengths")
    depths = [float(d) for d in args.depths.split(",")]
    shares = {}
    for spec in args.policy:
        for length in lengths:
            runs = [prefill(model, spec, prompt(tokenizer, length, d)) for d in depths]
            shares[spec, length] = sum(r[0] for r in runs) / sum(r[1] for r in runs)
    seconds = {key: [] for key in shares}
    for round_ in range(args.time + 1 if args.time else 0):
        for length in lengths:
            ids = prompt(tokenizer, length, depths[len(depths) // 2])
            order = args.policy[round_ % len(args.policy):] + args.policy[:round_ % len(args.policy)]
            for spec in order:
                cpu = prefill(model, spec, ids)[2]
                if round_:  # the first round warms up
                    seconds[spec, length].append(cpu)
    cells = [f"{n} computed" for n in lengths] + ([f"{n} CPU s" for n in lengths] if args.time else [])
    print("| policy | " + " | ".join(cells) + " |")
    print("|---|" + "---|" * len(cells))
    for spec in args.policy:
        row = [f"{shares[spec, n]:.3f}" for n in lengths]
        row += [f"{statistics.median(seconds[spec, n]):.3f}" for n in lengths] if args.time else []
        print(f"| `{spec}` | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
