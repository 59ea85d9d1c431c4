"""Quantized storage under head-wise budgets: each (row, KV head) holds its old tokens without
padding to the longest, reads them exactly as the full-precision ragged storage does, and its
bytes follow the kept tokens. (The conformance suites also run every storage test over
``kivi:...,ragged=true``.)"""

import pytest
import torch
from conftest import greedy, left_pad, random_ids

import kvx
from kvx.compose import from_spec
from kvx.kernels import quant
from kvx.storage.quantized import QuantizedLayer
from kvx.storage.segments import PackedSegment, RaggedSegment
from kvx.tiny import tiny_model


def _head_budget(storage: str):
    return kvx.compose(kvx.make_policy("head_budget", budget=40, window=8), from_spec(storage))


def test_under_head_budgets_quantized_storage_reads_what_full_precision_ragged_storage_reads():
    """kvquant with every element an outlier stores exactly, so under the same head budgets it must
    give what the full-precision ragged storage gives: unequal heads, left padding, decode steps."""
    model = tiny_model("llama")
    ids, mask = left_pad([random_ids(1, 150, seed=1)[0], random_ids(1, 110, seed=2)[0]])
    with kvx.patched(model, _head_budget("ragged")):
        ragged_tokens, ragged_logits, _ = greedy(model, ids, mask, new_tokens=20)
    with kvx.patched(model, _head_budget("kvquant:outliers=1.0,group=8,window=4")):
        tokens, logits, cache = greedy(model, ids, mask, new_tokens=20)
    assert torch.equal(tokens, ragged_tokens)
    torch.testing.assert_close(logits, ragged_logits, atol=2e-5, rtol=1e-4)
    layer = cache.layers[0]
    kept = layer.kept_per_head()
    assert layer.kind == "kvquant(ragged)" and int(kept.max()) > int(kept.min())  # the heads really differ
    packed = layer.segments[QuantizedLayer.PACKED]
    assert isinstance(packed, RaggedSegment) and all(p.valid is None for p in packed._present())  # no padding slot


def test_a_ragged_segment_holds_only_real_tokens():
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 2, 64, 16, generator=g), torch.randn(2, 2, 64, 16, generator=g)
    valid = torch.ones(2, 2, 64, dtype=torch.bool)
    valid[0, 1, :48] = False  # row 0, head 1 holds 16 tokens; the others 64
    valid[1, 0, :32] = False
    padded = PackedSegment(keys=quant.quantize(keys, 4, 16, "channel"), values=quant.quantize(values, 4, 16, "token"))
    padded.valid = valid
    ragged = RaggedSegment.from_padded(padded)
    assert ragged.counts().tolist() == [[64, 16], [32, 64]]
    bytes_of = lambda segment: sum(t.numel() * t.element_size() for t in segment.held_tensors())  # noqa: E731
    assert bytes_of(ragged) < 0.75 * bytes_of(padded)
    padded_keys, padded_values = padded.kv(torch.float32)
    ragged_keys, ragged_values = ragged.kv(torch.float32)
    assert torch.equal(ragged.valid_mask(2, 2, keys.device), valid)
    assert torch.equal(ragged_keys[valid], padded_keys[valid]) and torch.equal(ragged_values[valid], padded_values[valid])
    query = torch.randn(2, 4, 1, 16, generator=g)
    out, lse = ragged.decode_part(query, 0.25, None)
    expected, expected_lse = padded.decode_part(query, 0.25, None)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, expected_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["int8", "kivi", "kvquant"])
def test_ragged_must_be_true_or_false(name):
    with pytest.raises(TypeError, match=f"{name}: ragged must be true or false, got 'yes'"):
        kvx.make_policy(name, ragged="yes")
