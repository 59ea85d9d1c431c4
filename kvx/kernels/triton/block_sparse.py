"""Block-sparse causal flash attention (MInference's kernel, with kvx's block grid).

One program per (row x query head, query block): it loads its ``BLOCK`` queries once, then walks
the key blocks its list names (``INDEX [B * H, Qb, WIDTH]``, ``-1`` = none) with an online softmax,
masking causally (the list may name the query block's own key block) and padding slots
(``VALID``). GQA native: a query head reads the blocks of its KV head, nothing is expanded.

The grid is aligned to the end of the keys (see :mod:`kvx.kernels.reference`): key block ``kb``
covers key slots ``kb * BLOCK - PAD ...``, query block ``j`` is key block ``NUM_KB - NUM_QB + j``.
Loads are converted to float32 at once (right on GPUs, and needed in the CPU interpreter).
"""

import triton
import triton.language as tl


@triton.jit
def block_sparse_attention_kernel(
    Q,  # [B * H, Q_LEN, D]
    K,  # [B * Hkv, S, D]
    V,  # [B * Hkv, S, DV]
    INDEX,  # [B * H, NUM_QB, WIDTH] int32 key blocks, -1 = none
    VALID,  # [B * Hkv, S] int8 (unused without HAS_VALID)
    OUT,  # [B * H, Q_LEN, DV] float32
    LSE,  # [B * H, Q_LEN] float32
    scaling, softcap, Q_LEN, S, PAD, NUM_QB, NUM_KB, WIDTH,
    H: tl.constexpr, GROUPS: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK: tl.constexpr,
    HAS_VALID: tl.constexpr, USE_SOFTCAP: tl.constexpr,
):
    head = tl.program_id(0).to(tl.int64)  # int64 offsets: heads x length x dim can pass 2^31
    query_block = tl.program_id(1)
    kv_head = (head // H) * (H // GROUPS) + (head % H) // GROUPS
    own = NUM_KB - NUM_QB + query_block  # the grid block of these queries
    slots = tl.arange(0, BLOCK)
    query_slot = own * BLOCK + slots - PAD  # key slot of each query
    rows = query_slot - (S - Q_LEN)  # index among the queries
    row_ok = rows >= 0
    dims = tl.arange(0, BLOCK_D)
    value_dims = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + head * Q_LEN * D + rows[:, None] * D + dims[None, :],
                mask=row_ok[:, None] & (dims[None, :] < D), other=0.0).to(tl.float32)

    running_max = tl.full([BLOCK], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, BLOCK_DV], tl.float32)
    for t in range(0, WIDTH):
        key_block = tl.load(INDEX + (head * NUM_QB + query_block) * WIDTH + t)
        if (key_block >= 0) & (key_block <= own):  # none, or after every query of the block: skipped
            cols = key_block * BLOCK + slots - PAD
            col_ok = cols >= 0
            k = tl.load(K + kv_head * S * D + cols[:, None] * D + dims[None, :],
                        mask=col_ok[:, None] & (dims[None, :] < D), other=0.0).to(tl.float32)
            v = tl.load(V + kv_head * S * DV + cols[:, None] * DV + value_dims[None, :],
                        mask=col_ok[:, None] & (value_dims[None, :] < DV), other=0.0).to(tl.float32)
            logits = tl.dot(q, tl.trans(k), input_precision="ieee") * scaling
            if USE_SOFTCAP:
                logits = softcap * (2.0 * tl.sigmoid(2.0 * logits / softcap) - 1.0)  # tanh via sigmoid
            visible = col_ok[None, :] & (cols[None, :] <= query_slot[:, None])
            if HAS_VALID:
                key_valid = tl.load(VALID + kv_head * S + cols, mask=col_ok, other=0) != 0
                visible = visible & key_valid[None, :]
            logits = tl.where(visible, logits, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(logits, axis=1))
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            rescale = tl.exp(running_max - safe_max)
            probs = tl.exp(logits - safe_max[:, None])
            running_sum = running_sum * rescale + tl.sum(probs, axis=1)
            acc = acc * rescale[:, None] + tl.dot(probs, v, input_precision="ieee")
            running_max = new_max

    seen = running_sum > 0
    out = tl.where(seen[:, None], acc / tl.maximum(running_sum, 1e-30)[:, None], 0.0)
    lse = tl.where(seen, running_max + tl.log(tl.maximum(running_sum, 1e-30)), float("-inf"))
    tl.store(OUT + head * Q_LEN * DV + rows[:, None] * DV + value_dims[None, :], out,
             mask=row_ok[:, None] & (value_dims[None, :] < DV))
    tl.store(LSE + head * Q_LEN + rows, lse, mask=row_ok)
