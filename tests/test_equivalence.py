"""A policy whose budget keeps every token gives the dense model's outputs, on every adapter;
unpatching restores bit-identical outputs."""

import pytest
import torch
from conftest import MODEL_TYPES, greedy, left_pad, random_ids

import kvx
from kvx.tiny import tiny_model

FULL_BUDGET = {
    "snapkv": {"budget": 1024, "window": 8},
    "streaming_llm": {"sink": 4, "window": 1020},
    "h2o": {"budget": 1024},
    "tova": {"budget": 1024},
    "keyformer": {"budget": 1024},
    "knorm": {"budget": 1024, "decode_interval": 1},
    "pyramidkv": {"budget": 4096, "decode_interval": 1},  # the last layer keeps 4096 / 20 >= 48
    "retrieval_heads": {"ratio": 1.0, "sink": 0, "recent": 1},  # every head a retrieval head
}


@pytest.fixture(scope="module", params=MODEL_TYPES)
def model(request):
    return tiny_model(request.param)


@pytest.mark.parametrize("policy", sorted(FULL_BUDGET))
def test_full_budget_equals_dense(model, policy):
    ids = random_ids(1, 40, seed=1)
    dense_seq, dense_logits, _ = greedy(model, ids)
    with kvx.patched(model, policy, **FULL_BUDGET[policy]):
        seq, logits, cache = greedy(model, ids)
    assert isinstance(cache, kvx.KVCache)
    assert torch.equal(seq, dense_seq)
    torch.testing.assert_close(logits, dense_logits, rtol=1e-4, atol=1e-4)
    assert all(s["kept_min"] == s["kept_max"] == s["stored"] for s in cache.stats())


@pytest.mark.parametrize("policy", sorted(FULL_BUDGET))
def test_full_budget_equals_dense_with_left_padding(model, policy):
    ids, mask = left_pad([random_ids(1, n, seed=n)[0] for n in (30, 17)])
    dense_seq, dense_logits, _ = greedy(model, ids, mask)
    with kvx.patched(model, policy, **FULL_BUDGET[policy]):
        seq, logits, _ = greedy(model, ids, mask)
    assert torch.equal(seq, dense_seq)
    torch.testing.assert_close(logits, dense_logits, rtol=1e-4, atol=1e-4)


def test_unpatch_round_trip_is_bit_identical(model):
    ids = random_ids(1, 33, seed=2)
    before_seq, before_logits, before_cache = greedy(model, ids)
    kvx.patch(model, "snapkv", budget=8, window=4)
    greedy(model, ids)  # runs compressed in between
    kvx.unpatch(model)
    after_seq, after_logits, after_cache = greedy(model, ids)
    assert not kvx.is_patched(model)
    assert type(after_cache) is type(before_cache)
    assert torch.equal(after_seq, before_seq)
    assert torch.equal(after_logits, before_logits)
    assert not any(hasattr(m, "_kvx_context") for m in model.modules())
