"""The share of causal attention blocks each block-sparse policy really computes on needle prompts
(``cache.stats()``: ``blocks_computed / blocks_causal`` summed over layers and prompts), per length.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/blocks_computed.py --lengths 1k,2k,4k \\
        --policy vertical_slash:density=0.1,min_length=0,block_size=16 \\
        --policy head_patterns:patterns=runs/patterns-10.safetensors,min_length=0,block_size=16
"""

from __future__ import annotations

import argparse
import random

import torch

import kvx
from kvx.cli import _parse_ints
from kvx.compose import from_spec
from kvx.eval.haystack import PromptTemplate, build_prompt, make_needles
from kvx.eval.needle import DEFAULT_MODEL, load_model


def share(model, tokenizer, spec: str, length: int, depths: list[float]) -> float:
    computed = causal = 0
    for depth in depths:
        rng = random.Random(f"blocks:{length}:{depth}")
        ids = build_prompt(tokenizer, length, depth, make_needles("single", rng), rng,
                           template=PromptTemplate(tokenizer)).ids
        with kvx.patched(model, from_spec(spec)), torch.inference_mode():
            out = model(torch.tensor([ids]), use_cache=True)
        for stats in kvx.cache_of(out).stats():
            computed += stats["blocks_computed"]
            causal += stats["blocks_causal"]
    return computed / causal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--lengths", default="1k,2k,4k")
    parser.add_argument("--depths", default="0,50,100")
    parser.add_argument("--policy", action="append", required=True)
    args = parser.parse_args()
    model, tokenizer = load_model(args.model)
    lengths = _parse_ints(args.lengths, "--lengths")
    depths = [float(d) for d in args.depths.split(",")]
    print("| policy | " + " | ".join(f"{n}" for n in lengths) + " |")
    print("|---|" + "---|" * len(lengths))
    for spec in args.policy:
        print(f"| `{spec}` | " + " | ".join(f"{share(model, tokenizer, spec, n, depths):.3f}" for n in lengths) + " |")


if __name__ == "__main__":
    main()
