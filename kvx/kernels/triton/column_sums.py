"""Attention each key receives, summed over causal queries, without a T x T matrix.

Two passes over tiles: ``row_lse_kernel`` computes every query's log-sum-exp (an online softmax
over key tiles, as in flash attention, without values); ``column_sums_kernel`` then walks, for a
tile of keys, the query tiles that can see it and adds ``exp(logit - lse)`` down the columns.
Queries are the last ``Q_LEN`` of the ``S`` positions; a padding query (its own key invalid)
contributes nothing. Loads are converted to float32 at once.
"""

import triton
import triton.language as tl


@triton.jit
def _logits(q, k, scaling, softcap, USE_SOFTCAP: tl.constexpr):
    logits = tl.dot(q, tl.trans(k), input_precision="ieee") * scaling
    if USE_SOFTCAP:
        logits = softcap * (2.0 * tl.sigmoid(2.0 * logits / softcap) - 1.0)  # tanh via sigmoid
    return logits


@triton.jit
def _load_rows(PTR, base, rows, num_rows, dims, D: tl.constexpr):
    """Rows ``rows`` of the ``[num_rows, D]`` matrix at ``PTR + base`` as a float32 tile
    ``[len(rows), len(dims)]``, zeros past the matrix."""
    inside = (rows[:, None] < num_rows) & (dims[None, :] < D)
    return tl.load(PTR + base + rows[:, None] * D + dims[None, :], mask=inside, other=0.0).to(tl.float32)


@triton.jit
def row_lse_kernel(
    Q, K, VALID, LSE,  # Q [BH, Q_LEN, D], K [BHkv, S, D], VALID [BHkv, S] int8, LSE [BH, Q_LEN] f32
    scaling, softcap, Q_LEN, S,
    GROUPS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_SOFTCAP: tl.constexpr,
):
    head = tl.program_id(0).to(tl.int64)  # int64 offsets: heads x length x dim can pass 2^31
    kv_head = head // GROUPS
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < Q_LEN
    q = _load_rows(Q, head * Q_LEN * D, rows, Q_LEN, dims, D)
    query_pos = S - Q_LEN + rows
    running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_M], tl.float32)
    last = tl.minimum(S, S - Q_LEN + (tl.program_id(1) + 1) * BLOCK_M)  # causal: no key past the last row
    for start in range(0, last, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < S
        k = _load_rows(K, kv_head * S * D, cols, S, dims, D)
        key_valid = tl.load(VALID + kv_head * S + cols, mask=col_ok, other=0) != 0
        logits = _logits(q, k, scaling, softcap, USE_SOFTCAP)
        visible = (cols[None, :] <= query_pos[:, None]) & key_valid[None, :] & col_ok[None, :]
        logits = tl.where(visible, logits, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - safe_max) + tl.sum(tl.exp(logits - safe_max[:, None]), axis=1)
        running_max = new_max
    lse = tl.where(running_sum > 0, running_max + tl.log(tl.maximum(running_sum, 1e-30)), float("-inf"))
    tl.store(LSE + head * Q_LEN + rows, lse, mask=row_ok)


@triton.jit
def column_sums_kernel(
    Q, K, VALID, LSE, SUMS,  # SUMS [BH, S] f32
    scaling, softcap, Q_LEN, S,
    GROUPS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_SOFTCAP: tl.constexpr,
):
    head = tl.program_id(0).to(tl.int64)  # int64 offsets: heads x length x dim can pass 2^31
    kv_head = head // GROUPS
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    col_ok = cols < S
    k = _load_rows(K, kv_head * S * D, cols, S, dims, D)
    key_valid = tl.load(VALID + kv_head * S + cols, mask=col_ok, other=0) != 0
    sums = tl.zeros([BLOCK_N], tl.float32)
    first_row = tl.maximum(tl.program_id(1) * BLOCK_N - (S - Q_LEN), 0)  # queries before it cannot see these keys
    for start in range((first_row // BLOCK_M) * BLOCK_M, Q_LEN, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < Q_LEN
        q = _load_rows(Q, head * Q_LEN * D, rows, Q_LEN, dims, D)
        lse = tl.load(LSE + head * Q_LEN + rows, mask=row_ok, other=float("-inf"))
        query_pos = S - Q_LEN + rows
        own_valid = tl.load(VALID + kv_head * S + query_pos, mask=row_ok, other=0) != 0
        logits = _logits(q, k, scaling, softcap, USE_SOFTCAP)
        visible = (cols[None, :] <= query_pos[:, None]) & key_valid[None, :] & col_ok[None, :]
        visible = visible & own_valid[:, None] & row_ok[:, None] & (lse[:, None] > float("-inf"))
        safe_lse = tl.where(lse == float("-inf"), 0.0, lse)
        probs = tl.where(visible, tl.exp(logits - safe_lse[:, None]), 0.0)
        sums += tl.sum(probs, axis=0)
    tl.store(SUMS + head * S + cols, sums, mask=col_ok)
