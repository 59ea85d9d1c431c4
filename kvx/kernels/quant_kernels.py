"""Quantized KV cache ops: dispatch between the Triton kernels (``kvx/kernels/triton/quant_*.py``)
and the torch reference (:mod:`kvx.kernels.quant`).

- :func:`packed_decode_attention`: one query per head over packed keys and values;
- :func:`quantize_packed`: quantize and pack ``x [B, Hkv, S, D]``.

Backend choice as :func:`kvx.kernels.ragged_decode.choose_backend` (``KVX_BACKEND=torch|triton``;
Triton on CUDA, the torch reference on CPU).
"""

from __future__ import annotations

import torch

from kvx.kernels import quant, quant_torch
from kvx.kernels.quant import Packed
from kvx.kernels.ragged_decode import choose_backend, combine_splits


def packed_decode_attention(
    query: torch.Tensor,
    keys: Packed,
    values: Packed,
    valid: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
    backend: str | None = None,
    splits: int | None = None,
    block: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per head ``query [B, H, 1, D]`` over packed ``keys`` (``D`` channels) and ``values``
    (``Dv`` channels) of ``S`` tokens ``[B, Hkv, S, ...]``, GQA native; ``valid [B, Hkv, S]`` bool
    masks padding slots -> ``(out [B, H, 1, Dv], lse [B, H, 1])`` float32, as
    :func:`kvx.kernels.quant.packed_attention_with_lse` (a row with no valid token: out 0, lse
    -inf). Triton only: ``splits`` parts of the tokens per KV head (default from ``S``), ``block``
    tokens per tile (16 or more, a power of two)."""
    if choose_backend(query.device, backend) == "torch":
        return quant_torch.packed_decode(query, keys, values, valid, scaling, softcap)
    return _triton_packed_decode(query, keys, values, valid, scaling, softcap, splits, block)


def quantize_packed(x: torch.Tensor, bits: int, group: int, axis: str, symmetric: bool = False,
                    backend: str | None = None) -> Packed:
    """Quantize ``x [B, Hkv, S, D]`` (``"channel"`` axis: ``S`` a multiple of ``group``): what
    :func:`kvx.kernels.quant.quantize` returns."""
    if choose_backend(x.device, backend) == "torch":
        return quant.quantize(x, bits, group, axis, symmetric)
    return _triton_quantize(x, bits, group, axis, symmetric)


# ---------------------------------------------------------------- decode


def _triton_packed_decode(query, keys, values, valid, scaling, softcap, splits, block):
    import triton

    from kvx.kernels.triton.quant_decode import packed_decode_kernel

    batch, heads, q_len, dim = query.shape
    kv_heads, length = keys.codes.shape[1], keys.tokens
    if q_len != 1:
        raise ValueError(f"the packed decode kernel takes one query per head, got {q_len}")
    if values.tokens != length or keys.dim != dim:
        raise ValueError(f"keys of {keys.dim} channels and {length} tokens, values of {values.tokens} tokens, "
                         f"do not fit a query of head dim {dim}")
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not share {kv_heads} KV heads evenly")
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two of 16 or more, got {block}")
    rows, groups, value_dim = batch * kv_heads, heads // kv_heads, values.dim
    if splits is None:
        splits = max(1, min(16, triton.cdiv(length, 512)))
    per_split = triton.cdiv(triton.cdiv(max(length, 1), splits), block) * block
    q = query.reshape(rows, groups, dim).contiguous()  # the heads of a row are consecutive
    acc = torch.empty(rows, splits, groups, value_dim, device=query.device, dtype=torch.float32)
    running_max = torch.empty(rows, splits, groups, device=query.device, dtype=torch.float32)
    running_sum = torch.empty_like(running_max)
    k_args, k_meta = _packed_args(keys, "K")
    v_args, v_meta = _packed_args(values, "V")
    valid_arg = q if valid is None else valid.contiguous().view(torch.uint8)
    packed_decode_kernel[(rows, splits)](
        q, *k_args, *v_args, valid_arg, acc, running_max, running_sum,
        length, per_split, keys.scale.shape[2], values.scale.shape[2], float(scaling), float(softcap or 1.0),
        G=groups, D=dim, DV=value_dim, **k_meta, **v_meta, HAS_VALID=valid is not None,
        USE_SOFTCAP=softcap is not None, BLOCK_G=max(16, triton.next_power_of_2(groups)),
        BLOCK_D=max(16, triton.next_power_of_2(dim)), BLOCK_DV=max(16, triton.next_power_of_2(value_dim)),
        BLOCK_N=block, SPLITS=splits, enable_fp_fusion=False,  # code * scale + zero rounded twice, as the reference
    )
    out, lse = combine_splits(acc, running_max, running_sum)
    return out.reshape(batch, heads, 1, value_dim), lse.reshape(batch, heads, 1)


def _packed_args(p: Packed, prefix: str) -> tuple[list[torch.Tensor], dict[str, object]]:
    """A packed tensor's kernel arguments (codes, scale, zero, group index; an unused one stands in
    for a missing one) and its ``<prefix>_*`` layout constants."""
    codes, scale = p.codes.contiguous(), p.scale.contiguous()
    zero = scale if p.zero is None else p.zero.contiguous()
    index = codes if p.group_index is None or p.axis == "token" else p.group_index.contiguous()
    meta = {"BITS": p.bits, "GROUP": p.group, "CHANNEL": p.axis == "channel", "HAS_ZERO": p.zero is not None,
            "HAS_INDEX": p.axis == "channel" and p.group_index is not None}
    return [codes, scale, zero, index], {f"{prefix}_{name}": value for name, value in meta.items()}


# ---------------------------------------------------------------- quantize


def _triton_quantize(x, bits, group, axis, symmetric):
    import triton

    from kvx.kernels.triton.quant_pack import group_scale_kernel, pack_codes_kernel

    batch, heads, length, dim = x.shape
    quant.check_layout(bits, group, dim, axis)
    if axis == "channel" and length % group:
        raise ValueError(f"per-channel groups take a multiple of {group} tokens, got {length}")
    x = x.contiguous()
    if axis == "token":  # a = token, b = channel group, i along the channels
        scale_shape, strides = (batch, heads, length, dim // group), (dim, group, 1)
    else:  # a = token group, b = channel, i along the tokens
        scale_shape, strides = (batch, heads, length // group, dim), (group * dim, 1, dim)
    scale = torch.empty(scale_shape, device=x.device, dtype=quant.SCALE_DTYPE)
    zero = None if symmetric else torch.empty_like(scale)
    codes = torch.empty(batch, heads, length, dim * bits // 8, device=x.device, dtype=torch.uint8)
    if not x.numel():
        return Packed(codes, scale, zero, bits, group, axis)
    zero_arg = scale if zero is None else zero  # stands in when symmetric (unused)
    group_scale_kernel[(triton.cdiv(scale.numel(), SCALE_BLOCK),)](
        x, scale, zero_arg, scale.numel(), N_B=scale_shape[-1], STRIDE_A=strides[0], STRIDE_B=strides[1],
        STRIDE_I=strides[2], GROUP=group, BITS=bits, SYMMETRIC=symmetric, BLOCK_R=SCALE_BLOCK,
        BLOCK_I=triton.next_power_of_2(group),
    )
    tokens = batch * heads * length
    pack_codes_kernel[(triton.cdiv(tokens, PACK_BLOCK),)](
        x, scale, zero_arg, codes, tokens, D=dim, BITS=bits, GROUP=group, CHANNEL=axis == "channel",
        SYMMETRIC=symmetric, BLOCK_T=PACK_BLOCK, BLOCK_B=triton.next_power_of_2(dim * bits // 8),
        enable_fp_fusion=False,
    )
    return Packed(codes, scale, zero, bits, group, axis)


SCALE_BLOCK = 16  # groups per program of the scale pass
PACK_BLOCK = 16  # tokens per program of the packing pass


__all__ = ["packed_decode_attention", "quantize_packed"]
