"""The Triton quantized-cache kernels (packed decode attention, quantize-and-pack) against their
torch references in kvx.kernels.quant, on odd shapes, under the CPU interpreter
(TRITON_INTERPRET=1, set in conftest) or on a GPU when there is one."""

import pytest
import torch

from kvx.kernels import quant
from kvx.kernels.quant_kernels import packed_decode_attention, quantize_packed

triton = pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _packed(x, bits, group, axis, symmetric=False, keep=None):
    """``x`` quantized by the reference, then (``keep`` tokens ``[B, Hkv, K]``) gathered: per-channel
    groups then carry a ``group_index``."""
    packed = quant.quantize(x, bits, group, axis, symmetric)
    return packed if keep is None else quant.gather_tokens(packed, keep)


def _kept(batch, kv_heads, length, kept, generator):
    """``[B, Hkv, kept]`` ascending token indices, a different random subset per row and head."""
    scores = torch.rand(batch, kv_heads, length, generator=generator)
    return scores.topk(kept, dim=-1).indices.sort(dim=-1).values


# name: (batch, kv_heads, groups, dim, stored, kept, keys (bits, group, axis, symmetric), values (...))
CASES = {
    # KIVI int4: per-channel keys after an eviction (97 of 128 tokens kept: a group_index), padding
    "kivi4": (2, 2, 4, 64, 128, 97, (4, 32, "channel", False), (4, 32, "token", False)),
    # KIVI 2-bit, head dim 80, GQA 8, no eviction (group s // 16)
    "kivi2": (2, 1, 8, 80, 112, None, (2, 16, "channel", False), (2, 16, "token", False)),
    # int8 symmetric per token, head dim 128, MHA, 300 tokens
    "int8": (1, 3, 1, 128, 300, None, (8, 128, "token", True), (8, 64, "token", True)),
    # both per channel (values too), with a group_index, head dim 80
    "channel_values": (1, 2, 4, 80, 96, 61, (4, 16, "token", False), (4, 16, "channel", True)),
}


def _case(name, dtype, seed=0):
    batch, kv_heads, groups, dim, stored, kept, key_layout, value_layout = CASES[name]
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, kv_heads * groups, 1, dim, generator=g).to(DEVICE, dtype)
    keys_dense = torch.randn(batch, kv_heads, stored, dim, generator=g).to(DEVICE) * 2 + 0.5
    values_dense = torch.randn(batch, kv_heads, stored, dim, generator=g).to(DEVICE)
    keep = None if kept is None else _kept(batch, kv_heads, stored, kept, g).to(DEVICE)
    keys, values = _packed(keys_dense, *key_layout, keep=keep), _packed(values_dense, *value_layout, keep=keep)
    valid = None
    if batch > 1:  # row 1 is left-padded by 20 slots; its last KV head sees nothing at all
        valid = torch.ones(batch, kv_heads, keys.tokens, dtype=torch.bool, device=DEVICE)
        valid[1, :, :20] = False
        valid[1, -1] = False
    return query, keys, values, valid


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decode_kernel_matches_reference(name, dtype):
    query, keys, values, valid = _case(name, dtype)
    softcap = 30.0 if name in ("kivi2", "int8") else None
    scaling = query.shape[-1] ** -0.5
    out, lse = packed_decode_attention(query, keys, values, valid, scaling, softcap, backend="triton", splits=3)
    want_out, want_lse = quant.packed_attention_with_lse(query, keys, values, valid, scaling, softcap)
    # both sides dequantize to the query's dtype, then compute in float32: only summation order differs
    torch.testing.assert_close(out, want_out, rtol=2e-5, atol=2e-5)
    finite = torch.isfinite(want_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    torch.testing.assert_close(lse[finite], want_lse[finite], rtol=2e-5, atol=2e-5)
    if valid is not None:  # a KV head with no valid slot: its query heads get out 0, lse -inf
        assert not finite[1, -(query.shape[1] // keys.codes.shape[1]):].any()
        assert not out[~finite].any()


def test_split_count_and_tile_size_do_not_change_the_result():
    query, keys, values, valid = _case("kivi4", torch.float32, seed=1)
    one, _ = packed_decode_attention(query, keys, values, valid, 0.125, backend="triton", splits=1)
    many, _ = packed_decode_attention(query, keys, values, valid, 0.125, backend="triton", splits=5, block=16)
    torch.testing.assert_close(one, many, rtol=1e-5, atol=1e-5)


def test_decode_over_no_tokens():
    query, keys, values, _ = _case("kivi2", torch.float32)
    none = lambda p: quant.gather_tokens(p, torch.zeros(*p.codes.shape[:2], 0, dtype=torch.long, device=DEVICE))  # noqa: E731
    out, lse = packed_decode_attention(query, none(keys), none(values), None, 0.1, backend="triton")
    assert out.shape == query.shape and not out.any() and torch.equal(lse, torch.full_like(lse, -torch.inf))


def test_decode_refuses_bad_shapes():
    query, keys, values, valid = _case("kivi2", torch.float32)
    with pytest.raises(ValueError, match="one query per head, got 2"):
        packed_decode_attention(query.expand(-1, -1, 2, -1), keys, values, valid, 0.1, backend="triton")
    kivi4 = _case("kivi4", torch.float32)
    with pytest.raises(ValueError, match="7 query heads do not share 2 KV heads evenly"):
        packed_decode_attention(kivi4[0][:, :7], *kivi4[1:], 0.1, backend="triton")
    with pytest.raises(ValueError, match="block must be a power of two of 16 or more, got 24"):
        packed_decode_attention(query, keys, values, valid, 0.1, backend="triton", block=24)


def _assert_packed_equal(got, want):
    # exact: scales and zero points in float32 rounded to float16, codes by an IEEE division of the
    # rounded values and round-half-to-even, as the reference; no tie is allowed to differ
    assert got.codes.dtype == torch.uint8 and got.codes.shape == want.codes.shape
    assert torch.equal(got.scale, want.scale)
    assert (got.zero is None) == (want.zero is None)
    if want.zero is not None:
        assert torch.equal(got.zero, want.zero)
    assert torch.equal(got.codes, want.codes)
    assert (got.bits, got.group, got.axis, got.group_index) == (want.bits, want.group, want.axis, None)


@pytest.mark.parametrize(
    "axis,bits,group,length",
    [("token", 2, 16, 37), ("token", 4, 40, 37), ("token", 8, 80, 37), ("channel", 2, 16, 48),
     ("channel", 4, 32, 64), ("channel", 8, 16, 32)],
)
@pytest.mark.parametrize("symmetric", [False, True])
def test_pack_kernel_matches_quantize(axis, bits, group, length, symmetric):
    g = torch.Generator().manual_seed(bits + length)
    x = torch.randn(2, 3, length, 80, generator=g) * 3 - 1
    x[0, 0, :16, :16] = 0.25  # constant groups: scale clamped to float16's tiny
    dtype = {2: torch.float32, 4: torch.bfloat16, 8: torch.float16}[bits]
    x = x.to(DEVICE, dtype)
    _assert_packed_equal(quantize_packed(x, bits, group, axis, symmetric, backend="triton"),
                         quant.quantize(x, bits, group, axis, symmetric))


def test_pack_kernel_rounds_ties_to_even():
    # a group of 0, 0.5, 1.5, ..., 13.5, 15: zero 0, scale 1 at 4 bits, so every x.5 is an exact tie
    row = torch.cat([torch.zeros(1), torch.arange(14) + 0.5, torch.full((1,), 15.0)])
    x = row.expand(1, 1, 3, 16).to(DEVICE)
    got = quantize_packed(x, 4, 16, "token", backend="triton")
    _assert_packed_equal(got, quant.quantize(x, 4, 16, "token"))
    want = torch.tensor([0, 0, 2, 2, 4, 4, 6, 6, 8, 8, 10, 10, 12, 12, 14, 15], dtype=torch.float32)
    assert torch.equal(quant.dequantize(got)[0, 0, 0].cpu(), want)


def test_pack_then_decode_round_trip():
    """Both kernels in a row: keys and values packed by the kernel, read by the decode kernel."""
    g = torch.Generator().manual_seed(3)
    query = torch.randn(1, 4, 1, 64, generator=g).to(DEVICE)
    dense = torch.randn(2, 1, 2, 64, 64, generator=g).to(DEVICE)
    keys = quantize_packed(dense[0], 4, 32, "channel", backend="triton")
    values = quantize_packed(dense[1], 4, 32, "token", backend="triton")
    out, lse = packed_decode_attention(query, keys, values, None, 0.125, backend="triton")
    want_out, want_lse = quant.packed_attention_with_lse(query, keys, values, None, 0.125)
    torch.testing.assert_close(out, want_out, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lse, want_lse, rtol=2e-5, atol=2e-5)


def test_torch_backend_matches_the_reference():
    """(The torch backend's decode is the CPU path of kvx.kernels.quant_torch: same math, another order.)"""
    x = torch.randn(1, 2, 32, 64)
    packed = quantize_packed(x, 4, 32, "channel", backend="torch")
    _assert_packed_equal(packed, quant.quantize(x, 4, 32, "channel"))
    query = torch.randn(1, 4, 1, 64)
    got = packed_decode_attention(query, packed, packed, None, 0.125, backend="torch")
    want = quant.packed_attention_with_lse(query, packed, packed, None, 0.125)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5)


def test_pack_kernel_refuses_what_quantize_refuses():
    with pytest.raises(ValueError, match="multiple of 32 tokens, got 40"):
        quantize_packed(torch.zeros(1, 1, 40, 64, device=DEVICE), 4, 32, "channel", backend="triton")
    with pytest.raises(ValueError, match="bits must be one of 2, 4, 8, got 3"):
        quantize_packed(torch.zeros(1, 1, 32, 64, device=DEVICE), 3, 32, "token", backend="triton")
