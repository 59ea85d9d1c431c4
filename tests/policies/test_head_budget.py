"""Head-wise budgets on ragged storage: real per-head counts, exact bytes, the same outputs as
the dense path where both should agree, rows alone = rows in a padded batch."""

import pytest
import torch
from conftest import MODEL_TYPES, greedy, left_pad, random_ids

import kvx
from kvx import cache_kwargs, cache_of
from kvx.tiny import tiny_model


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_floor_one_reproduces_snapkv_through_the_ragged_path(backend, monkeypatch):
    """With floor=1 each head keeps exactly its own top-k: the same tokens SnapKV keeps, so the
    ragged storage, its packing, the prefix/tail merge and the decode kernel must give SnapKV's
    outputs."""
    pytest.importorskip("triton") if backend == "triton" else None
    monkeypatch.setenv("KVX_BACKEND", backend)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # on a GPU the kernel runs for real
    model = tiny_model("llama").to(device)
    ids = random_ids(1, 60, seed=50).to(device)
    with kvx.patched(model, "snapkv", budget=12, window=4):
        dense_seq, dense_logits, dense_cache = greedy(model, ids, new_tokens=5)
    with kvx.patched(model, "head_budget", budget=12, window=4, floor=1.0):
        seq, logits, cache = greedy(model, ids, new_tokens=5)
    assert all(s["kind"] == "ragged" for s in cache.stats())
    assert torch.equal(seq, dense_seq)
    torch.testing.assert_close(logits, dense_logits, rtol=1e-5, atol=1e-5)


def test_heads_keep_different_counts_and_bytes_are_exact():
    model = tiny_model("llama", num_key_value_heads=2, num_attention_heads=4)
    ids = random_ids(1, 80, seed=51)
    with kvx.patched(model, "head_budget", budget=16, window=4, floor=0.0):
        _, _, cache = greedy(model, ids, new_tokens=3)
    dim = model.config.head_dim
    uneven = False
    for s, layer in zip(cache.stats(), cache.layers):
        kept = torch.tensor(s.get("kept_per_head", [[s["kept_min"]] * 2]))
        uneven |= s["kept_min"] != s["kept_max"]
        assert int(kept.sum()) == 2 * 16 + 2 * 2  # the layer's budget over its 2 heads, + 2 decoded tokens per head
        assert s["kv_bytes"] == int(kept.sum()) * 2 * dim * 4  # (K + V) x dim x fp32, no padding
        assert s["nbytes"] == s["kv_bytes"] + layer.prefix_offsets.numel() * 8  # + segment offsets
    assert uneven


def test_padded_batch_equals_rows_alone():
    model = tiny_model("llama", dtype=torch.float64)
    rows = [random_ids(1, n, seed=n)[0] for n in (45, 30, 9)]
    ids, mask = left_pad(rows)
    with kvx.patched(model, "head_budget", budget=12, window=4, decode_interval=2):
        batch_seq, batch_logits, cache = greedy(model, ids, mask, new_tokens=6)
        for i, row in enumerate(rows):
            seq, logits, alone = greedy(model, row[None], new_tokens=6)
            assert torch.equal(batch_seq[i, -6:], seq[0, -6:])
            torch.testing.assert_close(batch_logits[:, i], logits[:, 0], rtol=1e-6, atol=1e-6)
            for in_batch, by_itself in zip(cache.stats(), alone.stats()):
                per_head = in_batch["kept_per_head"][i] if "kept_per_head" in in_batch else [in_batch["kept_min"]] * 2
                alone_heads = by_itself.get("kept_per_head", [[by_itself["kept_min"]] * 2])[0]
                assert per_head == alone_heads  # padding is never stored


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_full_budget_equals_dense(model_type):
    model = tiny_model(model_type)
    ids = random_ids(1, 40, seed=52)
    dense_seq, dense_logits, _ = greedy(model, ids)
    with kvx.patched(model, "head_budget", budget=1024, decode_interval=1):
        seq, logits, _ = greedy(model, ids)
    assert torch.equal(seq, dense_seq)
    torch.testing.assert_close(logits, dense_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "options,error,match",
    [
        ({"scorer": "streaming_llm"}, TypeError, "does not rank tokens by importance"),
        ({"floor": 1.5}, ValueError, r"floor must be a number in \[0, 1\]"),
        ({"scorer": "nope"}, ValueError, "unknown policy 'nope'"),
    ],
)
def test_bad_input(options, error, match):
    with pytest.raises(error, match=match):
        kvx.make_policy("head_budget", **options)


def test_a_dense_cache_is_refused_for_ragged_policies():
    model = tiny_model("llama")
    with kvx.patched(model, "head_budget", budget=8, window=4), pytest.raises(ValueError, match="needs ragged"):
        model(random_ids(1, 10), **cache_kwargs(kvx.KVCache(model.config)))


@pytest.mark.parametrize("scorer", ["h2o", "keyformer"])
def test_stateful_scorers_keep_their_statistics_aligned(scorer):
    """With floor=1 each head keeps its own top-k: the same tokens the scorer alone keeps, step after
    step, only if the statistics stay aligned with the packed tokens."""
    model = tiny_model("llama")
    ids = random_ids(1, 50, seed=53)
    options = {"budget": 12, "recent": 4, "decode_interval": 2}
    with kvx.patched(model, scorer, **options):
        dense_seq, dense_logits, _ = greedy(model, ids, new_tokens=6)
    with kvx.patched(model, "head_budget", budget=12, window=4, floor=1.0, scorer=kvx.make_policy(scorer, **options),
                     decode_interval=2):
        seq, logits, cache = greedy(model, ids, new_tokens=6)
    assert torch.equal(seq, dense_seq)
    torch.testing.assert_close(logits, dense_logits, rtol=1e-5, atol=1e-5)
    layer = cache.layers[0]
    assert set(layer.prefix_state) == {scorer} and layer.prefix_state[scorer].numel() == layer.prefix_keys.shape[0]


@pytest.mark.parametrize("scorer", ["snapkv", "h2o"])
def test_beam_search_reorders_ragged_storage(scorer):
    """Beams re-order (and repeat) the packed per-head segments and their statistics: with floor=1
    head_budget keeps its scorer's tokens, so beam search must give the scorer's own beams."""
    model = tiny_model("llama")
    ids = random_ids(2, 40, seed=53)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0,
                  num_beams=3, num_return_sequences=2)
    options = {"snapkv": {"budget": 10, "window": 3}, "h2o": {"budget": 10, "recent": 3, "decode_interval": 2}}[scorer]
    with kvx.patched(model, scorer, **options), torch.inference_mode():
        want = model.generate(ids, **kwargs)
    with kvx.patched(model, "head_budget", budget=10, window=3, floor=1.0, scorer=kvx.make_policy(scorer, **options),
                     decode_interval=options.get("decode_interval", 0)), torch.inference_mode():
        got = model.generate(ids, return_dict_in_generate=True, **kwargs)
    assert torch.equal(got.sequences, want)
    assert all(s["kind"] == "ragged" for s in cache_of(got).stats())


@pytest.mark.parametrize("operation,rows", [
    (lambda layer: layer.reorder_cache(torch.tensor([2, 1, 0, 1])), [2, 1, 0, 1]),
    (lambda layer: layer.batch_repeat_interleave(2), [0, 0, 1, 1, 2, 2]),
    (lambda layer: layer.batch_select_indices(torch.tensor([1, 2])), [1, 2]),
])
def test_batch_operations_move_every_packed_segment_with_its_row(operation, rows):
    """Row i after the operation holds, head by head, exactly what row rows[i] held: keys, values,
    statistics, padding and counts (beam search on different beams, an empty segment, a padded tail)."""
    import copy

    from kvx.storage import RaggedLayer

    g = torch.Generator().manual_seed(3)
    batch, kv_heads, length, dim, tail = 3, 2, 10, 4, 2
    layer = RaggedLayer()
    layer.update(torch.randn(batch, kv_heads, length, dim, generator=g), torch.randn(batch, kv_heads, length, dim, generator=g))
    layer.count_real(None, batch, length)
    keep = torch.rand(batch, kv_heads, length, generator=g) > 0.5
    keep[1, 1] = False  # an empty segment
    layer.repack(keep, {"h2o": torch.randn(batch, kv_heads, length, generator=g)})
    layer.update(torch.randn(batch, kv_heads, tail, dim, generator=g), torch.randn(batch, kv_heads, tail, dim, generator=g))
    layer.state["h2o"] = torch.randn(batch, kv_heads, tail, generator=g)
    layer.valid = torch.ones(batch, kv_heads, tail, dtype=torch.bool)
    layer.valid[0, :, 0] = False  # padding in the tail of row 0
    keys, values, valid = layer.dense_view()
    stats = layer.dense_state()["h2o"]

    moved = copy.deepcopy(layer)
    operation(moved)
    new_keys, new_values, new_valid = moved.dense_view()
    new_stats = moved.dense_state()["h2o"]
    assert new_valid.shape[0] == len(rows)
    for new_row, old_row in enumerate(rows):
        for head in range(kv_heads):
            now, before = new_valid[new_row, head], valid[old_row, head]
            assert int(now.sum()) == int(before.sum())
            assert torch.equal(new_keys[new_row, head][now], keys[old_row, head][before])
            assert torch.equal(new_values[new_row, head][now], values[old_row, head][before])
            assert torch.equal(new_stats[new_row, head][now], stats[old_row, head][before])
    assert moved.real_seen.tolist() == [layer.real_seen[r].item() for r in rows]
