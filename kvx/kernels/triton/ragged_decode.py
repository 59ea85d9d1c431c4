"""Split-KV decode attention over a ragged per-head KV cache (flash-decoding style).

One program per (segment, split): segment ``b * Hkv + h`` holds that KV head's own tokens,
packed; its ``G`` query heads are processed together (rows of one ``tl.dot``). Each program
walks its share of the segment in ``BLOCK_N`` tiles with an online softmax and writes a partial
result (unnormalised accumulator, running max, running sum); the launcher combines the splits.
Loads are converted to float32 at once (right on GPUs, and needed in the CPU interpreter).
"""

import triton
import triton.language as tl


@triton.jit
def ragged_decode_kernel(
    Q,  # [S_seg, G, D] float, one row block per segment
    K,  # [N, D] packed keys
    V,  # [N, D] packed values
    OFFSETS,  # [S_seg + 1] int64
    ACC,  # [S_seg, SPLITS, G, D] float32 out: unnormalised partial outputs
    MAX,  # [S_seg, SPLITS, G] float32 out: running max of the logits
    SUM,  # [S_seg, SPLITS, G] float32 out: running sum of exp(logit - max)
    scaling,
    softcap,
    G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLITS: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
):
    segment = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    start = tl.load(OFFSETS + segment)
    end = tl.load(OFFSETS + segment + 1)
    per_split = tl.cdiv(end - start, SPLITS)
    lo = start + split * per_split
    hi = tl.minimum(lo + per_split, end)

    rows = tl.arange(0, BLOCK_G)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < G
    col_ok = cols < D
    q = tl.load(Q + segment * G * D + rows[:, None] * D + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    q = q.to(tl.float32) * scaling

    running_max = tl.full([BLOCK_G], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for tile in range(lo, hi, BLOCK_N):
        keys_at = tile + tl.arange(0, BLOCK_N)
        key_ok = keys_at < hi
        k = tl.load(K + keys_at[:, None] * D + cols[None, :], mask=key_ok[:, None] & col_ok[None, :], other=0.0)
        v = tl.load(V + keys_at[:, None] * D + cols[None, :], mask=key_ok[:, None] & col_ok[None, :], other=0.0)
        logits = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")  # [BLOCK_G, BLOCK_N]
        if USE_SOFTCAP:
            # tanh(x) = 2 * sigmoid(2x) - 1
            logits = softcap * (2.0 * tl.sigmoid(2.0 * logits / softcap) - 1.0)
        logits = tl.where(key_ok[None, :], logits, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        rescale = tl.exp(running_max - new_max)
        probs = tl.exp(logits - new_max[:, None])
        running_sum = running_sum * rescale + tl.sum(probs, axis=1)
        acc = acc * rescale[:, None] + tl.dot(probs, v.to(tl.float32), input_precision="ieee")
        running_max = new_max

    part = segment * SPLITS + split
    tl.store(ACC + part * G * D + rows[:, None] * D + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])
    tl.store(MAX + part * G + rows, running_max, mask=row_ok)
    tl.store(SUM + part * G + rows, running_sum, mask=row_ok)
