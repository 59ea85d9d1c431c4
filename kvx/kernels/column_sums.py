"""Attention column sums (H2O's accumulated attention): the Triton kernel or its torch reference."""

from __future__ import annotations

import torch

from kvx.kernels import reference
from kvx.kernels.ragged_decode import choose_backend


def attention_column_sums(
    query: torch.Tensor,
    key: torch.Tensor,
    key_valid: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``[B, Hkv, G, S]`` float32: attention each key receives, summed over the causal queries
    (the last ``q`` of the ``S`` positions); see :func:`kvx.kernels.reference.attention_column_sums`."""
    if choose_backend(query.device, backend) == "torch":
        return reference.attention_column_sums(query, key, key_valid, scaling, softcap)
    return _triton_column_sums(query, key, key_valid, scaling, softcap)


def attention_with_column_sums(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_valid: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Causal attention ``[B, H, q, Dv]`` and its column sums ``[B, Hkv, G, S]`` from one pass
    (:func:`kvx.kernels.reference.attention_with_column_sums`), or None where two passes are the
    faster choice (on GPU: flash attention, then the Triton column-sum kernel)."""
    if choose_backend(query.device, backend) != "torch":
        return None
    return reference.attention_with_column_sums(query, key, value, key_valid, scaling, softcap)


def _triton_column_sums(query, key, key_valid, scaling, softcap):
    import triton

    from kvx.kernels.triton.column_sums import column_sums_kernel, row_lse_kernel

    batch, heads, q_len, dim = query.shape
    kv_heads, num_keys = key.shape[1], key.shape[2]
    if key_valid is None:
        key_valid = torch.ones(batch, kv_heads, num_keys, dtype=torch.bool, device=key.device)
    q = query.reshape(batch * heads, q_len, dim).contiguous()
    k = key.reshape(batch * kv_heads, num_keys, dim).contiguous()
    valid = key_valid.reshape(batch * kv_heads, num_keys).to(torch.int8).contiguous()
    lse = torch.empty(batch * heads, q_len, device=query.device, dtype=torch.float32)
    sums = torch.empty(batch * heads, num_keys, device=query.device, dtype=torch.float32)
    meta = dict(GROUPS=heads // kv_heads, D=dim, BLOCK_D=max(16, triton.next_power_of_2(dim)), BLOCK_M=32,
                BLOCK_N=32, USE_SOFTCAP=softcap is not None)
    scalars = (float(scaling), float(softcap or 1.0), q_len, num_keys)
    row_lse_kernel[(batch * heads, triton.cdiv(q_len, 32))](q, k, valid, lse, *scalars, **meta)
    column_sums_kernel[(batch * heads, triton.cdiv(num_keys, 32))](q, k, valid, lse, sums, *scalars, **meta)
    return sums.reshape(batch, kv_heads, heads // kv_heads, num_keys)
