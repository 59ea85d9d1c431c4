"""Split-KV decode attention over packed low-bit keys and values (flash-decoding style).

One program per (row ``b * Hkv + h``, split): the ``G`` query heads of KV head ``h`` are processed
together (rows of one ``tl.dot``), so keys and values are never expanded. Each program walks its
share of the ``S`` tokens in ``BLOCK_N`` tiles, dequantizing each tile in registers (the layout of
:class:`kvx.kernels.quant.Packed`: ``BITS``-bit codes packed along the head dim, lowest bits first;
float16 scale and zero point per group of channels of one token, ``"token"`` axis, or per group of
tokens of one channel, ``"channel"`` axis), with an online softmax, and writes a partial result
(unnormalised accumulator, running max, running sum); the launcher combines the splits.

Dequantized keys and values are rounded to the query's dtype, as the torch reference does, then
computed on in float32. Offsets are int64 (row bases), so caches past 2^31 elements are fine.
"""

import triton
import triton.language as tl


@triton.jit
def dequantize_tile(
    CODES,  # [R, S, DIM * BITS / 8] uint8
    SCALE,  # [R, S, DIM / GROUP] ("token") or [R, S_groups, DIM] ("channel") float16
    ZERO,  # like SCALE, or unused when not HAS_ZERO
    INDEX,  # [R, S] int16/int32 group of each token ("channel" with HAS_INDEX), else unused
    row,  # int64 row b * Hkv + h
    tokens,  # [BLOCK_N] int64 token positions
    token_ok,  # [BLOCK_N] bool
    cols,  # [BLOCK_D] channel positions
    col_ok,  # [BLOCK_D] bool
    length,  # S
    scale_groups,  # SCALE.shape[2]: S ("token") or the number of token groups ("channel")
    DIM: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    CHANNEL: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    HAS_INDEX: tl.constexpr,
):
    """``[BLOCK_N, BLOCK_D]`` float32 values of the given tokens and channels (0 where masked)."""
    PER_BYTE: tl.constexpr = 8 // BITS
    ok = token_ok[:, None] & col_ok[None, :]
    row_bytes = DIM * BITS // 8
    packed = tl.load(CODES + row * length * row_bytes + tokens[:, None] * row_bytes + (cols // PER_BYTE)[None, :],
                     mask=ok, other=0)
    codes = (packed.to(tl.int32) >> ((cols % PER_BYTE) * BITS)[None, :]) & ((1 << BITS) - 1)
    if CHANNEL:
        scale_cols = DIM
        if HAS_INDEX:
            groups = tl.load(INDEX + row * length + tokens, mask=token_ok, other=0).to(tl.int64)
        else:
            groups = tokens // GROUP
        where = groups[:, None] * scale_cols + cols[None, :]
    else:
        scale_cols = DIM // GROUP
        where = tokens[:, None] * scale_cols + (cols // GROUP)[None, :]
    where += row * scale_groups * scale_cols
    scale = tl.load(SCALE + where, mask=ok, other=0.0).to(tl.float32)
    if HAS_ZERO:
        zero = tl.load(ZERO + where, mask=ok, other=0.0).to(tl.float32)
        return codes.to(tl.float32) * scale + zero
    return (codes - (1 << (BITS - 1))).to(tl.float32) * scale


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """float32 ``x`` rounded to ``DTYPE`` (half to even) and back. bfloat16 by its bits: the CPU
    interpreter truncates a float32 -> bfloat16 cast."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE).to(tl.float32)


@triton.jit
def packed_decode_kernel(
    Q,  # [R, G, D] float, the G query heads of each row
    K_CODES, K_SCALE, K_ZERO, K_INDEX,  # packed keys (see dequantize_tile), D channels
    V_CODES, V_SCALE, V_ZERO, V_INDEX,  # packed values, DV channels
    VALID,  # [R, S] uint8 (1 = a token), unused when not HAS_VALID
    ACC,  # [R, SPLITS, G, DV] float32 out: unnormalised partial outputs
    MAX,  # [R, SPLITS, G] float32 out: running max of the logits
    SUM,  # [R, SPLITS, G] float32 out: running sum of exp(logit - max)
    length,  # S
    per_split,  # tokens per split, a multiple of BLOCK_N
    k_scale_groups,  # K_SCALE.shape[2]
    v_scale_groups,  # V_SCALE.shape[2]
    scaling,
    softcap,
    G: tl.constexpr,
    D: tl.constexpr,
    DV: tl.constexpr,
    K_BITS: tl.constexpr, K_GROUP: tl.constexpr, K_CHANNEL: tl.constexpr, K_HAS_ZERO: tl.constexpr,
    K_HAS_INDEX: tl.constexpr,
    V_BITS: tl.constexpr, V_GROUP: tl.constexpr, V_CHANNEL: tl.constexpr, V_HAS_ZERO: tl.constexpr,
    V_HAS_INDEX: tl.constexpr,
    HAS_VALID: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLITS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    lo = split * per_split
    hi = tl.minimum(lo + per_split, length)

    heads = tl.arange(0, BLOCK_G)
    head_ok = heads < G
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    v_cols = tl.arange(0, BLOCK_DV)
    v_col_ok = v_cols < DV
    q = tl.load(Q + row * G * D + heads[:, None] * D + cols[None, :], mask=head_ok[:, None] & col_ok[None, :],
                other=0.0)
    q = q.to(tl.float32)

    running_max = tl.full([BLOCK_G], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
    for tile in range(lo, hi, BLOCK_N):
        tokens = tile + tl.arange(0, BLOCK_N).to(tl.int64)
        token_ok = tokens < hi
        k = dequantize_tile(K_CODES, K_SCALE, K_ZERO, K_INDEX, row, tokens, token_ok, cols, col_ok, length,
                            k_scale_groups, D, K_BITS, K_GROUP, K_CHANNEL, K_HAS_ZERO, K_HAS_INDEX)
        k = round_to(k, Q.dtype.element_ty)  # the reference dequantizes to the query's dtype
        logits = tl.dot(q, tl.trans(k), input_precision="ieee") * scaling  # [BLOCK_G, BLOCK_N], as the reference
        if USE_SOFTCAP:  # tanh(x) = 2 * sigmoid(2x) - 1
            logits = softcap * (2.0 * tl.sigmoid(2.0 * logits / softcap) - 1.0)
        visible = token_ok
        if HAS_VALID:
            visible &= tl.load(VALID + row * length + tokens, mask=token_ok, other=0) != 0
        logits = tl.where(visible[None, :], logits, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        finite_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # nothing visible yet: no NaN
        rescale = tl.exp(running_max - finite_max)
        probs = tl.exp(logits - finite_max[:, None])
        v = dequantize_tile(V_CODES, V_SCALE, V_ZERO, V_INDEX, row, tokens, token_ok, v_cols, v_col_ok, length,
                            v_scale_groups, DV, V_BITS, V_GROUP, V_CHANNEL, V_HAS_ZERO, V_HAS_INDEX)
        v = round_to(v, Q.dtype.element_ty)
        running_sum = running_sum * rescale + tl.sum(probs, axis=1)
        acc = acc * rescale[:, None] + tl.dot(probs, v, input_precision="ieee")
        running_max = new_max

    part = row * SPLITS + split
    tl.store(ACC + part * G * DV + heads[:, None] * DV + v_cols[None, :], acc,
             mask=head_ok[:, None] & v_col_ok[None, :])
    tl.store(MAX + part * G + heads, running_max, mask=head_ok)
    tl.store(SUM + part * G + heads, running_sum, mask=head_ok)
