"""retrieval_heads: retrieval heads keep everything, streaming heads sinks + recent tokens in ragged
storage (bytes = kept tokens), constant in the context length; patterns tied to their model."""

import pytest
import torch
from conftest import MODEL_TYPES, greedy, random_ids

import kvx
from kvx.cache import cache_nbytes
from kvx.policies._head_scores import HeadScores, load_scores, model_identity
from kvx.policies.retrieval_heads import COMPENSATION_STATE, choose_heads
from kvx.tiny import tiny_model


def write_pattern(model, path, scores: torch.Tensor) -> str:
    """A scores file for ``model`` with the given ``[L, Hkv]`` scores."""
    heads = model.config.num_attention_heads
    query_scores = scores.repeat_interleave(heads // scores.shape[1], dim=1)
    HeadScores(scores.float(), query_scores.float(), model_identity(model)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def llama3():
    return tiny_model("llama", num_hidden_layers=3)



@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_ratio_one_with_a_pattern_equals_dense(model_type, tmp_path):
    model = tiny_model(model_type)
    layers, kv_heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    pattern = write_pattern(model, tmp_path / "heads.safetensors", torch.rand(layers, kv_heads))
    ids = random_ids(1, 40, seed=3)
    dense_seq, dense_logits, _ = greedy(model, ids)
    with kvx.patched(model, "retrieval_heads", pattern=pattern, ratio=1.0, sink=0, recent=1):
        seq, logits, cache = greedy(model, ids)
    assert torch.equal(seq, dense_seq)
    torch.testing.assert_close(logits, dense_logits, rtol=1e-4, atol=1e-4)
    assert all(s["kept_min"] == s["kept_max"] == s["seen"] for s in cache.stats() if s["kind"] == "ragged")


def test_streaming_heads_keep_sinks_and_recent_and_bytes_are_the_kept_tokens(llama3, tmp_path):
    scores = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.0, 0.7]])  # ratio 0.5 -> (0,0), (1,1), (2,1) retrieve
    pattern = write_pattern(llama3, tmp_path / "heads.safetensors", scores)
    ids = random_ids(1, 200, seed=4)
    with torch.inference_mode():
        dense_cache = kvx.cache_of(llama3(ids, use_cache=True))
        policy = kvx.make_policy("retrieval_heads", pattern=pattern, sink=8, recent=24)
        with kvx.patched(llama3, policy):
            cache = kvx.cache_of(llama3(ids, use_cache=True))
    assert policy.retrieval_heads().tolist() == [[True, False], [False, True], [False, True]]
    for idx, layer in enumerate(cache.layers):
        keys, _, valid = layer.dense_view()
        for head in range(2):
            kept = keys[0, head][valid[0, head]]
            dense_keys = dense_cache.layers[idx].keys[0, head]
            expected = dense_keys if scores[idx, head] > 0.5 else torch.cat([dense_keys[:8], dense_keys[-24:]])
            torch.testing.assert_close(kept, expected)
    stats = cache.stats()
    assert [s["kept_per_head"] for s in stats] == [[[200, 32]], [[32, 200]], [[32, 200]]]
    assert [s["kv_bytes"] for s in stats] == [2 * 16 * 4 * 232] * 3  # keys + values, fp32, head dim 16
    assert cache.nbytes() < 0.6 * cache_nbytes(dense_cache)


@pytest.mark.parametrize("compensation", [False, True])
def test_streaming_heads_hold_the_same_at_any_context_length_while_decoding(llama3, tmp_path, compensation):
    pattern = write_pattern(llama3, tmp_path / "heads.safetensors", torch.tensor([[1.0, 0], [1, 0], [1, 0]]))
    policy = kvx.make_policy("retrieval_heads", pattern=pattern, sink=4, recent=16, decode_interval=4,
                             compensation=compensation)
    streaming = []
    for length in (60, 180):
        with kvx.patched(llama3, policy):
            _, _, cache = greedy(llama3, random_ids(1, length, seed=length), new_tokens=23)
        kept = [s["kept_per_head"][0] for s in cache.stats()]
        assert all(row[0] == length + 22 for row in kept)  # retrieval heads: everything (the last token is not cached)
        streaming.append([row[1] for row in kept])
    # evicted at every 4th token: at most sink + recent + 3 (+1 compensation slot), the same at both lengths
    assert streaming[0] == streaming[1]
    assert all(20 + compensation <= n <= 23 + compensation for n in streaming[0])


def test_compensation_token_is_the_mean_of_the_dropped_tokens(llama3, tmp_path):
    pattern = write_pattern(llama3, tmp_path / "heads.safetensors", torch.tensor([[1.0, 0], [1, 0], [1, 0]]))
    ids = random_ids(1, 50, seed=5)
    with torch.inference_mode():
        dense_cache = kvx.cache_of(llama3(ids, use_cache=True))
        with kvx.patched(llama3, "retrieval_heads", pattern=pattern, sink=4, recent=10, compensation=True):
            cache = kvx.cache_of(llama3(ids, use_cache=True))
    layer, dense = cache.layers[1], dense_cache.layers[1]
    keys, values, valid = layer.dense_view()
    counts = layer.dense_state()[COMPENSATION_STATE]
    streaming_keys = keys[0, 1][valid[0, 1]]
    assert streaming_keys.shape[0] == 4 + 1 + 10 and counts[0, 1][valid[0, 1]].tolist()[4] == 36
    torch.testing.assert_close(streaming_keys[4], dense.keys[0, 1, 4:40].mean(0))
    torch.testing.assert_close(values[0, 1][valid[0, 1]][4], dense.values[0, 1, 4:40].mean(0))
    torch.testing.assert_close(streaming_keys[5:], dense.keys[0, 1, 40:])


def test_on_the_fly_profile_picks_per_layer_and_keeps_short_prompts_whole(llama3):
    policy = kvx.make_policy("retrieval_heads", sink=4, recent=16)
    with kvx.patched(llama3, policy):
        _, _, short = greedy(llama3, random_ids(1, 18, seed=6), new_tokens=2)  # sink + recent >= prompt
        assert policy.on_the_fly_scores() == {}
        assert all(s["kept_min"] == s["kept_max"] for s in short.stats())
        _, _, cache = greedy(llama3, random_ids(1, 120, seed=7), new_tokens=2)
    scores = policy.on_the_fly_scores()
    assert sorted(scores) == [0, 1, 2] and all(((s >= 0) & (s <= 1)).all() for s in scores.values())
    for stats, layer_scores in zip(cache.stats(), scores.values()):
        kept = stats["kept_per_head"][0]
        retrieval = int(layer_scores.argmax())
        assert kept[retrieval] == 121 and kept[1 - retrieval] == 20 + 1  # one decoded token since


def test_choose_heads_ratio_threshold_and_unscored_layers():
    scores = torch.tensor([[0.1, 0.9], [float("nan"), float("nan")], [0.5, 0.3]])
    assert choose_heads(scores, 0.5, None).tolist() == [[False, True], [False, False], [True, False]]
    assert choose_heads(scores, 1.0, None).tolist() == [[True, True], [False, False], [True, True]]
    assert choose_heads(scores, 0.5, 0.3).tolist() == [[False, True], [False, False], [True, True]]


def test_pattern_errors_name_the_problem(llama3, tmp_path):
    other = tiny_model("llama", num_hidden_layers=2)
    pattern = write_pattern(other, tmp_path / "other.safetensors", torch.rand(2, 2))
    with pytest.raises(ValueError, match="profiled on another model.*num_hidden_layers: pattern 2, model 3"):
        kvx.patch(llama3, "retrieval_heads", pattern=pattern)
    assert not kvx.is_patched(llama3)
    with pytest.raises(ValueError, match="no such file"):
        kvx.make_policy("retrieval_heads", pattern=str(tmp_path / "missing.safetensors"))
    from safetensors.torch import save_file

    save_file({"scores": torch.rand(3, 2), "query_scores": torch.rand(3, 4)}, str(tmp_path / "v9.safetensors"),
              metadata={"schema_version": "9", "method": "retrieval", "model": "{}"})
    with pytest.raises(ValueError, match="schema version '9' is not one this kvx reads"):
        load_scores(tmp_path / "v9.safetensors")
    (tmp_path / "junk.safetensors").write_text("not a tensor file")
    with pytest.raises(ValueError, match="not a safetensors file"):
        kvx.make_policy("retrieval_heads", pattern=str(tmp_path / "junk.safetensors"))


@pytest.mark.parametrize("ratio", [0, -0.5, 1.5])
def test_ratio_outside_zero_one_is_refused(ratio):
    with pytest.raises(ValueError, match=r"ratio must be a number in \(0, 1\]"):
        kvx.make_policy("retrieval_heads", ratio=ratio)


def test_composes_with_ragged_storage():
    assert kvx.compose(kvx.make_policy("retrieval_heads"), kvx.make_policy("ragged")).name == "retrieval_heads+ragged"
    assert kvx.compose(kvx.make_policy("retrieval_heads")).storage == "ragged"  # implied when none is given


def test_a_row_keeps_the_same_alone_and_in_a_left_padded_batch(llama3, tmp_path):
    from conftest import left_pad

    pattern = write_pattern(llama3, tmp_path / "heads.safetensors", torch.tensor([[1.0, 0], [0, 1], [1, 0]]))
    rows = [random_ids(1, n, seed=n)[0] for n in (90, 61)]
    ids, mask = left_pad(rows)
    policy = kvx.make_policy("retrieval_heads", pattern=pattern, sink=4, recent=20, decode_interval=3)
    with kvx.patched(llama3, policy):
        batch_seq, _, batch_cache = greedy(llama3, ids, mask, new_tokens=7)
        for row, one in enumerate(rows):
            seq, _, cache = greedy(llama3, one[None], new_tokens=7)
            assert torch.equal(seq[0, -7:], batch_seq[row, -7:])
            for alone, batched in zip(cache.layers, batch_cache.layers):
                assert torch.equal(alone.kept_per_head()[0], batched.kept_per_head()[row])


def test_a_budget_evicts_on_the_retrieval_heads_as_snapkv_would(llama3, tmp_path):
    """budget=N: retrieval heads keep the N prompt tokens SnapKV keeps (all heads retrieving: SnapKV's
    outputs exactly); streaming heads still keep sinks + recent."""
    ids = random_ids(1, 300, seed=7)
    with kvx.patched(llama3, "snapkv", budget=64, window=32):
        snap_seq, snap_logits, _ = greedy(llama3, ids, new_tokens=4)
    with kvx.patched(llama3, "retrieval_heads", ratio=1.0, budget=64):
        seq, logits, _ = greedy(llama3, ids, new_tokens=4)
    assert torch.equal(seq, snap_seq)
    torch.testing.assert_close(logits, snap_logits, rtol=1e-5, atol=1e-5)
    pattern = write_pattern(llama3, tmp_path / "heads.safetensors", torch.tensor([[1.0, 0.0]] * 3))
    with kvx.patched(llama3, "retrieval_heads", pattern=pattern, ratio=0.5, sink=4, recent=16, budget=64):
        _, _, cache = greedy(llama3, ids, new_tokens=4)
    for layer in cache.stats():
        retrieval, streaming = layer["kept_per_head"][0]
        assert retrieval == 64 + 3 and streaming <= 4 + 16 + 3  # decoded tokens are kept


def test_a_budget_must_be_a_positive_int():
    with pytest.raises(ValueError, match="retrieval_heads: budget must be >= 1, got 0"):
        kvx.make_policy("retrieval_heads", budget=0)
