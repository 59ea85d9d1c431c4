"""``kvx demo``: patch a small random Llama and compare dense and compressed generation.

Prints, for dense and each policy: KV-cache bytes after generation (from the cache, cross-checked
against the stored tensors), the ratio to dense, time, and how many generated tokens agree with
dense. A random model says nothing about accuracy; the needle runner on a trained model does.
"""

from __future__ import annotations

import time

import torch

import kvx
from kvx.cache import cache_nbytes
from kvx.compat import cache_of
from kvx.tiny import tiny_model

DEMO_POLICIES: list[tuple[str, dict]] = [
    ("snapkv", {"budget": 256, "window": 32}),
    ("streaming_llm", {"sink": 4, "window": 252}),
]


def _generate(model, ids: torch.Tensor, new_tokens: int):
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    return out, time.perf_counter() - start


def run_demo(prompt_tokens: int = 2048, new_tokens: int = 16) -> list[dict]:
    model = tiny_model(
        "llama", num_hidden_layers=4, hidden_size=512, intermediate_size=1024,
        num_attention_heads=8, num_key_value_heads=2, head_dim=64,
    )
    ids = torch.randint(3, model.config.vocab_size, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    print(f"tiny random llama: 4 layers, 8 query / 2 KV heads, head dim 64; prompt {prompt_tokens} tokens, "
          f"{new_tokens} new tokens, greedy")
    dense, dense_time = _generate(model, ids, new_tokens)
    dense_bytes = cache_nbytes(cache_of(dense))
    rows = [dict(policy="dense", kv_bytes=dense_bytes, ratio=1.0, seconds=dense_time, agree=new_tokens)]
    for name, options in DEMO_POLICIES:
        with kvx.patched(model, name, **options) as policy:
            out, seconds = _generate(model, ids, new_tokens)
        cache = cache_of(out)
        agree = int((out.sequences[0, -new_tokens:] == dense.sequences[0, -new_tokens:]).sum())
        rows.append(dict(policy=policy.describe(), kv_bytes=cache.nbytes(), ratio=cache.nbytes() / dense_bytes,
                         seconds=seconds, agree=agree))
    print(f"\n{'policy':<80} {'KV bytes':>10} {'vs dense':>9} {'time s':>7} {'tokens = dense':>15}")
    for r in rows:
        print(f"{r['policy']:<80} {r['kv_bytes']:>10} {r['ratio']:>9.4f} {r['seconds']:>7.2f} "
              f"{r['agree']:>9}/{new_tokens}")
    return rows
