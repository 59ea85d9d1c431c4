"""Batch > 1 with left padding: every row gets the result it would get alone, also when the
policy evicts, and padding is never kept as content."""

import pytest
import torch
from conftest import greedy, left_pad, random_ids

import kvx
from kvx import cache_of
from kvx.tiny import tiny_model

COMPRESSING = {"snapkv": {"budget": 16, "window": 4}, "streaming_llm": {"sink": 2, "window": 14}}
LENGTHS = (37, 24, 7)  # the last row is shorter than the budget
NEW_TOKENS = 6
# real tokens each row holds after generation: snapkv compresses the prompt, then appends;
# streaming_llm stays at sink + window; the short row never counts its padding
EXPECTED_KEPT = {"snapkv": [16 + 5, 16 + 5, 7 + 5], "streaming_llm": [16, 16, 7 + 5]}


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
@pytest.mark.parametrize("policy", sorted(COMPRESSING))
def test_padded_batch_equals_rows_alone(model_type, policy):
    model = tiny_model(model_type)
    rows = [random_ids(1, n, seed=n)[0] for n in LENGTHS]
    ids, mask = left_pad(rows)
    with kvx.patched(model, policy, **COMPRESSING[policy]):
        batch_seq, batch_logits, cache = greedy(model, ids, mask, new_tokens=NEW_TOKENS)
        for i, row in enumerate(rows):
            seq, logits, _ = greedy(model, row[None], new_tokens=NEW_TOKENS)
            assert torch.equal(batch_seq[i, -NEW_TOKENS:], seq[0, -NEW_TOKENS:]), f"row {i}"
            torch.testing.assert_close(batch_logits[:, i], logits[:, 0], rtol=1e-4, atol=1e-4)
    compressed = [s for s in cache.stats() if s["kind"] == "compressed"]
    assert compressed
    for layer_stats in compressed:
        assert [set(heads) for heads in layer_stats["kept_per_head"]] == [{n} for n in EXPECTED_KEPT[policy]]


def test_short_row_keeps_only_its_tokens(llama):
    rows = [random_ids(1, n, seed=n)[0] for n in (40, 9)]
    ids, mask = left_pad(rows)
    kvx.patch(llama, "snapkv", budget=16, window=4)
    try:
        with torch.inference_mode():
            out = llama(ids, attention_mask=mask)
    finally:
        kvx.unpatch(llama)
    for s in cache_of(out).stats():
        assert s["stored"] == 16
        assert [set(h) for h in s["kept_per_head"]] == [{16}, {9}]


ALL_COMPRESSING = {
    "h2o": {"budget": 16, "recent": 4},
    "tova": {"budget": 16},
    "keyformer": {"budget": 16, "recent": 4, "window": 4},
    "knorm": {"budget": 16, "decode_interval": 2},
    "pyramidkv": {"budget": 16, "window": 4, "beta": 4},
    "snapkv": {"budget": 16, "window": 4, "decode_interval": 3},
}


@pytest.mark.parametrize("policy", sorted(ALL_COMPRESSING))
def test_every_policy_batch_equals_rows_alone(policy):
    # float64: batching changes float32 rounding enough to flip near-tied scores (same tokens, other
    # ties); in float64 only a real difference between a row alone and in a batch shows up
    model = tiny_model("llama", dtype=torch.float64)
    rows = [random_ids(1, n, seed=n)[0] for n in LENGTHS]
    ids, mask = left_pad(rows)
    with kvx.patched(model, policy, **ALL_COMPRESSING[policy]):
        batch_seq, batch_logits, cache = greedy(model, ids, mask, new_tokens=NEW_TOKENS)
        for i, row in enumerate(rows):
            seq, logits, alone = greedy(model, row[None], new_tokens=NEW_TOKENS)
            assert torch.equal(batch_seq[i, -NEW_TOKENS:], seq[0, -NEW_TOKENS:]), f"row {i}"
            torch.testing.assert_close(batch_logits[:, i], logits[:, 0], rtol=1e-6, atol=1e-6)  # float32 logits
            for in_batch, by_itself in zip(cache.stats(), alone.stats()):
                kept = in_batch["kept_per_head"][i] if "kept_per_head" in in_batch else [in_batch["kept_min"]] * 2
                assert set(kept) == {by_itself["kept_min"]}  # padding is never kept as content
