"""Behaviour of H2O, TOVA, Keyformer, KNorm, PyramidKV and the shared budget mechanics."""


import pytest
import torch
from conftest import greedy, random_ids

import kvx
from kvx import cache_kwargs, cache_of
from kvx.policy import CompressionView
from kvx.tiny import tiny_model


def _view(length=20, query_len=4, heads=4, kv_heads=2, phase="prefill", seen=None, layer_idx=0, num_layers=2):
    g = torch.Generator().manual_seed(length * 10 + query_len)
    return CompressionView(
        query=torch.randn(1, heads, query_len, 8, generator=g),
        keys=torch.randn(1, kv_heads, length, 8, generator=g),
        values=torch.randn(1, kv_heads, length, 8, generator=g),
        valid=torch.ones(1, kv_heads, length, dtype=torch.bool),
        attention_mask=None,
        phase=phase,
        layer_idx=layer_idx,
        scaling=8**-0.5,
        num_seen=length if seen is None else seen,
        num_layers=num_layers,
    )


def test_knorm_keeps_the_lowest_norm_keys():
    view = _view()
    keep = kvx.policies.KNorm(budget=5).select(view)
    norms = view.keys.norm(dim=-1)
    for head in range(2):
        assert keep[0, head].tolist() == sorted(norms[0, head].argsort()[:5].tolist())


def test_tova_keeps_what_the_last_query_attends_to_and_the_newest_token():
    view = _view()
    keep = kvx.policies.TOVA(budget=6).select(view)
    assert (keep[..., -1] == 19).all()
    assert torch.equal(keep[0, 0], keep[0, 1])  # layer-wise: the same tokens for every KV head
    per_head = kvx.policies.TOVA(budget=6, per_head=True).select(view)
    assert per_head.shape == (1, 2, 6)


def test_h2o_accumulates_across_forwards_and_keeps_the_recent_window():
    policy = kvx.policies.H2O(budget=8, recent=3)
    view = _view()
    assert policy.select(view).shape[-1] == 8
    first = view.state["h2o"].clone()
    assert first.shape == (1, 2, 20) and first.sum().item() == pytest.approx(4 * 4, rel=1e-5)  # 4 queries x 4 heads
    policy.observe(view)  # a second forward adds to the same statistic
    torch.testing.assert_close(view.state["h2o"], 2 * first)
    assert torch.isinf(policy.score(view)[..., -3:]).all()


def test_keyformer_is_reproducible_and_noise_changes_choices():
    a, b = _view(), _view()
    kvx.policies.Keyformer(budget=8, recent=2, window=4).select(a)
    kvx.policies.Keyformer(budget=8, recent=2, window=4).select(b)
    torch.testing.assert_close(a.state["keyformer"], b.state["keyformer"])
    c = _view()
    kvx.policies.Keyformer(budget=8, recent=2, window=4, seed=5).select(c)
    assert not torch.allclose(a.state["keyformer"], c.state["keyformer"])


def test_ratio_keeps_a_fraction_of_the_tokens_seen():
    policy = kvx.policies.SnapKV(ratio=0.75, window=2)
    assert policy.select(_view(length=40)).shape[-1] == 10
    assert policy.capacity(_view(length=10, seen=400)) == 100


def test_budget_above_the_length_is_a_no_op():
    assert kvx.policies.H2O(budget=64).select(_view()) is None


def test_pyramid_budgets_fall_with_depth_and_average_the_budget():
    policy = kvx.policies.PyramidKV(budget=100, window=8, beta=10)
    budgets = policy.layer_budgets(8, 100)
    assert budgets == sorted(budgets, reverse=True) and budgets[0] == 190 and budgets[-1] == 10
    assert sum(budgets) == pytest.approx(800, abs=8)
    view = _view(length=300, layer_idx=7, num_layers=8)
    assert policy.select(view).shape[-1] == 10
    assert kvx.policies.PyramidKV(budget=50, schedule=[40, 30], window=16).capacity(_view(layer_idx=1)) == 30
    assert kvx.policies.PyramidKV(budget=50, schedule="uniform", window=4).capacity(_view(layer_idx=1)) == 50


def test_pyramid_over_another_scorer():
    view = _view(length=60, layer_idx=1)
    keep = kvx.policies.PyramidKV(budget=20, window=4, beta=2, scorer="knorm").select(view)
    assert keep.shape[-1] == 10


def test_decode_compression_bounds_the_cache_over_2000_tokens():
    model = tiny_model("llama", num_hidden_layers=1)
    interval = 8
    ids = random_ids(1, 600, seed=40)
    most = 0
    with kvx.patched(model, "h2o", budget=512, recent=16, decode_interval=interval), torch.inference_mode():
        out = model(ids)
        for _ in range(2000):  # greedy decoding, the cache checked after every token
            out = model(out.logits[:, -1:].argmax(-1), **cache_kwargs(cache_of(out)))
            most = max(most, cache_of(out).stats()[0]["stored"])
    assert cache_of(out).get_seq_length() == 2600
    assert 512 < most < 512 + interval


def test_decode_compression_every_step_for_tova():
    model = tiny_model("qwen3")
    with kvx.patched(model, "tova", budget=20):
        _, _, cache = greedy(model, random_ids(1, 50, seed=41), new_tokens=12)
    assert {s["stored"] for s in cache.stats()} == {20}


@pytest.mark.parametrize(
    "policy,options,error,match",
    [
        ("h2o", {"ratio": 1.0}, ValueError, r"ratio must be a number in \[0, 1\)"),
        ("snapkv", {"ratio": -0.1}, ValueError, "ratio must be"),
        ("h2o", {"budget": 8, "recent": 9}, ValueError, r"recent \(9\) must not exceed budget \(8\)"),
        ("keyformer", {"tau": 0}, ValueError, r"tau must be a number in \(0, inf\)"),
        ("pyramidkv", {"schedule": "steep"}, ValueError, "schedule must be one of pyramid, uniform or a list"),
        ("pyramidkv", {"scorer": "streaming_llm"}, TypeError, "does not rank tokens by importance"),
        ("pyramidkv", {"beta": 0.5}, ValueError, r"beta must be a number in \[1, inf\)"),
        ("tova", {"per_head": "yes"}, TypeError, "per_head must be true or false"),
        ("knorm", {"decode_interval": -1}, ValueError, "decode_interval must be >= 0"),
    ],
)
def test_bad_options(policy, options, error, match):
    with pytest.raises(error, match=match):
        kvx.make_policy(policy, **options)


def test_schedule_of_the_wrong_length_is_refused_at_patch():
    model = tiny_model("llama")  # 2 layers
    with pytest.raises(ValueError, match="schedule lists 3 budgets but the model has 2 layers"):
        kvx.patch(model, "pyramidkv", schedule=[64, 32, 32])
    assert not kvx.is_patched(model)
