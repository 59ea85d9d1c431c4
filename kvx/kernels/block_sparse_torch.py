"""Block-sparse attention in torch, computing only the selected blocks (the CPU path).

What :func:`kvx.kernels.reference.block_sparse_attention` computes (that is the reference, a dense
call with the equivalent mask), but only over the selected blocks. For a chunk of query blocks,
every row and head at once (``N`` (row, head, query block) triples):

1. the *diagonal* part: each query block against its own key block (where the causal mask cuts
   through), ``[N, n] x [N, n]`` under a causal + padding mask;
2. the *off-diagonal* part: the other selected key and value blocks of each (row, head, query
   block) gathered into ``[N, K * n, D]`` (one row gather over a block view of the keys: GQA heads
   read their KV head's blocks, K/V are never expanded), attended with a per-key padding bias;
3. the two merged by log-sum-exp.

A chunk whose rows all compute the same number of blocks, every one selected and holding no padding
(the usual case: a density gives every head the same count per query block), does all three in one
call instead: its own block gathered last, after the others, under one mask that is causal in the
last block (no separate ``n x n`` call, no merge).

Each call runs through PyTorch's fused CPU flash-attention kernel where it is available (logits
never leave the cache; per computed element about 1.1x a dense SDPA call, which takes longer query
runs), else, and with a logit soft-cap, through batched matmuls and a softmax. Rows are taken in
chunks in the order of their block counts, each chunk as wide as its own longest list, and no longer
than 5/4 of its shortest (plus one), cut where the counts change when enough rows share one, so
lists of different lengths (few blocks early in a causal index, more later; heads that need more)
are not all padded to the widest.

Shapes: ``B`` batch, ``H`` query heads, ``Hkv`` KV heads, ``n`` block size, ``Qb`` / ``Nb`` query
/ key blocks, ``K`` blocks per query block.
"""

from __future__ import annotations

import bisect

import torch
import torch.nn.functional as F

from kvx.kernels.reference import block_grid, fused_attention_with_lse, merge_with_lse, softcapped

CHUNK_ELEMENTS = 2**19  # logits per chunk (2 MB of float32: they stay in the cache)


def block_sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    block_index: torch.Tensor,
    key_valid: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
    block_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, H, q, Dv], lse [B, H, q])`` float32; arguments as
    :func:`kvx.kernels.reference.block_sparse_attention` (the entries of a block list unique)."""
    batch, heads, q_len, dim = query.shape
    kv_heads, kv_len, value_dim = key.shape[1], key.shape[2], value.shape[-1]
    n = block_size
    num_qb, num_kb, pad = block_grid(q_len, kv_len, n)
    dtype = query.dtype if query.dtype == torch.bfloat16 and softcap is None else torch.float32
    keys, values = _blocks(key, pad, n, dtype), _blocks(value, pad, n, dtype)  # [B * Hkv * Nb + 1, n * D]
    bias = _key_bias(key_valid, batch, kv_heads, kv_len, pad, n, key.device)  # [B * Hkv * Nb + 1, n]
    block_seen = (bias == 0).cumsum(dim=-1) > 0  # [B * Hkv * Nb + 1, n]: a real key at or before each slot
    spare = keys.shape[0] - 1
    # one row per (batch row, head, query block): R = B * H * Qb, in that order
    queries = query.to(dtype)
    if num_qb * n > q_len:  # F.pad copies even when it pads nothing
        queries = F.pad(queries, (0, 0, num_qb * n - q_len, 0))
    queries = queries.reshape(-1, n, dim)  # [R, n, D]
    own, others = _split_index(block_index, kv_heads, num_kb, spare)  # [R], [R, K]
    counts = (others != spare).sum(-1)  # [R]
    # rows sorted by how many blocks they compute, so a chunk pads its lists to little more than its own
    order = counts.argsort()
    sorted_counts = counts[order].tolist()
    padded_keys = key_valid is not None or pad > 0
    causal = torch.ones(n, n, dtype=torch.bool, device=query.device).tril_()
    out = query.new_empty(queries.shape[0], n, value_dim, dtype=torch.float32)
    lse = query.new_empty(queries.shape[0], n, dtype=torch.float32)
    causal_last = _causal_last(sorted_counts[-1], n, dtype, query.device)  # [1, n, (K + 1) * n]
    start = 0
    while start < len(sorted_counts):
        stop = _chunk_stop(sorted_counts, start, n)
        rows = order[start:stop]
        q = queries[rows]  # [N, n, D]
        own_rows = own[rows]
        width = sorted_counts[stop - 1]
        picked = torch.cat([others[rows, :width], own_rows[:, None]], dim=1)  # [N, K + 1]: the own block last
        if bool((F.embedding(picked, bias) == 0).all()):
            # every block selected and real (no "no block" filler, no padding): one call, causal in the last block
            out[rows], lse[rows] = _attend(q, F.embedding(picked.reshape(-1), keys).view(-1, (width + 1) * n, dim),
                                           F.embedding(picked.reshape(-1), values).view(-1, (width + 1) * n, value_dim),
                                           causal_last[..., -(width + 1) * n:], None, scaling, softcap)
            start = stop
            continue
        own_bias = F.embedding(own_rows, bias)  # [N, n]
        # the own block, square and causal: is_causal alone unless it holds padding (or is not selected)
        own_bias = None if bool((own_bias == 0).all()) else torch.where(causal, own_bias[:, None, :], -torch.inf)
        parts = [_attend(q, F.embedding(own_rows, keys).view(-1, n, dim),
                         F.embedding(own_rows, values).view(-1, n, value_dim), own_bias,
                         block_seen[own_rows], scaling, softcap, causal=own_bias is None)]
        if width:
            picked = others[rows, :width]  # [N, K]
            key_bias = F.embedding(picked.reshape(-1), bias).view(-1, 1, width * n)
            sees = block_seen[picked, -1].any(dim=-1, keepdim=True)  # [N, 1]
            if not padded_keys and bool((picked != spare).all()):
                key_bias = None  # every gathered key is real and selected: no mask at all
            parts.append(_attend(q, F.embedding(picked.reshape(-1), keys).view(-1, width * n, dim),
                                 F.embedding(picked.reshape(-1), values).view(-1, width * n, value_dim),
                                 key_bias, sees, scaling, softcap))
        out[rows], lse[rows] = merge_with_lse(parts) if len(parts) > 1 else parts[0]
        start = stop
    out = out.view(batch, heads, num_qb * n, value_dim)[:, :, num_qb * n - q_len:]
    return out, lse.view(batch, heads, num_qb * n)[:, :, num_qb * n - q_len:]


def _chunk_stop(sorted_counts: list[int], start: int, n: int) -> int:
    """End of the chunk of rows starting at ``start`` (rows sorted by their list lengths): rows whose
    lists are at most a quarter longer than the first's, as many as fit ``CHUNK_ELEMENTS`` logits; cut
    where the lengths change when enough rows share the first's length (a chunk of equal lengths
    and no filler runs as one call)."""
    first = sorted_counts[start]
    fit = _rows_that_fit(first, n)
    same = bisect.bisect_right(sorted_counts, first, lo=start)
    if same - start >= min(fit, 8):
        return min(same, start + fit)
    stop = bisect.bisect_right(sorted_counts, first * 5 // 4 + 1, lo=start)
    return min(stop, start + _rows_that_fit(sorted_counts[stop - 1], n))


def _rows_that_fit(width: int, n: int) -> int:
    """Query-block rows whose logits fit ``CHUNK_ELEMENTS``: each has ``n`` queries over ``width``
    listed blocks and its own, of ``n`` keys each (at least one row)."""
    return max(1, CHUNK_ELEMENTS // (n * n * (width + 1)))


def _causal_last(width: int, n: int, dtype: torch.dtype, device) -> torch.Tensor:
    """``[1, n, (width + 1) * n]`` additive mask (0 / -inf) of a query block over ``width`` blocks
    it sees whole, then its own block, causal. Its last ``(w + 1) * n`` columns are the mask for
    ``w <= width`` blocks (a view: one mask serves every list length of a call)."""
    mask = torch.zeros(1, n, (width + 1) * n, dtype=dtype, device=device)
    mask[..., width * n:].masked_fill_(torch.ones(n, n, dtype=torch.bool, device=device).triu_(1), -torch.inf)
    return mask


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
            sees: torch.Tensor | None, scaling: float, softcap: float | None,
            causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q [N, n, D]`` over ``k [N, L, D]`` / ``v [N, L, Dv]`` with an additive ``bias
    [N|1, 1|n, L]`` (0 / -inf) or None, and with ``causal`` (``L = n``) a causal mask: ``(out [N, n,
    Dv], lse [N, n])`` float32. ``sees [N, 1|n]``: whether a query sees any key (None: every one
    does); one that does not gets out 0, lse -inf."""
    fused = None
    if softcap is None:
        mask = None if bias is None else bias.to(q.dtype)[:, None]
        fused = fused_attention_with_lse(q[:, None], k[:, None], v[:, None], mask, causal, scaling)
    if fused is not None:
        out, lse = fused[0][:, 0], fused[1][:, 0]
    else:
        logits = torch.bmm(q, k.transpose(1, 2)).mul_(scaling)  # [N, n, L]
        logits = softcapped(logits, softcap)
        if causal:
            bias = torch.full(logits.shape[-2:], -torch.inf, device=q.device).triu_(1)
        if bias is not None:
            logits = logits.add_(bias)
        # the log-sum-exp from the largest probability, 1 / sum(exp(x - max)): an amax costs a tenth
        # of a logsumexp on the CPU
        top = logits.amax(dim=-1)
        probs = torch.softmax(logits, dim=-1)
        lse = top - probs.amax(dim=-1).log_()
        out = torch.bmm(probs, v.float())
    if bias is None or sees is None or bool(sees.all()):
        return out, lse
    sees = sees.expand(lse.shape)
    return out.masked_fill_(~sees[..., None], 0.0), lse.masked_fill(~sees, -torch.inf)


def _blocks(x: torch.Tensor, pad: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    """``[B, Hkv, S, D]`` -> blocks of the grid, one per row ``[B * Hkv * Nb + 1, n * D]`` (``pad``
    zero slots in front; the last block, all zeros, stands for "no block")."""
    blocks = F.pad(x.to(dtype), (0, 0, pad, 0)).reshape(-1, n * x.shape[-1])  # [B * Hkv * Nb, n * D]
    return torch.cat([blocks, blocks.new_zeros(1, blocks.shape[1])])


def _key_bias(key_valid, batch: int, kv_heads: int, kv_len: int, pad: int, n: int, device) -> torch.Tensor:
    """``[B * Hkv * Nb + 1, n]`` float32: 0 on real keys, -inf on padding, on the slots in front of
    the grid and on the whole "no block" block."""
    valid = torch.ones(batch, kv_heads, kv_len, dtype=torch.bool, device=device) if key_valid is None else key_valid
    invalid = F.pad(~F.pad(valid, (pad, 0), value=False).reshape(-1, n), (0, 0, 0, 1), value=True)
    return torch.zeros(invalid.shape, device=device).masked_fill_(invalid, -torch.inf)


def _split_index(block_index: torch.Tensor, kv_heads: int, num_kb: int, spare: int):
    """Block lists ``[B, H, Qb, K]`` -> rows into the block view, one row per (batch row, head,
    query block): ``(own [R]`` the query block's own key block, or ``spare`` when not selected;
    ``others [R, K]`` the other selected blocks first, then ``spare``)``. Blocks after the query
    block's own, which no query of it may see, are dropped."""
    batch, heads, num_qb = block_index.shape[:3]
    device = block_index.device
    own_block = (num_kb - num_qb + torch.arange(num_qb, device=device))[:, None]  # [Qb, 1]
    kv_row = torch.arange(batch, device=device)[:, None] * kv_heads + torch.arange(heads, device=device) // (
        heads // kv_heads)  # [B, H]
    index = block_index.long()
    rows = torch.where((index >= 0) & (index < own_block), kv_row[..., None, None] * num_kb + index, spare)
    own = torch.where((index == own_block).any(-1), kv_row[..., None] * num_kb + own_block[:, 0], spare)
    return own.reshape(-1), rows.sort(dim=-1).values.reshape(-1, index.shape[-1])
