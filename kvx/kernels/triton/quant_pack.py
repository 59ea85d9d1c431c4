"""Quantize and pack ``x [B, Hkv, S, D]`` into :class:`kvx.kernels.quant.Packed`'s layout, in two
passes over the flattened tensor (so both group axes share the code):

1. :func:`group_scale_kernel`: per group, float16 ``scale`` (and ``zero``), computed in float32
   and rounded to float16 exactly as :func:`kvx.kernels.quant.quantize` does. A group is
   ``GROUP`` elements ``x[a * STRIDE_A + b * STRIDE_B + i * STRIDE_I]``, ``i < GROUP``, its result
   stored at ``a * N_B + b``: ``"token"`` axis: ``a`` a token, ``b`` a channel group;
   ``"channel"`` axis: ``a`` a token group, ``b`` a channel.
2. :func:`pack_codes_kernel`: every element's code from its group's float16 scale and zero
   (rounded half to even, like ``torch.round``), ``8 / BITS`` codes per byte, lowest bits first.

Offsets are int64.
"""

import triton
import triton.language as tl


@triton.jit
def group_scale_kernel(
    X,  # [B * Hkv * S * D] float
    SCALE,  # [n_groups] float16 out
    ZERO,  # [n_groups] float16 out, unused when SYMMETRIC
    n_groups,
    N_B: tl.constexpr,
    STRIDE_A: tl.constexpr,
    STRIDE_B: tl.constexpr,
    STRIDE_I: tl.constexpr,
    GROUP: tl.constexpr,
    BITS: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    groups = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    group_ok = groups < n_groups
    inside = tl.arange(0, BLOCK_I)
    ok = group_ok[:, None] & (inside < GROUP)[None, :]
    start = (groups // N_B) * STRIDE_A + (groups % N_B) * STRIDE_B
    x = tl.load(X + start[:, None] + inside[None, :] * STRIDE_I, mask=ok, other=0.0).to(tl.float32)
    tiny = 6.103515625e-05  # torch.finfo(torch.float16).tiny
    if SYMMETRIC:
        absmax = tl.max(tl.where(ok, tl.abs(x), 0.0), axis=1)
        scale = tl.math.div_rn(absmax, float((1 << (BITS - 1)) - 1)).to(tl.float16)
    else:
        low = tl.min(tl.where(ok, x, float("inf")), axis=1)
        high = tl.max(tl.where(ok, x, float("-inf")), axis=1)
        zero = low.to(tl.float16)
        scale = tl.math.div_rn(high - zero.to(tl.float32), float((1 << BITS) - 1)).to(tl.float16)
        tl.store(ZERO + groups, zero, mask=group_ok)
    scale = tl.where(scale < tiny, tiny, scale)  # clamp_min (NaN stays NaN, as in torch)
    tl.store(SCALE + groups, scale.to(tl.float16), mask=group_ok)


@triton.jit
def round_half_even(y):
    """``torch.round`` of float32 ``y`` (ties to even)."""
    r = tl.floor(y + 0.5)
    tie = (r - y) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def pack_codes_kernel(
    X,  # [T, D] float: T = B * Hkv * S tokens
    SCALE,  # [T, D / GROUP] ("token") or [T / GROUP, D] ("channel") float16
    ZERO,  # like SCALE, unused when SYMMETRIC
    CODES,  # [T, D * BITS / 8] uint8 out
    tokens_total,
    D: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    CHANNEL: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    PER_BYTE: tl.constexpr = 8 // BITS
    ROW_BYTES: tl.constexpr = D * BITS // 8
    LEVELS: tl.constexpr = (1 << BITS) - 1
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    byte_cols = tl.arange(0, BLOCK_B)
    ok = (tokens < tokens_total)[:, None] & (byte_cols < ROW_BYTES)[None, :]
    packed = tl.zeros([BLOCK_T, BLOCK_B], tl.int32)
    for lane in tl.static_range(PER_BYTE):
        cols = byte_cols * PER_BYTE + lane
        x = tl.load(X + tokens[:, None] * D + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        if CHANNEL:
            where = (tokens // GROUP)[:, None] * D + cols[None, :]
        else:
            where = tokens[:, None] * (D // GROUP) + (cols // GROUP)[None, :]
        scale = tl.load(SCALE + where, mask=ok, other=1.0).to(tl.float32)
        if SYMMETRIC:
            codes = round_half_even(tl.math.div_rn(x, scale)) + (1 << (BITS - 1))
        else:
            zero = tl.load(ZERO + where, mask=ok, other=0.0).to(tl.float32)
            codes = round_half_even(tl.math.div_rn(x - zero, scale))
        codes = tl.where(codes != codes, 0.0, codes)  # NaN -> 0, as nan_to_num
        codes = tl.minimum(tl.maximum(codes, 0.0), float(LEVELS)).to(tl.int32)
        packed |= codes << (lane * BITS)
    tl.store(CODES + tokens[:, None] * ROW_BYTES + byte_cols[None, :], packed.to(tl.uint8), mask=ok)
