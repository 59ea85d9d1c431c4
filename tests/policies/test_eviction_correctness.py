"""Eviction is right, not only harmless: the kept tokens are the ones the paper's rule picks,
computed independently from the unpatched model, and decoding over them matches a dense model
given exactly those tokens at their original positions."""

import pytest
import torch
import torch.nn.functional as F
from conftest import random_ids
from transformers import DynamicCache

import kvx
from kvx import cache_kwargs, cache_of
from kvx.tiny import tiny_model

PROMPT = 40


def _dense_prefill(model, ids):
    with torch.inference_mode():
        out = model(ids, output_attentions=True)
    return out


def _decode_over(model, kept_kv: list[tuple[torch.Tensor, torch.Tensor]], token: torch.Tensor, position: int):
    """Next-token logits of the unpatched model whose cache holds exactly ``kept_kv``."""
    cache = DynamicCache(config=model.config)
    for layer_idx, (k, v) in enumerate(kept_kv):
        cache.update(k, v, layer_idx)
    with torch.inference_mode():
        return model(token, **cache_kwargs(cache), position_ids=torch.tensor([[position]])).logits[:, -1]


def _patched_two_steps(model, ids, policy):
    with kvx.patched(model, policy), torch.inference_mode():
        out = model(ids)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        kept = [(layer.keys.clone(), layer.values.clone()) for layer in cache_of(out).layers]
        logits = model(token, **cache_kwargs(cache_of(out))).logits[:, -1]
    return token, kept, logits


def test_streaming_llm_keeps_sinks_and_window_at_original_positions():
    model = tiny_model("llama")
    ids = random_ids(1, PROMPT, seed=20)
    policy = kvx.policies.StreamingLLM(sink=3, window=9)
    token, kept, logits = _patched_two_steps(model, ids, policy)
    dense = cache_of(_dense_prefill(model, ids))
    positions = list(range(3)) + list(range(PROMPT - 9, PROMPT))
    for (k, v), layer in zip(kept, dense.layers):
        torch.testing.assert_close(k, layer.keys[:, :, positions], rtol=0, atol=0)
        torch.testing.assert_close(v, layer.values[:, :, positions], rtol=0, atol=0)
    expected = _decode_over(model, [(lay.keys[:, :, positions], lay.values[:, :, positions]) for lay in dense.layers], token, PROMPT)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def _snapkv_indices_from_eager(attn: torch.Tensor, kv_heads: int, budget: int, window: int, kernel: int, reduce: str):
    """The SnapKV rule on full eager attention probabilities ``[B, H, T, T]``."""
    batch, heads, length, _ = attn.shape
    votes = attn[:, :, -window:, :].sum(dim=-2)  # [B, H, T]
    votes = F.avg_pool1d(votes.reshape(-1, 1, length), kernel, stride=1, padding=kernel // 2).reshape(batch, heads, length)
    grouped = votes.reshape(batch, kv_heads, heads // kv_heads, length)
    scores = grouped.mean(2) if reduce == "mean" else grouped.amax(2)
    scores[..., -window:] = float("inf")
    return scores.topk(budget, dim=-1).indices.sort(-1).values  # [B, Hkv, budget]


def test_snapkv_keeps_what_the_eager_attention_rule_picks():
    model = tiny_model("llama", attn_implementation="eager")
    ids = random_ids(1, PROMPT, seed=21)
    policy = kvx.policies.SnapKV(budget=14, window=5, kernel_size=5, gqa_reduce="max")
    token, kept, logits = _patched_two_steps(model, ids, policy)
    dense = _dense_prefill(model, ids)
    expected_kv = []
    for layer_idx, ((k, v), layer) in enumerate(zip(kept, cache_of(dense).layers)):
        idx = _snapkv_indices_from_eager(dense.attentions[layer_idx], model.config.num_key_value_heads, 14, 5, 5, "max")
        gather = idx[..., None].expand(-1, -1, -1, k.shape[-1])
        want_k, want_v = layer.keys.gather(2, gather), layer.values.gather(2, gather)
        # same tokens; values agree to float precision (eager vs SDPA numerics in earlier layers)
        torch.testing.assert_close(k, want_k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, want_v, rtol=1e-5, atol=1e-5)
        expected_kv.append((want_k, want_v))
    # heads really choose differently (per-head top-k, not one shared set)
    assert any(not torch.equal(k[:, 0], k[:, 1]) for k, _ in kept)
    torch.testing.assert_close(logits, _decode_over(model, expected_kv, token, PROMPT), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 3, 17), (3, 2, 64)])
def test_mask_to_indices_right_aligns_each_row_and_heads_kept_tokens(shape):
    """Every (row, head) lists its kept tokens in ascending order, right-aligned; the slots to their
    left are invalid; all-dropped and all-kept rows included."""
    from kvx.policy import mask_to_indices

    keep = torch.rand(shape, generator=torch.Generator().manual_seed(sum(shape))) < 0.4
    keep[0, 0] = True
    if shape[0] > 1:
        keep[1, 0] = False
    indices, slot_valid = mask_to_indices(keep)
    width = int(keep.sum(-1).max())
    assert indices.shape == slot_valid.shape == (*shape[:2], width)
    for b in range(shape[0]):
        for h in range(shape[1]):
            kept = keep[b, h].nonzero().flatten()
            assert slot_valid[b, h].tolist() == [False] * (width - len(kept)) + [True] * len(kept)
            assert indices[b, h, width - len(kept):].tolist() == kept.tolist()


def test_streaming_llm_decode_interval_evicts_once_every_n_tokens():
    """decode_interval=N: the layer grows to sink + window + N - 1 while generating, then returns to
    sink + window (the tokens the paper's rule keeps), instead of re-gathering at every token."""
    model = tiny_model("llama")
    ids = random_ids(1, PROMPT, seed=22)
    sink, window, interval = 2, 10, 4
    with kvx.patched(model, "streaming_llm", sink=sink, window=window, decode_interval=interval):
        with torch.inference_mode():
            out = model(ids)
            cache, stored = cache_of(out), []
            for _ in range(9):
                out = model(out.logits[:, -1:].argmax(-1), **cache_kwargs(cache))
                cache = cache_of(out)
                stored.append(cache.stats()[0]["stored"])
    capacity = sink + window
    assert stored == [capacity + 1, capacity + 2, capacity + 3, capacity, capacity + 1, capacity + 2, capacity + 3,
                      capacity, capacity + 1]
    assert max(stored) == capacity + interval - 1
