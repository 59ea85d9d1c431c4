"""moa: a window per KV head from a head profile under a total budget, in ragged storage."""

import pytest
import torch
from conftest import greedy, random_ids
from test_retrieval_heads import write_pattern

import kvx
from kvx.policies.moa import allocate_windows
from kvx.tiny import tiny_model


def test_windows_share_the_budget_by_score():
    scores = torch.tensor([[1.0, 0.0], [float("nan"), float("nan")], [0.0, 3.0]])
    windows = allocate_windows(scores, budget=200, sink=8, min_window=16)
    # 4 scored heads: 4 x (200 - 8 - 16) = 704 tokens shared 1 : 3 on top of 16 each
    assert windows.tolist() == [[16 + 176, 16], [0, 0], [16, 16 + 528]]
    assert allocate_windows(torch.zeros(2, 2), 100, 10, 20).tolist() == [[90, 90], [90, 90]]  # no signal: equal


def test_each_head_keeps_its_window_and_bytes_are_the_kept_tokens(tmp_path):
    model = tiny_model("llama", num_hidden_layers=3)
    pattern = write_pattern(model, tmp_path / "heads.safetensors", torch.tensor([[1.0, 0], [0, 0], [0, 3]]))
    policy = kvx.make_policy("moa", pattern=pattern, budget=60, sink=4, min_window=8, decode_interval=4)
    with kvx.patched(model, policy):
        _, _, cache = greedy(model, random_ids(1, 150, seed=8), new_tokens=9)
    windows = policy.windows()  # 6 x (60 - 12) = 288 shared 1 : 3
    assert windows.tolist() == [[80, 8], [8, 8], [8, 224]]
    for layer, stats in enumerate(cache.stats()):
        kept = cache.layers[layer].kept_per_head()[0].tolist()
        # 150 prompt + 8 decoded tokens cached (the last is not); enforced every 4th decoded, so at 158: sink + window
        assert kept == [min(158, 4 + int(w)) for w in windows[layer]]
        assert stats["kv_bytes"] == 2 * 16 * 4 * sum(kept)
    assert sum(int(layer.kept_per_head().sum()) for layer in cache.layers) <= 6 * (60 + 4)


def test_moa_needs_a_pattern_and_a_budget_that_holds_the_minimum():
    with pytest.raises(ValueError, match="pattern is required"):
        kvx.make_policy("moa")
    with pytest.raises(ValueError, match=r"sink \+ min_window \(64 \+ 64\) must not exceed budget \(100\)"):
        kvx.make_policy("moa", pattern="x.safetensors", budget=100)
