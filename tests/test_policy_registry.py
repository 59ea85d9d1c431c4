"""The registry, list_policies and the scoring rules on hand-made views."""

import math

import torch

import kvx
from kvx.policy import CompressionView


def _view(valid: torch.Tensor, phase="prefill", query_len=4, dim=8, heads=2) -> CompressionView:
    batch, kv_heads, length = valid.shape
    g = torch.Generator().manual_seed(0)
    return CompressionView(
        query=torch.randn(batch, heads, query_len, dim, generator=g),
        keys=torch.randn(batch, kv_heads, length, dim, generator=g),
        values=torch.randn(batch, kv_heads, length, dim, generator=g),
        valid=valid,
        attention_mask=None,
        phase=phase,
        layer_idx=0,
        scaling=dim**-0.5,
    )


def test_list_policies_names_descriptions_and_defaults():
    listed = {p["name"]: p for p in kvx.list_policies()}
    assert {"snapkv", "streaming_llm"} <= set(listed)
    snap = {o["name"]: o for o in listed["snapkv"]["options"]}
    assert snap["budget"]["default"] == 1024 and snap["window"]["default"] == 32
    assert all(o["help"] for p in listed.values() for o in p["options"])
    assert "Li et al." in listed["snapkv"]["description"]


def test_make_policy_accepts_dashes_and_case():
    assert isinstance(kvx.make_policy("Streaming-LLM", sink=1, window=2), kvx.policies.StreamingLLM)


def test_streaming_scores_count_real_tokens_only():
    valid = torch.ones(2, 1, 10, dtype=torch.bool)
    valid[1, :, :4] = False  # left padding in row 1
    keep = kvx.policies.StreamingLLM(sink=2, window=3).select(_view(valid))
    assert keep[0, 0].tolist() == [0, 1, 7, 8, 9]
    assert keep[1, 0].tolist() == [4, 5, 7, 8, 9]


def test_streaming_compresses_at_decode_but_snapkv_does_not():
    valid = torch.ones(1, 1, 12, dtype=torch.bool)
    assert kvx.policies.StreamingLLM(sink=1, window=4).select(_view(valid, "decode", 1)).shape[-1] == 5
    assert kvx.policies.SnapKV(budget=5, window=2).select(_view(valid, "decode", 1)) is None


def test_nothing_happens_when_everything_fits():
    valid = torch.ones(1, 1, 12, dtype=torch.bool)
    assert kvx.policies.SnapKV(budget=12, window=2).select(_view(valid)) is None
    assert kvx.policies.StreamingLLM(sink=2, window=10).select(_view(valid)) is None


def test_snapkv_always_keeps_the_window_and_never_padding():
    valid = torch.ones(2, 2, 16, dtype=torch.bool)
    valid[1, :, :10] = False  # row 1 owns 6 tokens: fewer than the budget, it keeps them all
    policy = kvx.policies.SnapKV(budget=8, window=3, kernel_size=3)
    view = _view(valid, query_len=3, heads=4)
    scores = policy.score(view)
    assert torch.isinf(scores[..., -3:]).all()
    keep = policy.select_mask(view)
    assert keep[0].sum(-1).tolist() == [8, 8] and keep[0, :, -3:].all()
    assert torch.equal(keep[1], valid[1])  # all of row 1's tokens, no padding


def test_snapkv_gqa_reduction_changes_scores():
    valid = torch.ones(1, 1, 20, dtype=torch.bool)
    view = _view(valid, query_len=4, heads=4)
    mean = kvx.policies.SnapKV(budget=8, window=4, gqa_reduce="mean").score(view)
    top = kvx.policies.SnapKV(budget=8, window=4, gqa_reduce="max").score(view)
    finite = ~torch.isinf(mean)
    assert (top[finite] >= mean[finite] - 1e-6).all() and not torch.allclose(top[finite], mean[finite])
    assert not math.isnan(mean[finite].sum().item())
