"""The block-sparse prefill methods (a_shape, vertical_slash, block_topk) on a tiny model: the sparse
op really runs at prefill (padded batches and chunks included), decode and short prompts attend
densely, ``cache.stats()`` counts the blocks computed, a padded row equals the row alone below full
density, and bad options are refused by name. (Their exact settings equal dense attention on every
storage kind: ``test_method_conformance.py``.)"""

import pytest
import torch
from conftest import greedy, left_pad, random_ids

import kvx
import kvx.methods.block_sparse as block_sparse_method
from kvx.compose import from_spec
from kvx.kernels import reference
from kvx.storage import DenseLayer
from kvx.tiny import tiny_model

SPARSE = {  # below full density, with blocks small enough that a 300-token prompt has many
    "a_shape": "a_shape:local=2,min_length=0,block_size=16",
    "vertical_slash": "vertical_slash:density=0.3,min_length=0,block_size=16,last_queries=16",
    "block_topk": "block_topk:density=0.3,min_length=0,block_size=16",
    "block_topk_threshold": "block_topk:threshold=0.5,min_length=0,block_size=16",
    "block_topk_pooled": "block_topk:estimate=pooled,density=0.3,min_length=0,block_size=16",
    "block_topk_mean_only": "block_topk:density=0.3,min_length=0,block_size=16,last_queries=0",
    "block_topk_last_40": "block_topk:density=0.3,min_length=0,block_size=16,last_queries=40",
}


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture
def sparse_calls(monkeypatch):
    """The query counts of every block-sparse op call the methods make."""
    calls = []
    real = block_sparse_method.block_sparse_attention

    def spy(query, *args, **kwargs):
        calls.append(query.shape[-2])
        return real(query, *args, **kwargs)

    monkeypatch.setattr(block_sparse_method, "block_sparse_attention", spy)
    return calls


@pytest.mark.parametrize("spec", SPARSE.values(), ids=SPARSE.keys())
def test_a_padded_row_equals_the_row_alone_and_blocks_are_counted(model, spec, sparse_calls):
    rows = [random_ids(1, n, seed=n)[0] for n in (300, 211)]
    ids, mask = left_pad(rows)
    with kvx.patched(model, from_spec(spec)):
        seq, logits, cache = greedy(model, ids, mask, new_tokens=3)
        alone = [greedy(model, row[None], new_tokens=3) for row in rows]
    layers = model.config.num_hidden_layers
    assert sparse_calls == [300] * layers + [300] * layers + [211] * layers  # prefill only, never decode
    for i, (row_seq, row_logits, _) in enumerate(alone):
        assert torch.equal(seq[i, -3:], row_seq[0, -3:])
        torch.testing.assert_close(logits[:, i], row_logits[:, 0], rtol=1e-4, atol=1e-4)
    heads = model.config.num_attention_heads
    # causal blocks of real tokens: row 0 fills 19 blocks of 16 (the first partial), row 1 14
    causal = heads * (19 * 20 // 2 + 14 * 15 // 2)
    for stats in cache.stats():
        assert stats["blocks_causal"] == causal
        assert 0.15 * causal < stats["blocks_computed"] < 0.8 * causal  # really sparse, and not empty


def test_sparse_attention_differs_from_dense_below_full_density(model):
    """A check that the comparisons above can fail: sparse attention changes the logits."""
    ids = random_ids(1, 300, seed=5)
    with kvx.patched(model, "snapkv", budget=4096):
        _, dense, _ = greedy(model, ids, new_tokens=1)
    with kvx.patched(model, from_spec(SPARSE["a_shape"])):
        _, sparse, _ = greedy(model, ids, new_tokens=1)
    assert (dense - sparse).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["a_shape", "vertical_slash", "block_topk"])
def test_exact_setting_computes_every_causal_block_in_chunks(model, name, sparse_calls):
    method = kvx.methods.method_class(name).exact()
    method.block_size = 16
    ids = random_ids(1, 100, seed=6)
    with kvx.patched(model, method, chunk_size=40):
        out = kvx.prefill(model, ids, chunk_size=40)
    layers = model.config.num_hidden_layers
    assert sparse_calls == [40] * layers + [40] * layers + [20] * layers
    stats = kvx.cache_of(out).stats()
    # chunks of 40 queries over 40, 80, 100 keys in blocks of 16 (the grid ends at the last key)
    per_head = (3 * 3 - 3 * 2 // 2) + (3 * 5 - 3 * 2 // 2) + (2 * 7 - 2 * 1 // 2)
    assert [(s["blocks_computed"], s["blocks_causal"]) for s in stats] == [
        (per_head * model.config.num_attention_heads,) * 2] * layers


def test_short_prompts_and_decode_attend_densely(model, sparse_calls):
    ids = random_ids(1, 60, seed=7)
    with kvx.patched(model, "vertical_slash", block_size=16, min_length=61):
        _, _, cache = greedy(model, ids, new_tokens=3)
    assert sparse_calls == []
    stats = cache.stats()
    assert all(s["blocks_computed"] == s["blocks_causal"] > 0 for s in stats)  # counted, as dense


def test_a_mask_that_is_not_plain_causal_gets_dense_attention():
    """The storage offers a view to compute a subset of only when the mask is causal over its valid
    slots; any other mask (a bidirectional prefix, a window) goes to dense attention."""
    layer = DenseLayer()
    layer.update(torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8))
    causal = reference.causal_mask(6, 6, torch.device("cpu"))
    assert layer.causal_view(None) is not None and layer.causal_view(causal) is not None
    bidirectional = causal.clone()
    bidirectional[..., :3, :3] = True
    assert layer.causal_view(bidirectional) is None
    window = causal.clone()
    window[..., 5, 0] = False
    assert layer.causal_view(window) is None


@pytest.mark.parametrize("spec,message", [
    ("vertical_slash:density=0", r"vertical_slash: density must be a number in \(0, 1\], got 0"),
    ("block_topk:density=1.5", r"block_topk: density must be a number in \(0, 1\], got 1.5"),
    ("block_topk:threshold=-0.1", r"block_topk: threshold must be a number in \(0, 1\], got -0.1"),
    ("a_shape:block_size=48", r"a_shape: block_size must be a power of two >= 16 \(one of 16, 32, 64, 128, 256\), "
                              r"got 48"),
    ("vertical_slash:block_size=8", r"power of two >= 16 .*got 8"),
    ("a_shape:local=0", r"a_shape: local must be >= 1, got 0"),
    ("vertical_slash:last_queries=0", r"vertical_slash: last_queries must be >= 1, got 0"),
    ("block_topk:estimate=max", r"block_topk: estimate must be one of keys, pooled; got 'max'"),
    ("block_topk:last_queries=-1", r"block_topk: last_queries must be >= 0, got -1"),
])
def test_bad_options_are_refused_by_name(spec, message):
    with pytest.raises(ValueError, match=message):
        from_spec(spec)


def test_composes_with_a_selection_and_names_the_axes(model):
    policy = from_spec("vertical_slash:density=0.2,min_length=0,block_size=16+snapkv:budget=64")
    assert policy.axes() == {"selection": "snapkv", "storage": "dense", "method": "vertical_slash"}
    with kvx.patched(model, policy):
        _, _, cache = greedy(model, random_ids(1, 200, seed=8), new_tokens=2)
    assert {s["stored"] for s in cache.stats()} == {64 + 1}  # the selection evicted as usual
    assert all(s["blocks_computed"] < s["blocks_causal"] for s in cache.stats())
