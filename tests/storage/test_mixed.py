"""Mixed precision (mikv + mixed storage): the scorer's important tokens leave the window at high
precision, the rest at low, nothing is dropped; bytes follow the two precisions; bad compositions
are refused by name."""

import pytest
import torch
from conftest import greedy, left_pad, random_ids

import kvx
from kvx.compose import from_spec
from kvx.storage.quantized import QuantizedLayer
from kvx.tiny import tiny_model

SPEC = "mikv:budget=32,window=4+mixed:group=8,window=8"


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _run(model, spec, ids, mask=None, new_tokens=6):
    with kvx.patched(model, from_spec(spec)):
        return greedy(model, ids, mask, new_tokens=new_tokens)


def test_nothing_is_dropped_and_the_important_tokens_are_high_precision(model):
    ids = random_ids(1, 120, seed=1)
    _, _, cache = _run(model, SPEC, ids)
    for stats, layer in zip(cache.stats(), cache.layers):
        assert stats["kind"] == "mixed" and stats["kept_min"] == stats["kept_max"] == stats["seen"] == 125
        low, high = layer.segments[layer.PACKED], layer.segments[layer.HIGH]
        assert low.keys.bits == 2 and high.keys.bits == 8
        # per head: the scorer's 32 best of the prompt are high precision (some still in the window)
        assert int(high.valid_mask(1, 2, "cpu").sum(-1).max()) <= 32


def test_the_marks_are_the_scorers_ranking(model, monkeypatch):
    """The tokens marked low precision at the prompt are exactly those snapkv, at the same budget
    and window, evicts from the same view."""
    from kvx.policies.mikv import MiKV

    ids = random_ids(1, 90, seed=2)
    snapkv = kvx.make_policy("snapkv", budget=32, window=4)
    compared = []
    original = MiKV.select_mask

    def checking(self, view):
        result = original(self, view)
        if view.phase == "prefill":
            evicted = view.valid & ~snapkv.select_mask(view)
            assert torch.equal(view.state[QuantizedLayer.LOW_PRECISION] > 0, evicted)
            compared.append(int(evicted.sum()))
        return result

    monkeypatch.setattr(MiKV, "select_mask", checking)
    _run(model, SPEC, ids, new_tokens=1)
    assert len(compared) == model.config.num_hidden_layers and min(compared) == 2 * (90 - 32)  # 2 KV heads


def test_bytes_follow_the_two_precisions(model):
    ids = random_ids(1, 120, seed=3)
    _, _, mixed = _run(model, SPEC, ids)
    _, _, low_only = _run(model, "kivi:bits=2,group=8,window=8", ids)
    _, _, high_only = _run(model, "int8:group=8,window=8", ids)
    for m, lo, hi in zip(mixed.stats(), low_only.stats(), high_only.stats()):
        assert lo["kv_bytes"] < m["kv_bytes"] < hi["kv_bytes"]


def test_sixteen_bit_important_tokens_are_kept_exactly(model):
    ids = random_ids(1, 100, seed=4)
    with kvx.patched(model, from_spec("mikv:budget=40,window=4+mixed:group=8,window=8,high_bits=16,low_bits=4")):
        cache = kvx.KVCache(model.config, model._kvx_state.axes.storage)
        kvx.prefill(model, ids, cache=cache)
    layer = cache.layers[0]
    assert layer.segments[layer.HIGH].keys.dtype == torch.float32 and layer.segments[layer.PACKED].keys.bits == 4


def test_a_padded_row_equals_the_row_alone(model):
    rows = [random_ids(1, n, seed=n)[0] for n in (70, 41)]
    ids, mask = left_pad(rows)
    batch_seq, batch_logits, _ = _run(model, SPEC, ids, mask)
    for i, row in enumerate(rows):
        alone_seq, alone_logits, _ = _run(model, SPEC, row[None])
        assert torch.equal(batch_seq[i, -6:], alone_seq[0, -6:])
        torch.testing.assert_close(batch_logits[:, i], alone_logits[:, 0], rtol=1e-4, atol=1e-4)


def test_closer_to_dense_than_low_precision_alone(model):
    errors = {"mixed": 0.0, "low": 0.0}
    for seed in range(3):
        ids = random_ids(1, 120, seed=10 + seed)
        _, dense, _ = greedy(model, ids)
        _, mixed, _ = _run(model, SPEC, ids, new_tokens=8)
        _, low, _ = _run(model, "kivi:bits=2,group=8,window=8", ids, new_tokens=8)
        errors["mixed"] += float((mixed - dense).abs().mean())
        errors["low"] += float((low - dense).abs().mean())
    assert errors["mixed"] < errors["low"]


@pytest.mark.parametrize("spec,message", [
    ("mixed", "mixed storage takes each token's precision from a mixed-precision selection \\(mikv\\); got no selection"),
    ("snapkv+mixed", "got snapkv, which evicts"),
    ("mikv+kivi", "mikv needs mixed storage, not kivi \\(quantized\\)"),
    ("mikv+mixed:high_bits=4", "mixed: high_bits must be one of 8, 16, got 4"),
    ("mikv+mixed:low_bits=8", "mixed: low_bits must be one of 2, 4, got 8"),
    ("mikv:scorer=streaming_llm", "does not rank tokens by importance"),
])
def test_bad_compositions_are_refused_by_name(spec, message):
    with pytest.raises((ValueError, TypeError), match=message):
        policy = from_spec(spec)
        kvx.compose(policy) if "+" not in spec else policy
