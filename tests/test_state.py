"""State: fresh caches per call, isolated models, policy replacement, context manager, and the
ways a model gets its cache (generate, forward loops, wrappers)."""

import pytest
import torch
from conftest import greedy, random_ids
from transformers import DynamicCache

import kvx
from kvx import cache_kwargs, cache_of
from kvx.tiny import tiny_model


def test_successive_generate_calls_equal_fresh_runs():
    ids_a, ids_b = random_ids(1, 30, seed=3), random_ids(1, 25, seed=4)
    fresh = []
    for ids in (ids_a, ids_b):
        model = tiny_model("llama")
        kvx.patch(model, "snapkv", budget=12, window=4)
        fresh.append(greedy(model, ids))
    model = tiny_model("llama")
    kvx.patch(model, "snapkv", budget=12, window=4)
    for ids, (seq, logits, _) in zip((ids_a, ids_b), fresh):
        got_seq, got_logits, _ = greedy(model, ids)
        assert torch.equal(got_seq, seq)
        assert torch.equal(got_logits, logits)


def test_two_models_with_different_policies_do_not_interfere():
    ids = random_ids(1, 30, seed=5)
    a, b = tiny_model("llama", seed=1), tiny_model("qwen3", seed=2)
    kvx.patch(a, "snapkv", budget=10, window=4)
    kvx.patch(b, "streaming_llm", sink=2, window=6)
    alone_a, alone_b = greedy(a, ids), greedy(b, ids)
    again_a, again_b = greedy(a, ids), greedy(b, ids)  # interleaved
    assert torch.equal(alone_a[1], again_a[1]) and torch.equal(alone_b[1], again_b[1])
    assert {s["stored"] for s in alone_b[2].stats()} == {8}  # streaming keeps sink + window
    assert {s["stored"] for s in alone_a[2].stats()} == {10 + 7}  # snapkv: budget, then decode appends


def test_unpatched_model_is_untouched_by_a_patched_one(llama):
    other = tiny_model("llama")
    ids = random_ids(1, 20, seed=6)
    before = greedy(other, ids)
    with kvx.patched(llama, "snapkv", budget=8, window=2):
        greedy(llama, ids)
        during = greedy(other, ids)
    assert torch.equal(before[1], during[1])
    assert type(during[2]) is DynamicCache


def test_patching_a_patched_model_replaces_its_policy(llama):
    ids = random_ids(1, 30, seed=7)
    kvx.patch(llama, "snapkv", budget=10, window=2)
    kvx.patch(llama, "streaming_llm", sink=2, window=6)
    try:
        assert kvx.policy_of(llama).name == "streaming_llm"
        _, _, cache = greedy(llama, ids)
        assert {s["stored"] for s in cache.stats()} == {8}
    finally:
        kvx.unpatch(llama)


def test_patched_context_restores_the_previous_policy(llama):
    kvx.patch(llama, "snapkv", budget=10, window=2)
    try:
        with kvx.patched(llama, "streaming_llm", sink=1, window=3) as policy:
            assert kvx.policy_of(llama) is policy
        assert kvx.policy_of(llama).name == "snapkv"
    finally:
        kvx.unpatch(llama)
    with kvx.patched(llama, "streaming_llm"):
        pass
    assert not kvx.is_patched(llama)


def test_forward_loop_gets_a_kvx_cache_and_matches_generate(llama):
    ids = random_ids(1, 30, seed=8)
    with kvx.patched(llama, "streaming_llm", sink=2, window=10):
        gen_seq, gen_logits, _ = greedy(llama, ids, new_tokens=5)
        with torch.inference_mode():
            out = llama(ids)  # what a wrapper such as lm-eval's HFLM does
            assert isinstance(cache_of(out), kvx.KVCache)
            tokens, logits = [], []
            for _ in range(5):
                logits.append(out.logits[:, -1])
                tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
                out = llama(tokens[-1], **cache_kwargs(cache_of(out)))
    assert torch.equal(torch.cat(tokens, 1), gen_seq[:, -5:])
    torch.testing.assert_close(torch.stack(logits), gen_logits, rtol=1e-5, atol=1e-5)


def test_forward_without_cache_runs_dense(llama):
    ids = random_ids(1, 20, seed=9)
    with torch.inference_mode():
        dense = llama(ids, use_cache=False).logits
        with kvx.patched(llama, "snapkv", budget=4, window=2):
            out = llama(ids, use_cache=False)
    assert cache_of(out) is None
    torch.testing.assert_close(out.logits, dense, rtol=1e-5, atol=1e-5)


def test_foreign_cache_with_tokens_is_refused(llama):
    ids = random_ids(1, 10, seed=10)
    with torch.inference_mode():
        cache = cache_of(llama(ids))  # a transformers DynamicCache
        with kvx.patched(llama, "snapkv", budget=4, window=2):
            with pytest.raises(ValueError, match="already holds tokens"):
                llama(ids[:, -1:], **cache_kwargs(cache))


def test_other_cache_implementations_are_refused(llama):
    ids = random_ids(1, 10, seed=12)
    with kvx.patched(llama, "snapkv", budget=4, window=2):
        with pytest.raises(ValueError, match="given a StaticCache.*drop cache_implementation"):
            llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, cache_implementation="static")


def test_beam_search_and_multiple_return_sequences(llama):
    ids = random_ids(2, 30, seed=13)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=0)
    dense = llama.generate(ids, num_beams=3, **kwargs)
    with kvx.patched(llama, "snapkv"):  # full budget: beams reorder the kvx cache like a dense one
        assert torch.equal(llama.generate(ids, num_beams=3, **kwargs), dense)
    with kvx.patched(llama, "snapkv", budget=8, window=2):
        out = llama.generate(ids, num_beams=3, num_return_sequences=3, return_dict_in_generate=True, **kwargs)
    assert out.sequences.shape == (6, 35)
    assert {s["stored"] for s in cache_of(out).stats()} == {8 + 4}


def test_user_built_cache_is_used(llama):
    ids = random_ids(1, 20, seed=11)
    cache = kvx.KVCache(llama.config)
    with kvx.patched(llama, "snapkv", budget=6, window=2), torch.inference_mode():
        out = llama(ids, **cache_kwargs(cache))
    assert cache_of(out) is cache
    assert {s["stored"] for s in cache.stats()} == {6}


def test_a_reused_dynamic_cache_becomes_the_kvx_cache(llama):
    """The usual pattern: make a DynamicCache, pass it to every call. It must keep its context."""
    ids = random_ids(1, 30, seed=14)
    with torch.inference_mode():
        dense = llama(ids).logits[:, -10:]
        with kvx.patched(llama, "snapkv"):  # full budget
            cache = DynamicCache(config=llama.config)
            llama(ids[:, :20], **cache_kwargs(cache))
            out = llama(ids[:, 20:], **cache_kwargs(cache))
    assert isinstance(cache, kvx.KVCache) and cache_of(out) is cache
    assert cache.get_seq_length() == 30
    torch.testing.assert_close(out.logits, dense, rtol=1e-5, atol=1e-5)


def test_deepcopy_of_a_patched_model_compresses_on_its_own(llama):
    import copy

    ids = random_ids(1, 30, seed=15)
    kvx.patch(llama, "streaming_llm", sink=2, window=6)
    try:
        clone = copy.deepcopy(llama)
        with torch.inference_mode():
            clone_cache = cache_of(clone(ids))
            own_cache = cache_of(llama(ids))
    finally:
        kvx.unpatch(llama)
    assert {s["stored"] for s in clone_cache.stats()} == {8}
    assert {s["stored"] for s in own_cache.stats()} == {8}
    kvx.unpatch(clone)


def test_snapkv_compresses_a_prompt_fed_in_chunks(llama):
    ids = random_ids(1, 64, seed=16)
    with kvx.patched(llama, "snapkv", budget=12, window=4), torch.inference_mode():
        cache = kvx.KVCache(llama.config)
        for chunk in ids.split(16, dim=1):
            llama(chunk, **cache_kwargs(cache))
            assert {s["stored"] for s in cache.stats()} == {min(12, cache.get_seq_length())}
    assert cache.get_seq_length() == 64
