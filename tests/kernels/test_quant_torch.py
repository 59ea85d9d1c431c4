"""The CPU decode path over packed keys and values (kvx.kernels.quant_torch) against the
reference (dequantize, then attend), over every layout: keys per channel or per token, 2/4/8
bits, symmetric or not, padding, evicted tokens (group_index), softcap, blocks that split groups
of the cache, and an empty cache."""

import pytest
import torch

from kvx.kernels import quant, quant_torch
from kvx.kernels.quant_kernels import packed_decode_attention
from kvx.policy import mask_to_indices

LAYOUTS = [  # (key bits, key axis, key group, value bits, value group)
    (4, "channel", 32, 4, 16),  # KIVI 4-bit
    (2, "channel", 16, 2, 16),  # KIVI 2-bit
    (8, "token", 16, 8, 8),  # int8
    (4, "token", 16, 2, 4),  # groups of 4 channels: whole bytes at 2 bits
    (2, "token", 2, 2, 2),  # groups smaller than a byte's lanes: the dequantize route
]


def _case(batch, kv_heads, groups, tokens, dim, layout, symmetric, seed):
    key_bits, key_axis, key_group, value_bits, value_group = layout
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, kv_heads, tokens, dim, generator=g) * 2 + 0.5
    values = torch.randn(batch, kv_heads, tokens, dim, generator=g)
    query = torch.randn(batch, kv_heads * groups, 1, dim, generator=g)
    return (query, quant.quantize(keys, key_bits, key_group, key_axis, symmetric),
            quant.quantize(values, value_bits, value_group, "token", symmetric), g)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("symmetric,softcap,padded,evicted", [
    (False, None, False, False), (True, 20.0, True, False), (False, None, True, True), (True, None, False, True)])
def test_matches_the_reference(layout, symmetric, softcap, padded, evicted):
    for shape in [(2, 2, 4, 96, 64), (1, 3, 1, 160, 80)]:
        batch, kv_heads, groups, tokens, dim = shape
        query, keys, values, g = _case(batch, kv_heads, groups, tokens, dim, layout, symmetric, seed=tokens)
        valid = None
        if padded:
            valid = torch.ones(batch, kv_heads, tokens, dtype=torch.bool)
            valid[0, :, :7] = False
        if evicted:
            keep = (torch.rand(batch, kv_heads, tokens, generator=g) < 0.7) & (True if valid is None else valid)
            indices, valid = mask_to_indices(keep)
            keys, values = quant.gather_tokens(keys, indices, valid), quant.gather_tokens(values, indices, valid)
        expected = quant.packed_attention_with_lse(query, keys, values, valid, 0.125, softcap)
        for block in (32, 1024):  # blocks that split the cache, and one that holds it
            out, lse = quant_torch.packed_decode(query, keys, values, valid, 0.125, softcap, block=block)
            torch.testing.assert_close(out, expected[0], rtol=0, atol=2e-5)
            torch.testing.assert_close(lse, expected[1], rtol=0, atol=2e-5)


def test_a_row_with_no_valid_token_and_an_empty_cache():
    query, keys, values, _ = _case(2, 1, 2, 64, 64, LAYOUTS[0], False, seed=1)
    valid = torch.ones(2, 1, 64, dtype=torch.bool)
    valid[1] = False
    out, lse = quant_torch.packed_decode(query, keys, values, valid, 0.125)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and bool(torch.isinf(lse[1]).all())
    empty = quant.gather_tokens(keys, torch.zeros(2, 1, 0, dtype=torch.long))
    empty_values = quant.gather_tokens(values, torch.zeros(2, 1, 0, dtype=torch.long))
    for fn in (quant.packed_attention_with_lse, quant_torch.packed_decode):
        out, lse = fn(query, empty, empty_values, None, 0.125)
        assert out.shape == (2, 2, 1, 64) and not bool(out.any()) and bool(torch.isinf(lse).all())


def test_the_launcher_uses_it_on_cpu():
    query, keys, values, _ = _case(1, 2, 4, 64, 64, LAYOUTS[0], False, seed=2)
    expected = quant_torch.packed_decode(query, keys, values, None, 0.125)
    out = packed_decode_attention(query, keys, values, None, 0.125, backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(out, expected))


def test_low_precision_queries_stay_close():
    for dtype in (torch.bfloat16, torch.float16):
        query, keys, values, _ = _case(1, 2, 4, 128, 64, LAYOUTS[0], False, seed=3)
        expected = quant.packed_attention_with_lse(query, keys, values, None, 0.125)
        out, _ = quant_torch.packed_decode(query.to(dtype), keys, values, None, 0.125)
        assert float((out - expected[0]).abs().max()) < 0.05  # the query's own rounding, not the path's

