"""kvx.compose: one policy per axis joined into one; a selection on ragged storage keeps what it
keeps on dense storage."""

import pytest
import torch
from conftest import greedy, left_pad, random_ids

import kvx
from kvx.tiny import tiny_model


def test_name_describe_and_storage():
    policy = kvx.compose(kvx.make_policy("snapkv", budget=64, window=8), "ragged")
    assert policy.name == "snapkv+ragged" and policy.storage == "ragged"
    assert policy.describe().startswith("snapkv(budget=64,") and policy.describe().endswith("+ragged()")
    assert kvx.compose("snapkv").storage == "dense"


def test_a_selection_is_composed_with_the_storage_it_needs():
    """head_budget needs ragged storage: compose (and so patch) adds it on the storage axis, without
    renaming the policy; given explicitly it is named."""
    alone = kvx.compose(kvx.make_policy("head_budget", budget=16, window=4))
    assert alone.name == "head_budget" and alone.storage == "ragged"
    assert alone.axes() == {"selection": "head_budget", "storage": "ragged", "method": "dense"}
    assert alone.describe().endswith("+ragged()")
    assert kvx.compose("head_budget", "ragged").name == "head_budget+ragged"
    assert kvx.compose("snapkv").axes() == {"selection": "snapkv", "storage": "dense", "method": "dense"}
    model = tiny_model("llama")
    with kvx.patched(model, "head_budget", budget=16, window=4) as policy:
        assert kvx.policy_of(model) is policy and policy.name == "head_budget"
        assert model._kvx_state.axes.storage == "ragged"
        _, _, cache = greedy(model, random_ids(1, 40, seed=5), new_tokens=2)
    assert cache.storage == "ragged"


def test_specs_name_compositions():
    from kvx.compose import from_spec

    policy = from_spec("SnapKV:budget=64,window=8+ragged")
    assert policy.name == "snapkv+ragged" and policy.parts[0].budget == 64 and policy.parts[0].window == 8
    assert from_spec("h2o:ratio=0.5").ratio == 0.5
    with pytest.raises(ValueError, match="empty policy spec"):
        from_spec(" ")


def test_two_policies_on_one_axis_are_refused_by_name():
    with pytest.raises(ValueError, match="snapkv and h2o both answer the selection axis"):
        kvx.compose("snapkv", "h2o")
    with pytest.raises(ValueError, match="ragged and ragged both answer the storage axis"):
        kvx.compose("ragged", "ragged")
    with pytest.raises(TypeError, match="set options \\['budget'\\] on them"):
        kvx.compose("snapkv", budget=3)
    with pytest.raises(ValueError, match="needs at least one policy"):
        kvx.compose()


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
@pytest.mark.parametrize("selection", ["snapkv", "h2o", "streaming_llm"])
def test_a_selection_on_ragged_storage_keeps_what_it_keeps_on_dense(model_type, selection):
    """Same kept tokens, so the same greedy tokens and (up to summation order) logits; the cache is
    ragged, with every head holding the same count."""
    options = {"snapkv": {"budget": 24, "window": 4}, "h2o": {"budget": 24, "recent": 4, "decode_interval": 4},
               "streaming_llm": {"sink": 4, "window": 20}}[selection]
    model = tiny_model(model_type)
    ids, mask = left_pad([random_ids(1, n, seed=n)[0] for n in (70, 45)])
    with kvx.patched(model, selection, chunk_size=32, **options):
        dense_seq, dense_logits, dense_cache = greedy(model, ids, mask)
    with kvx.patched(model, kvx.compose(kvx.make_policy(selection, **options), "ragged"), chunk_size=32):
        seq, logits, cache = greedy(model, ids, mask)
    assert torch.equal(seq, dense_seq)
    torch.testing.assert_close(logits, dense_logits, rtol=1e-4, atol=1e-4)
    compressed = [(d, r) for d, r in zip(dense_cache.stats(), cache.stats()) if d["kind"] == "compressed"]
    assert compressed and all(r["kind"] == "ragged" for _, r in compressed)
    assert all((d["kept_min"], d["kept_max"]) == (r["kept_min"], r["kept_max"]) for d, r in compressed)


def test_ragged_alone_keeps_everything_and_equals_dense():
    model = tiny_model("qwen3")
    ids = random_ids(1, 40, seed=3)
    dense_seq, dense_logits, _ = greedy(model, ids)
    with kvx.patched(model, "ragged"):
        seq, logits, cache = greedy(model, ids)
    assert torch.equal(seq, dense_seq)
    torch.testing.assert_close(logits, dense_logits, rtol=1e-4, atol=1e-4)
    assert {s["stored"] for s in cache.stats()} == {47}
