"""Memory savings are real bytes: with an 8K-token prompt on a tiny llama (4 layers, 8 query /
2 KV heads, head dim 64), both policies at budget 512 hold at most 1/14 of the dense cache."""

import pytest
import torch
from conftest import random_ids

import kvx
from kvx import cache_of
from kvx.tiny import tiny_model

PROMPT = 8192


def stored_tensor_bytes(cache) -> int:
    """Bytes of the tensors the cache layers hold, summed here independently of ``nbytes()``."""
    return sum(
        t.numel() * t.element_size()
        for layer in cache.layers
        for t in (layer.keys, layer.values, getattr(layer, "valid", None))
        if t is not None
    )


@pytest.fixture(scope="module")
def setup():
    model = tiny_model(
        "llama", num_hidden_layers=4, hidden_size=512, intermediate_size=512,
        num_attention_heads=8, num_key_value_heads=2, head_dim=64,
    )
    ids = random_ids(1, PROMPT, seed=30)
    with torch.inference_mode():
        dense_cache = cache_of(model(ids, logits_to_keep=1))
    dense_bytes = stored_tensor_bytes(dense_cache)
    assert dense_bytes == 4 * 2 * 2 * PROMPT * 64 * 4  # layers * (K, V) * kv heads * tokens * dim * fp32
    return model, ids, dense_bytes


@pytest.mark.parametrize("policy,options", [("snapkv", {"budget": 512}), ("streaming_llm", {"sink": 4, "window": 508})])
def test_budget_512_holds_at_most_a_fourteenth(setup, policy, options):
    model, ids, dense_bytes = setup
    with kvx.patched(model, policy, **options), torch.inference_mode():
        cache = cache_of(model(ids, logits_to_keep=1))
    assert cache.nbytes() == stored_tensor_bytes(cache)
    assert cache.nbytes() * 14 <= dense_bytes, f"{cache.nbytes()} bytes vs dense {dense_bytes}"
    for s in cache.stats():
        assert s["seen"] == PROMPT and s["stored"] == 512 and s["kept_min"] == 512
    print(f"{policy}: {cache.nbytes()} / {dense_bytes} bytes = 1/{dense_bytes / cache.nbytes():.1f}")


def test_padding_record_does_not_pin_the_prefill_mask():
    from conftest import left_pad

    model = tiny_model("llama")
    ids, mask = left_pad([random_ids(1, n, seed=n)[0] for n in (300, 200)])
    with kvx.patched(model, "snapkv"), torch.inference_mode():  # full budget: nothing evicted
        cache = cache_of(model(ids, attention_mask=mask))
    layer = cache.layers[0]
    assert layer.valid is not None and layer.valid.untyped_storage().nbytes() == 2 * 2 * 300
    assert cache.nbytes() == stored_tensor_bytes(cache)


def test_sliding_layers_hold_only_their_window():
    model = tiny_model("gemma2")  # sliding window 16 on layer 0
    ids = random_ids(1, 500, seed=31)
    with kvx.patched(model, "snapkv", budget=32, window=8), torch.inference_mode():
        cache = cache_of(model(ids))
    sliding, full = cache.layers
    assert sliding.keys.shape[-2] == 15 and full.keys.shape[-2] == 32
    assert cache.nbytes() == stored_tensor_bytes(cache)  # no hidden views of the 500-token prompt
