"""Block-sparse attention: the reference is dense attention with the equivalent mask; the torch path
(CPU) and the Triton kernel (under TRITON_INTERPRET=1 on the CPU, or on a GPU) match it on odd
shapes, GQA, chunked queries, padded rows, soft-capping and low precision."""

import pytest
import torch

from kvx.kernels import block_sparse_torch, reference
from kvx.kernels.block_sparse import block_sparse_attention, check_block_size

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(batch, kv_heads, groups, q_len, kv_len, dim, block, density, padded=False, seed=0, value_dim=None):
    """Random q/k/v, a random block index (lists in random order, -1 holes) and a key padding mask."""
    g = torch.Generator().manual_seed(seed)
    heads = kv_heads * groups
    query = torch.randn(batch, heads, q_len, dim, generator=g)
    key = torch.randn(batch, kv_heads, kv_len, dim, generator=g)
    value = torch.randn(batch, kv_heads, kv_len, value_dim or dim, generator=g)
    num_qb, num_kb, _ = reference.block_grid(q_len, kv_len, block)
    chosen = torch.rand(batch, heads, num_qb, num_kb, generator=g) < density
    index = torch.where(chosen, torch.arange(num_kb), -1)[..., torch.randperm(num_kb, generator=g)]
    valid = None
    if padded:  # row 0 left-padded by a third, every head alike
        valid = torch.ones(batch, kv_heads, kv_len, dtype=torch.bool)
        valid[0, :, : kv_len // 3] = False
    return query, key, value, index, valid


def _close(out, lse, want_out, want_lse, tol=2e-5):
    torch.testing.assert_close(out, want_out, rtol=tol, atol=tol)
    finite = torch.isfinite(want_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    torch.testing.assert_close(lse[finite], want_lse[finite], rtol=tol, atol=tol)


SHAPES = [  # batch, kv heads, GQA groups, queries, keys, head dim, block
    (1, 2, 1, 97, 97, 64, 16),  # prefill, a partial first block
    (2, 1, 4, 40, 300, 80, 32),  # chunked: 40 queries after 260 keys, GQA 4, head dim 80
    (2, 2, 2, 130, 130, 64, 16),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("padded", [False, True])
def test_all_blocks_selected_is_dense_attention(shape, padded):
    batch, kv_heads, groups, q_len, kv_len, dim, block = shape
    query, key, value, index, valid = _case(*shape, density=1.0, padded=padded)
    mask = reference.causal_mask(q_len, kv_len, query.device)
    if valid is not None:
        mask = mask & reference.expand_kv_heads(valid, groups)[:, :, None, :]
    want = reference.attention_with_lse(query, key, value, mask, dim**-0.5)
    _close(*reference.block_sparse_attention(query, key, value, index, valid, dim**-0.5, block_size=block), *want)
    _close(*block_sparse_attention(query, key, value, index, valid, dim**-0.5, block_size=block, backend="torch"), *want)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("softcap", [None, 20.0])
def test_torch_path_matches_masked_dense_on_random_blocks(shape, padded, softcap):
    *_, dim, block = shape
    query, key, value, index, valid = _case(*shape, density=0.4, padded=padded, seed=len(shape) + int(padded))
    got = block_sparse_attention(query, key, value, index, valid, dim**-0.5, softcap, block, backend="torch")
    _close(*got, *reference.block_sparse_attention(query, key, value, index, valid, dim**-0.5, softcap, block))


def test_torch_path_without_the_flash_kernel_and_with_another_value_dim(monkeypatch):
    """The matmul route (no fused kernel, or keys and values of different head dims) gives the same."""
    query, key, value, index, valid = _case(2, 1, 4, 40, 300, 64, 32, density=0.4, padded=True, value_dim=48)
    want = reference.block_sparse_attention(query, key, value, index, valid, 0.125, None, 32)
    _close(*block_sparse_attention(query, key, value, index, valid, 0.125, None, 32, backend="torch"), *want)
    monkeypatch.setattr(reference, "_FUSED_CPU_ATTENTION", None)
    for padded in (True, False):
        query, key, value, index, valid = _case(2, 1, 4, 40, 300, 64, 32, density=0.4, padded=padded)
        want = reference.block_sparse_attention(query, key, value, index, valid, 0.125, None, 32)
        _close(*block_sparse_attention(query, key, value, index, valid, 0.125, None, 32, backend="torch"), *want)


def test_torch_path_computes_only_the_selected_blocks(monkeypatch):
    """The work done (query x key pairs handed to attention) follows the selected blocks: a tenth of
    them costs about a tenth, not a masked dense call."""
    done = []
    real = block_sparse_torch._attend

    def counting(q, k, *args, **kwargs):
        done.append(q.shape[0] * q.shape[1] * k.shape[1])
        return real(q, k, *args, **kwargs)

    monkeypatch.setattr(block_sparse_torch, "_attend", counting)
    block = 16
    query, key, value, *_ = _case(1, 2, 2, 640, 640, 32, block, density=1.0)
    num_qb = 640 // block
    work = {}
    for density in (0.1, 1.0):
        causal = torch.ones(num_qb, num_qb, dtype=torch.bool).tril()
        chosen = causal & (torch.rand(1, 4, num_qb, num_qb, generator=torch.Generator().manual_seed(3)) < density)
        chosen |= torch.eye(num_qb, dtype=torch.bool)  # the diagonal, as every method keeps it
        index = torch.where(chosen, torch.arange(num_qb), -1).sort(-1, descending=True).values
        done.clear()
        block_sparse_attention(query, key, value, index, None, 0.1, block_size=block, backend="torch")
        work[density] = sum(done)
        selected = int(chosen.sum()) * block * block
        assert selected <= work[density] <= 1.3 * selected  # chunks pad lists to their widest only
    assert work[0.1] < 0.25 * work[1.0]


def test_a_query_that_sees_nothing_gets_zeros_and_minus_infinity():
    query, key, value, index, _ = _case(1, 1, 2, 48, 48, 32, 16, density=1.0)
    valid = torch.ones(1, 1, 48, dtype=torch.bool)
    valid[..., :20] = False  # queries 0-19 are padding and see no real key
    index[:, 1, 2] = -1  # head 1, query block 2 selects nothing
    on_device = [t.to(DEVICE) for t in (query, key, value, index, valid)]  # Triton runs on CUDA tensors only
    for backend in ("torch", "triton"):
        out, lse = block_sparse_attention(*on_device, 0.1, block_size=16, backend=backend)
        assert torch.isneginf(lse[:, :, :20]).all() and not out[:, :, :20].any()
        assert torch.isneginf(lse[:, 1, 32:]).all() and torch.isfinite(lse[:, 0, 32:]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_within_twice_pytorchs_own(dtype):
    """Against the float32 reference, the error at low precision stays within 2x of what PyTorch's
    own SDPA (same mask, same dtype) makes (flash-attention's rule)."""
    query, key, value, index, valid = _case(2, 2, 2, 130, 130, 64, 16, density=0.5, padded=True, seed=5)
    want, _ = reference.block_sparse_attention(query, key, value, index, valid, 0.125, None, 16)
    low = [t.to(dtype) for t in (query, key, value)]
    mask = reference.block_sparse_mask(index, 130, 130, 16) & reference.causal_mask(130, 130, query.device)
    mask = mask & reference.expand_kv_heads(valid, 2)[:, :, None, :]
    sees = mask.any(-1)
    pytorch = torch.nn.functional.scaled_dot_product_attention(*low[:1], *(reference.expand_kv_heads(t, 2)
                                                               for t in low[1:]), attn_mask=mask, scale=0.125)
    pytorch_error = (pytorch.float() - want)[sees].abs().max()
    got, _ = block_sparse_attention(*low, index, valid, 0.125, block_size=16, backend="torch")
    assert (got - want)[sees].abs().max() <= 2 * pytorch_error


TRITON_SHAPES = [  # small: the interpreter takes ~10 ms a tile step
    (1, 1, 4, 40, 97, 80, 16),  # GQA 4, head dim 80, chunked
    (2, 2, 1, 50, 50, 64, 16),  # MHA, prefill
]


@pytest.mark.parametrize("shape", TRITON_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 20.0])
def test_triton_kernel_matches_the_reference(shape, dtype, softcap):
    pytest.importorskip("triton")
    *_, dim, block = shape
    query, key, value, index, valid = _case(*shape, density=0.5, padded=True, seed=7)
    low = [t.to(DEVICE, dtype) for t in (query, key, value)]
    got = block_sparse_attention(*low, index.to(DEVICE), valid.to(DEVICE), dim**-0.5, softcap, block, backend="triton")
    # bf16 inputs are converted to fp32 at load: both sides see the same rounded inputs
    want = reference.block_sparse_attention(*(t.float() for t in low), index.to(DEVICE), valid.to(DEVICE),
                                            dim**-0.5, softcap, block)
    _close(*got, *want)


@pytest.mark.parametrize("bad", [0, 8, 48, 100, 16.0, True, "64"])
def test_block_size_must_be_a_power_of_two_of_16_or_more(bad):
    with pytest.raises(ValueError, match=r"block_size must be a power of two >= 16 \(one of 16, 32, 64"):
        check_block_size(bad)


def test_a_block_index_of_the_wrong_shape_is_refused():
    query, key, value, index, _ = _case(1, 1, 2, 48, 48, 32, 16, density=1.0)
    with pytest.raises(ValueError, match=r"block_index \(1, 2, 2, 3\) must be \[B, H, Qb, K\] = \[1, 2, 3, K\]"):
        block_sparse_attention(query, key, value, index[:, :, :2], None, 0.1, block_size=16)
