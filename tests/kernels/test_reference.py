"""The pure-torch reference ops against naive math, on odd shapes and GQA ratios."""

import pytest
import torch

from kvx.kernels import reference


def naive_attention(q, k, v, mask, scaling, softcap=None):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1).double(), v.repeat_interleave(groups, 1).double()
    logits = q.double() @ k.transpose(-1, -2) * scaling
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits.masked_fill(~mask, -torch.inf)
    return (logits.softmax(-1) @ v).to(q.dtype)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("q_len,kv_len,dim", [(1, 97, 64), (7, 31, 80), (13, 13, 16)])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_attention_matches_naive(heads, kv_heads, q_len, kv_len, dim, softcap):
    g = torch.Generator().manual_seed(heads * 100 + q_len)
    q = torch.randn(2, heads, q_len, dim, generator=g)
    k = torch.randn(2, kv_heads, kv_len, dim, generator=g)
    v = torch.randn(2, kv_heads, kv_len, dim, generator=g)
    mask = torch.rand(2, 1, q_len, kv_len, generator=g) > 0.3
    mask[..., -1] = True  # every query sees at least one key
    scaling = dim**-0.5
    got = reference.attention(q, k, v, mask, scaling, softcap)
    torch.testing.assert_close(got, naive_attention(q, k, v, mask, scaling, softcap), rtol=1e-5, atol=1e-5)
    # no mask = bottom-right causal
    causal = reference.causal_mask(q_len, kv_len, q.device).expand(2, 1, -1, -1)
    got = reference.attention(q, k, v, None, scaling, softcap)
    torch.testing.assert_close(got, naive_attention(q, k, v, causal, scaling, softcap), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads,kv_heads", [(6, 3), (8, 1)])
def test_window_probs_match_naive(heads, kv_heads):
    g = torch.Generator().manual_seed(heads)
    q = torch.randn(2, heads, 5, 24, generator=g)
    k = torch.randn(2, kv_heads, 37, 24, generator=g)
    mask = reference.causal_mask(5, 37, q.device).expand(2, 1, -1, -1).clone()
    mask[1, :, :, :9] = False  # padding in row 1
    probs = reference.window_attention_probs(q, k, mask, 0.2)
    logits = (q @ k.repeat_interleave(heads // kv_heads, 1).transpose(-1, -2) * 0.2).masked_fill(~mask, -torch.inf)
    want = logits.softmax(-1).reshape(2, kv_heads, heads // kv_heads, 5, 37)
    torch.testing.assert_close(probs, want, rtol=1e-5, atol=1e-6)
    # per-head masks group the same way
    head_mask = mask.expand(2, heads, -1, -1)
    torch.testing.assert_close(reference.window_attention_probs(q, k, head_mask, 0.2), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("heads,kv_heads,q_len,kv_len,block", [(4, 2, 13, 13, 4), (8, 1, 5, 37, 2), (6, 3, 40, 40, 256)])
def test_column_sums_match_full_matrix(heads, kv_heads, q_len, kv_len, block):
    g = torch.Generator().manual_seed(q_len)
    q = torch.randn(2, heads, q_len, 16, generator=g)
    k = torch.randn(2, kv_heads, kv_len, 16, generator=g)
    valid = torch.ones(2, kv_heads, kv_len, dtype=torch.bool)
    valid[1, :, :3] = False  # left padding in row 1
    sums = reference.attention_column_sums(q, k, valid, 0.25, softcap=3.0, block=block)
    logits = torch.tanh(q @ k.repeat_interleave(heads // kv_heads, 1).transpose(-1, -2) * 0.25 / 3.0) * 3.0
    mask = reference.causal_mask(q_len, kv_len, q.device) & valid[:, :1, None, :]
    probs = logits.masked_fill(~mask, -torch.inf).softmax(-1).nan_to_num(0.0)
    probs = probs * valid[:, :1, -q_len:, None]  # padded queries contribute nothing
    want = probs.sum(-2).reshape(2, kv_heads, heads // kv_heads, kv_len)
    torch.testing.assert_close(sums, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads,kv_heads,q_len,kv_len,block", [(4, 2, 13, 13, 4), (8, 1, 5, 37, 2), (6, 3, 40, 40, 256),
                                                             (4, 4, 1, 23, None)])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_attention_with_column_sums_is_attention_and_its_column_sums(heads, kv_heads, q_len, kv_len, block, softcap):
    """One pass gives causal attention over the valid keys (a row that sees none: 0) and the column
    sums of attention_column_sums, with padded rows, a head without any valid key, value dims that differ."""
    g = torch.Generator().manual_seed(kv_len)
    q = torch.randn(2, heads, q_len, 16, generator=g)
    k, v = torch.randn(2, kv_heads, kv_len, 16, generator=g), torch.randn(2, kv_heads, kv_len, 12, generator=g)
    valid = torch.ones(2, kv_heads, kv_len, dtype=torch.bool)
    valid[1, :, :3] = False  # left padding in row 1
    valid[0, -1, : kv_len - q_len + 1] = False  # row 0's last head: its first query sees nothing
    out, sums = reference.attention_with_column_sums(q, k, v, valid, 0.25, softcap, block=block)
    mask = reference.causal_mask(q_len, kv_len, q.device) & reference.expand_kv_heads(valid, heads // kv_heads)[:, :, None]
    want = naive_attention(q, k, v, mask, 0.25, softcap).nan_to_num(0.0)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sums, reference.attention_column_sums(q, k, valid, 0.25, softcap, block=block),
                               rtol=1e-5, atol=1e-5)
    no_padding = reference.attention_with_column_sums(q, k, v, None, 0.25, softcap, block=block)
    full = reference.causal_mask(q_len, kv_len, q.device).expand(2, heads, -1, -1)
    torch.testing.assert_close(no_padding[0], naive_attention(q, k, v, full, 0.25, softcap), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(no_padding[1], reference.attention_column_sums(q, k, None, 0.25, softcap, block=block),
                               rtol=1e-5, atol=1e-5)
    half = reference.attention_with_column_sums(q.bfloat16(), k.bfloat16(), v.bfloat16(), valid, 0.25, softcap)
    assert half[0].dtype == torch.bfloat16 and half[1].dtype == torch.float32


def test_pack_unpack_round_trip():
    g = torch.Generator().manual_seed(3)
    dense = torch.randn(2, 3, 11, 5, generator=g)
    keep = torch.rand(2, 3, 11, generator=g) > 0.5
    keep[1, 2] = False  # an empty segment
    packed, offsets = reference.pack_ragged(dense, keep)
    assert packed.shape == (int(keep.sum()), 5) and offsets.tolist()[-1] == int(keep.sum())
    back, valid = reference.unpack_ragged(packed, offsets, 2, 3)
    assert torch.equal(valid.sum(-1), keep.sum(-1))
    assert torch.equal(back[valid], dense[keep])
    assert not back[~valid].any()  # padding slots are zeros
    assert torch.equal(reference._gather_segments(packed, offsets, valid), back)  # the GPU path, same layout
    stats, _ = reference.unpack_ragged(reference.pack_ragged(dense[..., 0], keep)[0], offsets, 2, 3)  # [N] stats
    assert torch.equal(stats[valid], dense[..., 0][keep]) and not stats[~valid].any()
    empty, empty_valid = reference.unpack_ragged(dense[:0, 0, 0], torch.zeros(7, dtype=torch.long), 2, 3)
    assert empty.shape == (2, 3, 0, 5) and empty_valid.shape == (2, 3, 0)


@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("q_len", [1, 3])
def test_ragged_attention_merged_with_a_tail_equals_dense_over_the_kept_tokens(softcap, q_len):
    g = torch.Generator().manual_seed(4)
    batch, heads, kv_heads, dim = 2, 8, 2, 16
    keys = torch.randn(batch, kv_heads, 30, dim, generator=g)
    values = torch.randn(batch, kv_heads, 30, dim, generator=g)
    keep = torch.rand(batch, kv_heads, 30, generator=g) > 0.4
    keep[1, 0] = False  # an empty segment: that head attends to its tail alone
    tail_k, tail_v = torch.randn(batch, kv_heads, 3, dim, generator=g), torch.randn(batch, kv_heads, 3, dim, generator=g)
    q = torch.randn(batch, heads, q_len, dim, generator=g)
    packed_k, offsets = reference.pack_ragged(keys, keep)
    packed_v, _ = reference.pack_ragged(values, keep)
    merged = reference.merge_attention([
        reference.ragged_attention(q, packed_k, packed_v, offsets, 0.3, softcap),
        reference.attention_with_lse(q, tail_k, tail_v, None, 0.3, softcap),
    ])
    # dense reference: everything, with the dropped tokens masked out
    full_k, full_v = torch.cat([keys, tail_k], 2), torch.cat([values, tail_v], 2)
    visible = torch.cat([keep, torch.ones(batch, kv_heads, 3, dtype=torch.bool)], -1)
    mask = visible.repeat_interleave(heads // kv_heads, 1)[:, :, None, :].expand(-1, -1, q_len, -1)
    torch.testing.assert_close(merged, naive_attention(q, full_k, full_v, mask, 0.3, softcap), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask_rows", [1, 13])
def test_attention_with_lse_blocks_give_the_same_result(mask_rows):
    g = torch.Generator().manual_seed(8)
    q, k, v = torch.randn(2, 4, 13, 16, generator=g), torch.randn(2, 2, 29, 16, generator=g), torch.randn(2, 2, 29, 16, generator=g)
    mask = torch.rand(2, 1, mask_rows, 29, generator=g) > 0.3
    whole = reference.attention_with_lse(q, k, v, mask, 0.25, block=256)
    blocked = reference.attention_with_lse(q, k, v, mask, 0.25, block=4)
    torch.testing.assert_close(blocked[0], whole[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(blocked[1], whole[1], rtol=1e-6, atol=1e-6)
    full_mask = mask.expand(2, 4, 13, 29)
    per_head = torch.rand(2, 4, 13, 29, generator=g) > 0.3  # a different mask for each query head (GQA 2)
    torch.testing.assert_close(reference.attention_with_lse(q, k, v, per_head, 0.25, block=5)[0],
                               naive_attention(q, k, v, per_head, 0.25), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reference.attention(q, k, v, full_mask, 0.25, softcap=2.0),
                               naive_attention(q, k, v, full_mask, 0.25, softcap=2.0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads,kv_heads,q_len,kv_len,dim,value_dim", [(4, 2, 1, 37, 16, 16), (8, 2, 9, 21, 24, 16)])
def test_attention_with_sinks_matches_a_softmax_with_a_sink_column(heads, kv_heads, q_len, kv_len, dim, value_dim):
    """gpt-oss' learned sinks: one extra logit per head in every softmax, with no value; keys and
    values may differ in head dim."""
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, heads, q_len, dim, generator=g)
    k = torch.randn(1, kv_heads, kv_len, dim, generator=g)
    v = torch.randn(1, kv_heads, kv_len, value_dim, generator=g)
    sinks = torch.randn(heads, generator=g)
    mask = reference.causal_mask(q_len, kv_len, q.device).expand(1, heads, q_len, kv_len)
    groups = heads // kv_heads
    logits = q.double() @ k.repeat_interleave(groups, 1).double().transpose(-1, -2) * dim**-0.5
    logits = logits.masked_fill(~mask, -torch.inf)
    with_sink = torch.cat([logits, sinks.double().reshape(1, heads, 1, 1).expand(1, heads, q_len, 1)], -1)
    expected = with_sink.softmax(-1)[..., :-1] @ v.repeat_interleave(groups, 1).double()
    got = reference.attention(q, k, v, None, dim**-0.5, sinks=sinks)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, reference.attention(q, k, v, None, dim**-0.5), atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
def test_take_tokens_equals_gather_on_odd_shapes(dtype):
    """One row copy per token gives what an element-wise gather gives, per row and head, on a
    non-contiguous input and with repeated and reordered indices."""
    gen = torch.Generator().manual_seed(3)
    x = (torch.rand(3, 5, 13, 7, generator=gen) * 100).to(dtype)[..., :5]  # non-contiguous
    indices = torch.randint(0, 13, (3, 5, 9), generator=gen)
    expected = x.gather(2, indices[..., None].expand(*indices.shape, x.shape[-1]))
    assert torch.equal(reference.take_tokens(x, indices), expected)


def test_take_tokens_refuses_mismatched_rows():
    with pytest.raises(ValueError, match=r"do not match x"):
        reference.take_tokens(torch.zeros(2, 3, 4, 5), torch.zeros(2, 2, 1, dtype=torch.long))
