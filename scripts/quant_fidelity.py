"""Relative error of the last layer's attention output against fp32 dense, per storage policy.

A random-weight model (``kvx bench``'s ``tiny-llama`` preset by default), a random prompt of
``--length`` tokens prefilled in one piece, then one decoded token: the error is measured on that
token's attention output of the last layer, ``||out - dense|| / ||dense||``, averaged over
``--prompts`` prompts. Run: ``python scripts/quant_fidelity.py --length 2048``.
"""

from __future__ import annotations

import argparse

import torch

import kvx
from kvx.compose import from_spec
from kvx.eval import bench

POLICIES = ["int8", "kivi:bits=4", "kivi:bits=2", "kvquant:bits=4", "kvquant:bits=2", "kvquant:bits=2,outliers=0",
            "mikv:budget=256+mixed:high_bits=8,low_bits=2", "mikv:budget=256+mixed:high_bits=16,low_bits=2",
            "snapkv:budget=256+kivi:bits=4", "snapkv:budget=256", "head_budget:budget=256+kivi:bits=4",
            "head_budget:budget=256"]


def last_attention_output(model, ids: torch.Tensor, spec: str | None) -> torch.Tensor:
    """The last layer's attention output ``[1, 1, hidden]`` at the first decoded token."""
    captured = []
    attention = model.model.layers[-1].self_attn
    handle = attention.register_forward_hook(lambda module, args, out: captured.append(out[0].detach()))
    try:
        with torch.inference_mode(), (kvx.patched(model, from_spec(spec)) if spec else _nothing()):
            out = kvx.prefill(model, ids, chunk_size=None) if spec else model(ids, logits_to_keep=1)
            token = out.logits[:, -1:].argmax(-1)
            model(token, **kvx.cache_kwargs(kvx.cache_of(out)))
    finally:
        handle.remove()
    return captured[-1].float()


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama", help="a kvx bench preset (default tiny-llama)")
    parser.add_argument("--length", type=int, default=2048, help="prompt tokens (default 2048)")
    parser.add_argument("--prompts", type=int, default=3, help="prompts averaged (default 3)")
    args = parser.parse_args()
    model = bench.build_model(args.model, torch.device("cpu"), torch.float32, args.length + 8)
    errors = {spec: [] for spec in POLICIES}
    for seed in range(args.prompts):
        ids = torch.randint(3, model.config.vocab_size, (1, args.length), generator=torch.Generator().manual_seed(seed))
        dense = last_attention_output(model, ids, None)
        for spec in POLICIES:
            out = last_attention_output(model, ids, spec)
            errors[spec].append(float((out - dense).norm() / dense.norm()))
    print(f"relative error of the last layer's attention output, {args.model}, {args.length} tokens, "
          f"{args.prompts} prompts (mean, max)")
    for spec, values in errors.items():
        print(f"  {spec:<50} {sum(values) / len(values):.4f}  {max(values):.4f}")


if __name__ == "__main__":
    main()
