"""Chunked prefill with compression between chunks, and query-aware (context-only) compression."""

import pytest
import torch
from conftest import greedy, left_pad, random_ids

import kvx
from kvx import cache_kwargs, cache_of
from kvx.compat import CHUNKED_PREFILL_RESUMES_CACHE
from kvx.tiny import tiny_model


def test_generate_compresses_between_chunks():
    model = tiny_model("llama")
    ids = random_ids(1, 100, seed=60)
    stored_after_each_forward = []
    with kvx.patched(model, "snapkv", budget=16, window=4, chunk_size=32):
        assert model.generation_config.prefill_chunk_size == 32
        hook = model.model.register_forward_hook(
            lambda m, a, out: stored_after_each_forward.append(cache_of(out).stats()[0]["stored"]))
        _, _, cache = greedy(model, ids, new_tokens=2)
        hook.remove()
    assert stored_after_each_forward[:4] == [16, 16, 16, 16]  # 4 chunks: 32, 32, 32, 4 tokens
    assert cache.get_seq_length() == 101
    assert model.generation_config.prefill_chunk_size is None  # unpatch restored it


def test_chunked_full_budget_equals_dense_with_padding():
    model = tiny_model("qwen2")
    ids, mask = left_pad([random_ids(1, n, seed=n)[0] for n in (70, 41)])
    dense_seq, dense_logits, _ = greedy(model, ids, mask)
    with kvx.patched(model, "h2o", budget=1024, chunk_size=16):
        seq, logits, _ = greedy(model, ids, mask)
    assert torch.equal(seq, dense_seq)
    torch.testing.assert_close(logits, dense_logits, rtol=1e-4, atol=1e-4)


def test_prefill_helper_matches_generate_chunks():
    model = tiny_model("llama")
    ids, mask = left_pad([random_ids(1, n, seed=n)[0] for n in (90, 57)])
    with kvx.patched(model, "snapkv", budget=20, window=4, chunk_size=25):
        out = kvx.prefill(model, ids, mask, chunk_size=25)
        _, logits, _ = greedy(model, ids, mask, new_tokens=1)
    torch.testing.assert_close(out.logits[:, -1], logits[0], rtol=1e-5, atol=1e-5)
    assert {s["kept_min"] for s in cache_of(out).stats()} == {20}


@pytest.mark.parametrize("chunk_size", [None, 4096])
def test_compress_context_then_append_the_question_uncompressed(chunk_size):
    model = tiny_model("llama")
    context, question = random_ids(1, 80, seed=61), random_ids(1, 12, seed=62)
    with kvx.patched(model, "snapkv", budget=16, window=4, chunk_size=chunk_size):
        if chunk_size is not None and not CHUNKED_PREFILL_RESUMES_CACHE:  # this release prefills the cache again
            cache = kvx.compress_context(model, context)
            full = torch.cat([context, question], 1)
            with pytest.raises(ValueError, match="prefills a given cache from its first token again"):
                model.generate(full, attention_mask=torch.ones_like(full), **cache_kwargs(cache), max_new_tokens=3)
            return
        cache = kvx.compress_context(model, context)
        assert {s["stored"] for s in cache.stats()} == {16}
        full = torch.cat([context, question], 1)
        with torch.inference_mode():
            out = model.generate(full, attention_mask=torch.ones_like(full), **cache_kwargs(cache),
                                 max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape[1] == 92 + 3
    assert {s["stored"] for s in cache.stats()} == {16 + 12 + 2}  # question and answer appended as they are


def test_bad_chunk_size_and_unpatched_prefill():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="chunk_size must be a positive int, None or .auto."):
        kvx.patch(model, "snapkv", chunk_size=0)
    with pytest.raises(ValueError, match="not patched by kvx"):
        kvx.prefill(model, random_ids(1, 8))


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_chunked_head_budget_floor_one_equals_snapkv_with_padding(model_type):
    """Chunks after the first attend over a ragged prefix plus the new tokens (the dense view,
    query block by query block): with floor=1 the head budgets keep SnapKV's tokens, so a padded,
    chunked head_budget prefill must give SnapKV's outputs (Gemma 2: soft-capping and sliding layers)."""
    model = tiny_model(model_type)
    ids, mask = left_pad([random_ids(1, n, seed=n)[0] for n in (75, 44)])
    with kvx.patched(model, "snapkv", budget=12, window=4, chunk_size=16):
        want_seq, want_logits, _ = greedy(model, ids, mask, new_tokens=4)
    with kvx.patched(model, "head_budget", budget=12, window=4, floor=1.0, chunk_size=16):
        seq, logits, cache = greedy(model, ids, mask, new_tokens=4)
    assert any(s["kind"] == "ragged" for s in cache.stats())
    assert torch.equal(seq, want_seq)
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)


def test_padded_chunks_mask_only_their_own_tokens(monkeypatch):
    """A left-padded batch prefilling in chunks: after the first chunk, attention gets a mask over the
    chunk's own tokens (``[B, 1, q, q]``), never one over the stored tokens (``q x S``): the stored
    padding is the layer's ``valid``. Outputs equal each row prefilled alone."""
    from kvx.kernels import reference

    masks = []
    for name in ("attention", "prefix_then_new_attention"):
        original = getattr(reference, name)

        def recording(query, key, value, *args, _original=original, _name=name, **kwargs):
            masks.append((_name, query.shape[-2], key.shape[-2], args))
            return _original(query, key, value, *args, **kwargs)

        monkeypatch.setattr(reference, name, recording)
    model = tiny_model("llama", dtype=torch.float64)
    rows = [random_ids(1, n, seed=n)[0] for n in (64, 40)]  # the short row's padding: 3 whole chunks (chunked alike alone)
    ids, mask = left_pad(rows)
    with kvx.patched(model, "snapkv", budget=12, window=4, chunk_size=8):
        batch_seq, batch_logits, _ = greedy(model, ids, mask, new_tokens=4)
        chunks = [(name, q, s, args) for name, q, s, args in masks if 1 < q < s]
        assert chunks and all(name == "prefix_then_new_attention" for name, *_ in chunks)
        for _, q_len, _, (_, new_mask, *_) in chunks:
            assert new_mask is None or new_mask.shape[-2:] == (q_len, q_len)
        # the stored padding reaches attention as the prefix's `valid` ([B, Hkv, P]), not as a mask
        assert any(p is not None and not bool(p.all()) for *_, (p, *_) in chunks)
        for i, row in enumerate(rows):
            seq, logits, _ = greedy(model, row[None], new_tokens=4)
            assert torch.equal(batch_seq[i, -4:], seq[0, -4:])
            torch.testing.assert_close(batch_logits[:, i], logits[:, 0], rtol=1e-6, atol=1e-6)
