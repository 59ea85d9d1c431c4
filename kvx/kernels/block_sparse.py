"""Block-sparse causal attention (prefill): the Triton kernel, or the torch path that computes only
the selected blocks (:mod:`kvx.kernels.block_sparse_torch`); the reference is
:func:`kvx.kernels.reference.block_sparse_attention`.

Backend choice as :func:`kvx.kernels.ragged_decode.choose_backend` (``KVX_BACKEND=torch|triton``;
Triton on CUDA, the torch path on CPU).
"""

from __future__ import annotations

import torch

from kvx.kernels import block_sparse_torch
from kvx.kernels.ragged_decode import choose_backend
from kvx.kernels.reference import block_grid

BLOCK_SIZES = (16, 32, 64, 128, 256)
"""Block sizes the op takes: powers of two of 16 or more (a ``tl.dot`` dimension on a GPU)."""


def check_block_size(block_size, owner: str = "block-sparse attention") -> None:
    """Raise a clear error unless ``block_size`` is a power of two of 16 or more."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size not in BLOCK_SIZES:
        raise ValueError(f"{owner}: block_size must be a power of two >= 16 (one of "
                         f"{', '.join(map(str, BLOCK_SIZES))}), got {block_size!r}")


def block_sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    block_index: torch.Tensor,
    key_valid: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
    block_size: int = 64,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of ``query [B, H, q, D]`` (the last ``q`` of ``S`` slots) over ``key [B, Hkv,
    S, D]`` / ``value [B, Hkv, S, Dv]``, computing only the key blocks each query block's list in
    ``block_index [B, H, Qb, K]`` names (``-1`` = none; the block grid of
    :mod:`kvx.kernels.reference`), GQA native; ``key_valid [B, Hkv, S]`` bool masks padding ->
    ``(out [B, H, q, Dv], lse [B, H, q])`` float32 (a query that sees nothing: out 0, lse -inf)."""
    check_block_size(block_size)
    batch, heads, q_len, _ = query.shape
    num_qb = block_grid(q_len, key.shape[-2], block_size)[0]
    if tuple(block_index.shape[:3]) != (batch, heads, num_qb):
        raise ValueError(f"block_index {tuple(block_index.shape)} must be [B, H, Qb, K] = [{batch}, {heads}, "
                         f"{num_qb}, K] for {q_len} queries in blocks of {block_size}")
    if heads % key.shape[1]:
        raise ValueError(f"{heads} query heads do not share {key.shape[1]} KV heads evenly")
    if q_len > key.shape[-2]:
        raise ValueError(f"{q_len} queries are more than the {key.shape[-2]} keys they are the last of")
    if choose_backend(query.device, backend) == "torch":
        return block_sparse_torch.block_sparse_attention(query, key, value, block_index, key_valid, scaling,
                                                         softcap, block_size)
    return _triton_block_sparse(query, key, value, block_index, key_valid, scaling, softcap, block_size)


def _triton_block_sparse(query, key, value, block_index, key_valid, scaling, softcap, block_size):
    import triton

    from kvx.kernels.triton.block_sparse import block_sparse_attention_kernel

    batch, heads, q_len, dim = query.shape
    kv_heads, kv_len, value_dim = key.shape[1], key.shape[2], value.shape[-1]
    num_qb, num_kb, pad = block_grid(q_len, kv_len, block_size)
    width = block_index.shape[-1]
    out = torch.empty(batch, heads, q_len, value_dim, device=query.device, dtype=torch.float32)
    lse = torch.empty(batch, heads, q_len, device=query.device, dtype=torch.float32)
    q = query.contiguous()
    valid_arg = q if key_valid is None else key_valid.to(torch.int8).contiguous()
    block_sparse_attention_kernel[(batch * heads, num_qb)](
        q, key.contiguous(), value.contiguous(), block_index.to(torch.int32).contiguous(), valid_arg, out, lse,
        float(scaling), float(softcap or 1.0), q_len, kv_len, pad, num_qb, num_kb, width,
        H=heads, GROUPS=heads // kv_heads, D=dim, DV=value_dim, BLOCK_D=max(16, triton.next_power_of_2(dim)),
        BLOCK_DV=max(16, triton.next_power_of_2(value_dim)), BLOCK=block_size, HAS_VALID=key_valid is not None,
        USE_SOFTCAP=softcap is not None,
    )
    return out, lse


__all__ = ["BLOCK_SIZES", "block_sparse_attention", "check_block_size"]
