"""KVQuant storage: outliers kept exactly (dense-and-sparse), keys stored before RoPE and rotated
back with the model's own RoPE on every verified architecture, and clear refusals."""

import pytest
import torch
from conftest import MODEL_TYPES, greedy, left_pad, random_ids

import kvx
from kvx.compat import config_field, decoder_config, find_rope
from kvx.kernels import quant
from kvx.patches import find_attention
from kvx.storage.quantized import QuantizedLayer
from kvx.tiny import tiny_model


def spiky(shape, seed=0, spikes=0.01):
    """Gaussian values with a fraction of large spikes (the outliers KVQuant keeps exactly)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    where = torch.rand(*shape, generator=g) < spikes
    return torch.where(where, x * 40, x)


# --- dense-and-sparse packing ------------------------------------------------------------------


@pytest.mark.parametrize("axis", ["token", "channel"])
def test_outliers_are_kept_exactly_and_narrow_the_steps(axis):
    x = spiky((2, 2, 64, 64), seed=1)
    plain = quant.quantize(x, 4, 32, axis)
    sparse = quant.quantize(x, 4, 32, axis, outliers=2)
    back = quant.dequantize(sparse)
    index = sparse.outlier_index.long()
    assert torch.equal(back.gather(-1, index), x.gather(-1, index))  # exact where kept
    error_plain = (quant.dequantize(plain) - x).abs().mean()
    error_sparse = (back - x).abs().mean()
    assert error_sparse < 0.5 * error_plain


def test_outliers_cost_what_they_hold():
    x = torch.randn(1, 2, 64, 128)
    packed = quant.quantize(x, 2, 32, "token", outliers=3)
    per_element = sum(t.numel() * t.element_size() for t in packed.tensors()) / x.numel()
    assert per_element == pytest.approx(2 / 8 + 4 / 32 + 3 * (1 + 4) / 128)  # uint8 index + fp32 value per outlier
    assert packed.outlier_index.dtype == torch.uint8 and packed.outlier_value.dtype == x.dtype


def test_outliers_follow_their_tokens_through_gather_concat_and_rows():
    x = spiky((2, 2, 96, 16), seed=2, spikes=0.05)
    packed = quant.quantize(x, 2, 32, "channel", outliers=2)
    keep = torch.rand(2, 2, 96, generator=torch.Generator().manual_seed(3)) < 0.5
    indices, slot_valid = kvx.policy.mask_to_indices(keep)
    gathered = quant.dequantize(quant.gather_tokens(packed, indices, slot_valid))
    expected = quant.dequantize(packed).gather(2, indices[..., None].expand(-1, -1, -1, 16))
    assert torch.equal(gathered[slot_valid], expected[slot_valid])
    joined = quant.dequantize(quant.concat(packed, packed))
    assert torch.equal(joined, torch.cat([quant.dequantize(packed)] * 2, dim=2))
    flipped = packed.map_rows(lambda t: t.flip(0))
    assert torch.equal(quant.dequantize(flipped), quant.dequantize(packed).flip(0))
    with pytest.raises(ValueError, match="with and without outliers"):
        quant.concat(packed, quant.quantize(x, 2, 32, "channel"))


def test_attention_over_packed_outliers_equals_attention_over_their_dequantized_values():
    keys, values = spiky((1, 2, 70, 16), seed=4), spiky((1, 2, 70, 16), seed=5)
    pk, pv = quant.quantize(keys[:, :, :64], 4, 32, "channel", outliers=1), quant.quantize(values[:, :, :64], 4, 16, "token", outliers=1)
    query = torch.randn(1, 4, 1, 16)
    out, lse = quant.packed_attention_with_lse(query, pk, pv, None, 0.25, block=24)
    expected, expected_lse = kvx.kernels.reference.attention_with_lse(
        query, quant.dequantize(pk), quant.dequantize(pv), None, 0.25)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, expected_lse, atol=1e-5, rtol=1e-5)


# --- keys before RoPE --------------------------------------------------------------------------


def _rope(model, layer=0):
    found = find_attention(model)
    types = config_field(decoder_config(model.config), "layer_types")
    return find_rope(found.cache_owner, found.modules[layer], types)


def test_quantizing_before_rope_fits_keys_with_outlier_channels_better():
    """Keys whose channels carry large offsets before RoPE (what KVQuant observed): per-channel
    scales fit them before RoPE; after it, RoPE spins each offset around its channel pair."""
    rope = _rope(tiny_model("llama", head_dim=64, rope_theta=100.0))
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(1, 2, 256, 64, generator=g) + torch.randn(1, 2, 1, 64, generator=g) * 8
    positions = torch.arange(256).expand(1, 2, 256)
    post = rope.rotate(pre, positions)
    after = quant.dequantize(quant.quantize(post, 2, 32, "channel"))
    before = rope.rotate(quant.dequantize(quant.quantize(pre, 2, 32, "channel")), positions)
    assert (before - post).abs().mean() < 0.7 * (after - post).abs().mean()


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_every_outlier_kept_gives_the_dense_model_on_every_verified_architecture(model_type):
    """outliers=1: every element is kept exactly, so only the RoPE round trip is left: un-rotated
    when packed, rotated back at the positions the cache counted (left padding included)."""
    model = tiny_model(model_type)
    ids, mask = left_pad([random_ids(1, 61, seed=1)[0], random_ids(1, 45, seed=2)[0]])
    dense_tokens, dense_logits, _ = greedy(model, ids, mask, new_tokens=24)
    with kvx.patched(model, "kvquant", outliers=1.0, group=8, window=4, sink=1):
        tokens, logits, cache = greedy(model, ids, mask, new_tokens=24)
    assert torch.equal(tokens, dense_tokens)
    torch.testing.assert_close(logits, dense_logits, atol=2e-5, rtol=1e-4)
    packed = [layer.segments[QuantizedLayer.PACKED] for layer in cache.layers if isinstance(layer, QuantizedLayer)]
    assert packed and all(segment is not None and segment.tokens >= 32 and segment.rope is not None for segment in packed)


def test_the_packed_keys_are_the_models_keys_before_rope():
    model = tiny_model("llama")
    captured = []
    k_proj = model.model.layers[0].self_attn.k_proj
    handle = k_proj.register_forward_hook(lambda module, args, out: captured.append(out))
    ids = random_ids(1, 40, seed=3)
    try:
        with kvx.patched(model, "kvquant", outliers=1.0, group=8, window=4, sink=0):
            _, _, cache = greedy(model, ids, new_tokens=2)
    finally:
        handle.remove()
    pre_rope = captured[0].view(1, 40, 2, 16).transpose(1, 2)  # [B, Hkv, S, D], as k_proj gave them
    segment = cache.layers[0].segments[QuantizedLayer.PACKED]
    torch.testing.assert_close(quant.dequantize(segment.keys), pre_rope[:, :, : segment.tokens], atol=1e-5, rtol=1e-5)


def test_4_bit_is_closer_to_dense_than_2_bit():
    model = tiny_model("llama")
    ids = random_ids(1, 200, seed=4)
    _, dense_logits, _ = greedy(model, ids, new_tokens=4)
    errors = {}
    for bits in (2, 4):
        with kvx.patched(model, "kvquant", bits=bits, group=8, window=4):
            _, logits, _ = greedy(model, ids, new_tokens=4)
        errors[bits] = float((logits - dense_logits).abs().max())
    assert 0 < errors[4] < errors[2]


# --- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize("options,message", [
    ({"outliers": 1.5}, "outliers must be a fraction from 0 to 1, got 1.5"),
    ({"outliers": -0.1}, "outliers must be a fraction from 0 to 1"),
    ({"bits": 3}, "bits must be one of 2, 4, got 3"),
])
def test_bad_options_are_refused_by_name(options, message):
    with pytest.raises(ValueError, match=message):
        kvx.make_policy("kvquant", **options)


def test_a_rope_whose_frequencies_change_with_length_is_refused_at_patch():
    model = tiny_model("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ValueError, match="kvquant stores keys before RoPE.*dynamic RoPE"):
        kvx.patch(model, "kvquant", group=8)
    assert not kvx.is_patched(model)
