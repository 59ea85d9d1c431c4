"""Pure-torch reference of every attention op kvx uses.

These are the ground truth that Triton kernels are tested against, and the CPU path. Shapes:
``B`` batch, ``H`` query heads, ``Hkv`` KV heads (``G = H // Hkv`` query heads per KV head),
``q`` queries, ``S`` keys, ``D`` head dim. Masks are bool, True = may attend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_mask(q_len: int, kv_len: int, device: torch.device, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """``[1, 1, q_len, kv_len]`` bool, bottom-right aligned: query i sits at key position
    ``kv_len - q_len + i`` and sees every key up to it. ``rows=(start, stop)``: only those queries'
    rows, ``[1, 1, stop - start, kv_len]``."""
    start, stop = rows if rows is not None else (0, q_len)
    query_pos = torch.arange(kv_len - q_len + start, kv_len - q_len + stop, device=device)[:, None]
    return (torch.arange(kv_len, device=device)[None, :] <= query_pos)[None, None]


def take_tokens(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``x [B, Hkv, S, D]`` at token ``indices [B, Hkv, K]`` -> ``[B, Hkv, K, D]``.

    The same as ``x.gather(2, indices[..., None].expand(..., D))``, as one row copy per token
    (``index_select`` over ``[B*Hkv*S, D]``) instead of one index per element: 6-8x faster on CPU
    for ``D = 64``, which matters for policies that re-gather a layer at every decode step."""
    batch, heads, length, dim = x.shape
    if indices.shape[:2] != (batch, heads):
        raise ValueError(f"take_tokens: indices {tuple(indices.shape)} do not match x {tuple(x.shape)} in [B, Hkv]")
    offsets = torch.arange(batch * heads, device=indices.device).view(batch, heads, 1) * length
    flat = (indices + offsets).reshape(-1)
    return x.reshape(-1, dim).index_select(0, flat).view(batch, heads, indices.shape[-1], dim)


def expand_kv_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B, Hkv, ...] -> [B, Hkv * groups, ...]``, each KV head repeated for its query heads."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense attention ``[B, H, q, Dv]`` of ``query [B, H, q, D]`` over ``key [B, Hkv, S, D]`` and
    ``value [B, Hkv, S, Dv]``.

    ``mask``: ``[B|1, 1|H, q, S]`` bool, or None for causal attention (bottom-right aligned when
    ``q < S``). ``softcap``: Gemma 2's logit soft-capping ``tanh(x / c) * c``. ``sinks``: ``[H]``
    learned attention-sink logits (gpt-oss' ``s_aux``), see :func:`sink_part`.
    """
    q_len, kv_len = query.shape[-2], key.shape[-2]
    groups = query.shape[1] // key.shape[1]
    if mask is None and 1 < q_len < kv_len:  # new queries after a stored prefix: no q x S mask
        return prefix_then_new_attention(query, key, value, None, None, scaling, softcap, sinks)
    if softcap is None and sinks is None:
        return F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=mask,
            is_causal=mask is None and q_len > 1,
            scale=scaling,
            enable_gqa=groups > 1,
        )
    if mask is None and q_len > 1:
        mask = causal_mask(q_len, kv_len, query.device)
    part = attention_with_lse(query, key, value, mask, scaling, softcap)
    if sinks is None:
        return part[0].to(query.dtype)
    return merge_attention([part, sink_part(sinks, part[0])]).to(query.dtype)


def sink_part(sinks: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Learned attention sinks (gpt-oss and others: one logit per query head that joins every
    softmax, with no value) as one more part for :func:`merge_attention`: ``(zeros like
    out [B, H, q, Dv], lse [B, H, q] = the sink's logit)``."""
    batch, heads, q_len = like.shape[:3]
    lse = sinks.float().reshape(1, heads, 1).expand(batch, heads, q_len)
    return torch.zeros_like(like, dtype=torch.float32), lse


def softcapped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Gemma 2's attention logit soft-capping ``tanh(x / c) * c`` (identity when ``c`` is None)."""
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


def grouped_logits(query: torch.Tensor, key: torch.Tensor, scaling: float, softcap: float | None = None) -> torch.Tensor:
    """Scaled (and soft-capped) float32 logits ``[B, Hkv, G, q, S]`` of ``query [B, H, q, D]`` over
    ``key [B, Hkv, S, D]``: the ``G`` query heads of a KV head go through one ``[G * q, D]`` GEMM,
    so KV heads are never expanded (and no broadcasting matmul, several times slower on CPU)."""
    batch, heads, q_len, dim = query.shape
    kv_heads, num_keys = key.shape[1], key.shape[2]
    grouped = query.float().reshape(batch, kv_heads, heads // kv_heads * q_len, dim)
    logits = torch.matmul(grouped, key.float().transpose(-1, -2)).mul_(scaling)
    return softcapped(logits, softcap).view(batch, kv_heads, heads // kv_heads, q_len, num_keys)


def window_attention_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor,
    scaling: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Softmax attention probabilities of a few queries over all keys, grouped by KV head.

    Args:
        query: ``[B, H, w, D]`` (the observation window).
        key: ``[B, Hkv, S, D]``.
        mask: ``[B|1, 1|H, w, S]`` bool.
    Returns:
        ``[B, Hkv, G, w, S]`` float32 probabilities (rows sum to 1 where anything is visible).
    """
    batch, heads, window, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    logits = grouped_logits(query, key, scaling, softcap)  # [B, Hkv, G, w, S]
    grouped_mask = mask.reshape(mask.shape[0], -1, 1, window, mask.shape[-1])  # heads -> [Hkv|1, G|1]
    if mask.shape[1] == heads:
        grouped_mask = mask.reshape(mask.shape[0], kv_heads, groups, window, mask.shape[-1])
    logits = logits.masked_fill(~grouped_mask, -torch.inf)
    probs = torch.softmax(logits, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)  # rows with nothing visible (padding queries)


COLUMN_SUMS_BLOCK_ELEMENTS = 2**21  # float32 logits per query block of attention_column_sums


def attention_column_sums(
    query: torch.Tensor,
    key: torch.Tensor,
    key_valid: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
    block: int | None = None,
) -> torch.Tensor:
    """Attention each key receives, summed over the queries: ``[B, Hkv, G, S]`` float32.

    Queries are the last ``q`` positions of the ``S`` keys (causal); a query whose own slot is
    padding contributes nothing. Computed ``block`` queries at a time over only the keys that
    block can see, so memory is ``block x S``, never ``q x S``, and a prompt attending to itself
    costs half the full matrix (H2O's accumulated attention at prefill). The default block keeps
    one block's logits near 8 MB, where they stay in the CPU's caches (on 2 cores: 2.4x faster
    than 512-query blocks at 32K keys).

    Args:
        query: ``[B, H, q, D]``; key: ``[B, Hkv, S, D]``; key_valid: ``[B, Hkv, S]`` bool or None.
    """
    return _causal_attention_pass(query, key, None, key_valid, scaling, softcap, block)[1]


def attention_with_column_sums(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_valid: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
    block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention and its column sums from one pass over the logits: ``(out [B, H, q, Dv]``
    in the query's dtype, ``sums [B, Hkv, G, S]`` float32 as :func:`attention_column_sums`).

    The same attention as :func:`attention` with the mask "causal over the valid keys" (a row that
    sees no key gets 0), for a policy that reads the column sums (H2O): on CPU one pass costs 0.63
    of torch's fused attention followed by a second pass for the sums (8 heads, 4096 queries over
    5120 keys, one thread). ``value``: ``[B, Hkv, S, Dv]``; the rest as :func:`attention_column_sums`.
    """
    out, sums = _causal_attention_pass(query, key, value, key_valid, scaling, softcap, block)
    return out.to(query.dtype), sums


def _causal_attention_pass(query, key, value, key_valid, scaling, softcap, block):
    """``(out [B, H, q, Dv] float32 or None when value is None, column sums [B, Hkv, G, S])``:
    the last ``q`` of ``S`` positions attend causally over the valid keys, ``block`` queries at a
    time. Softmax as flash attention writes it: ``p = exp(logits - row max)``, rows normalised by
    ``1 / sum(p)`` in the value product and in the column sums' GEMV, so ``p`` is the one block-
    sized tensor alive."""
    batch, heads, q_len, dim = query.shape
    kv_heads, num_keys = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    keys = key.float()  # [B, Hkv, S, D]
    values = None if value is None else value.float()
    if block is None:
        block = min(1024, max(8, COLUMN_SUMS_BLOCK_ELEMENTS // (batch * heads * num_keys)))
    if key_valid is not None and bool(key_valid.all()):
        key_valid = None  # no padding: skip the masking passes
    sums = query.new_zeros(batch, kv_heads, groups, num_keys, dtype=torch.float32)
    out = None if value is None else query.new_empty(batch, kv_heads, groups, q_len, value.shape[-1], dtype=torch.float32)
    first_query = num_keys - q_len  # stored position of query 0
    for start in range(0, q_len, block):
        stop = min(start + block, q_len)
        rows, seen = stop - start, first_query + stop  # this block's queries see keys [0, seen)
        logits = grouped_logits(query[:, :, start:stop], keys[:, :, :seen], scaling, softcap)  # [B, Hkv, G, b, seen]
        # causal: only the last `rows` columns hold keys later than some query of the block
        future = torch.ones(rows, rows, dtype=torch.bool, device=query.device).triu_(1)
        logits[..., seen - rows :].masked_fill_(future, -torch.inf)
        if key_valid is not None:
            logits.masked_fill_(~key_valid[:, :, None, None, :seen], -torch.inf)
        row_max = logits.amax(dim=-1, keepdim=True)
        if key_valid is not None:  # a row that sees no key: p = 0 rather than NaN
            row_max.masked_fill_(row_max == -torch.inf, 0.0)
        p = logits.sub_(row_max).exp_()  # in place: one block of logits alive
        row_sum = p.sum(dim=-1, keepdim=True)  # [B, Hkv, G, b, 1]
        inverse = torch.where(row_sum > 0, row_sum.reciprocal(), 0.0) if key_valid is not None else row_sum.reciprocal_()
        if values is not None:
            product = torch.matmul(p.view(batch, kv_heads, groups * rows, seen), values[:, :, :seen])
            out[:, :, :, start:stop] = product.view(batch, kv_heads, groups, rows, -1).mul_(inverse)
        if key_valid is not None:  # padded queries contribute nothing to the sums
            inverse = inverse * key_valid[:, :, None, first_query + start : seen, None]
        sums[..., :seen] += torch.matmul(inverse.transpose(-1, -2), p).squeeze(-2)
    return (None if out is None else out.view(batch, heads, q_len, -1)), sums


# ---------------------------------------------------------------- ragged per-head storage
# A ragged cache holds, for each (row b, KV head h), its own number of tokens, packed one segment
# after another: keys/values ``[N, D]`` with ``offsets [B * Hkv + 1]`` (segment i = b * Hkv + h
# spans ``offsets[i]:offsets[i + 1]``). No padding to the longest head.


def pack_ragged(dense: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``dense [B, Hkv, S, ...]`` and ``keep [B, Hkv, S]`` bool -> (packed ``[N, ...]`` in segment
    order, ``offsets [B * Hkv + 1]`` int64)."""
    counts = keep.sum(-1).flatten()
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.long, device=dense.device)
    offsets[1:] = counts.cumsum(0)
    return dense[keep], offsets


def unpack_ragged(packed: torch.Tensor, offsets: torch.Tensor, batch: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_ragged`, left-padded to the longest segment: ``([B, Hkv, P, ...],
    valid [B, Hkv, P])``. Right-aligned like a left-padded batch, so positions counted from the
    newest token do not depend on how long the other segments are."""
    valid = ragged_valid(offsets, batch, kv_heads)
    longest = valid.shape[-1]
    trailing = packed.shape[1:]
    if packed.device.type != "cpu" and packed.shape[0]:
        return _gather_segments(packed, offsets, valid), valid  # a copy per segment = B x Hkv launches
    # CPU: one contiguous copy per segment (a row gather is 2x slower, a boolean index_put more)
    dense = packed.new_zeros(batch * kv_heads, longest, *trailing)
    for segment, (start, count) in enumerate(zip(offsets[:-1].tolist(), offsets.diff().tolist())):
        if count:
            dense[segment, longest - count :] = packed[start : start + count]
    return dense.reshape(batch, kv_heads, longest, *trailing), valid


def _gather_segments(packed: torch.Tensor, offsets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """:func:`unpack_ragged`'s layout in one gather: slot p of segment i reads packed row
    ``offsets[i] + p - (longest - count[i])``; padding slots are zeroed after."""
    longest, trailing = valid.shape[-1], packed.shape[1:]
    starts = offsets[:-1] - (longest - offsets.diff())
    source = (starts[:, None] + torch.arange(longest, device=offsets.device)).clamp_(0, packed.shape[0] - 1)
    dense = packed.index_select(0, source.flatten()).reshape(*valid.shape, *trailing)
    return dense.masked_fill_(~valid.reshape(*valid.shape, *[1] * len(trailing)), 0)


def ragged_valid(offsets: torch.Tensor, batch: int, kv_heads: int) -> torch.Tensor:
    """``[B, Hkv, P]`` bool: which slots of :func:`unpack_ragged`'s layout hold a token (right-aligned)."""
    counts = offsets.diff()
    longest = int(counts.max()) if counts.numel() else 0
    valid = torch.arange(longest, device=offsets.device)[None, :] >= longest - counts[:, None]  # [B*Hkv, P]
    return valid.reshape(batch, kv_heads, longest)


def attention_with_lse(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
    block: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention and the log-sum-exp of its logits, both float32: ``([B, H, q, Dv], [B, H, q])``.

    ``mask``: ``[B|1, 1|H, q, S]`` bool or None (everything visible). Rows that see nothing give
    ``out = 0`` and ``lse = -inf``, so they vanish when merged. Computed ``block`` queries at a
    time: memory ``block x S``, never ``q x S``.
    """
    batch, heads, q_len = query.shape[:3]
    kv_heads, num_keys, dim = key.shape[1], key.shape[2], value.shape[-1]
    groups = heads // kv_heads
    keys, values = key.float(), value.float()
    outs, lses = [], []
    for start in range(0, q_len, block):
        stop = min(start + block, q_len)
        rows = stop - start
        logits = grouped_logits(query[:, :, start:stop], keys, scaling, softcap)
        logits = logits.view(batch, kv_heads, groups * rows, num_keys)  # [B, Hkv, G * b, S]
        if mask is not None:
            visible = mask if mask.shape[-2] == 1 else mask[..., start:stop, :]  # may broadcast over queries
            visible = visible.expand(batch, heads, rows, num_keys).reshape(batch, kv_heads, groups * rows, num_keys)
            logits = logits.masked_fill(~visible, -torch.inf)
        lse = torch.logsumexp(logits, dim=-1)  # [B, Hkv, G * b]
        out = torch.matmul(torch.exp(logits - lse[..., None]).nan_to_num(0.0), values)
        outs.append(out.reshape(batch, heads, rows, dim))
        lses.append(lse.reshape(batch, heads, rows))
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def merge_attention(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Combine attention over disjoint key sets from their ``(out, lse)``: the attention over all of them."""
    return merge_with_lse(parts)[0]


def merge_with_lse(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`merge_attention` and the log-sum-exp of all the parts' logits: ``(out, lse)``."""
    lses = torch.stack([lse for _, lse in parts])  # [P, B, H, q]
    total = torch.logsumexp(lses, dim=0)
    weights = torch.exp(lses - total).nan_to_num(0.0)[..., None]
    return sum(w * out for w, (out, _) in zip(weights, parts)), total


def prefix_then_new_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    prefix_valid: torch.Tensor | None,
    new_mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention ``[B, H, q, Dv]`` of ``q`` new queries over ``key / value [B, Hkv, P + q, D]``:
    a stored prefix of ``P`` tokens, every one visible to every new query where ``prefix_valid
    [B, Hkv, P]`` (None: all) says it is a real token, then the new tokens themselves, causal
    (``new_mask`` None) or under ``new_mask [B|1, 1|H, q, q]`` (padding among them).

    Two passes merged by log-sum-exp, so no ``q x (P + q)`` mask or score matrix is ever built:
    chunked prefill and extend cost ``q x P`` plus a causal ``q x q``. On CPU each pass is torch's
    fused flash kernel (GQA native; the prefix mask is ``[B, H, 1, P]``); elsewhere, and with soft-
    capping, :func:`attention_with_lse` a block of queries at a time."""
    prefix = key.shape[-2] - query.shape[-2]
    groups = query.shape[1] // key.shape[1]
    visible = None if prefix_valid is None else expand_kv_heads(prefix_valid, groups)[:, :, None, :]  # [B, H, 1, P]
    parts = []
    if prefix:
        parts.append(_attention_part(query, key[:, :, :prefix], value[:, :, :prefix], visible, False, scaling, softcap))
    parts.append(_attention_part(query, key[:, :, prefix:], value[:, :, prefix:], new_mask, new_mask is None,
                                 scaling, softcap))
    if sinks is not None:
        parts.append(sink_part(sinks, parts[0][0]))
    return merge_attention(parts).to(query.dtype)


_FUSED_CPU_ATTENTION = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def fused_attention_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None,
                             causal: bool, scaling: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """torch's fused CPU flash kernel, which also returns the log-sum-exp: ``(out [..., H, q, Dv], lse
    [..., H, q])`` float32 of ``query [..., H, q, D]`` over ``key / value [..., Hkv, S, D]`` (GQA
    native), with an additive ``bias`` (0 / -inf, the query's dtype, broadcastable to ``[..., H, q,
    S]``) or None, ``causal`` over the same tokens or not. None where it cannot run: off the CPU,
    key and value head dims that differ, or a torch without it. A query that sees no key gets lse
    0 from the kernel: the caller masks it."""
    if _FUSED_CPU_ATTENTION is None or query.device.type != "cpu" or key.shape[-1] != value.shape[-1]:
        return None
    out, lse = _FUSED_CPU_ATTENTION(query, key, value, 0.0, causal, attn_mask=bias, scale=scaling)
    return out.float(), lse.float()


def _attention_part(query, key, value, mask: torch.Tensor | None, causal: bool, scaling: float,
                    softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` float32 of ``query`` over one key set: ``mask [B|1, 1|H, q|1, S]`` bool or None
    (everything visible), or ``causal`` (queries and keys the same tokens)."""
    bias = None
    if mask is not None and not causal:
        bias = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill_(~mask, -torch.inf)
    fused = None if softcap is not None else fused_attention_with_lse(query, key, value, bias, causal, scaling)
    if fused is not None:
        out, lse = fused
        if bias is not None:  # a row that sees no key: the kernel gives lse 0, it must vanish
            sees_none = ~mask.any(-1)  # [B|1, 1|H, q|1]
            lse = lse.masked_fill(sees_none.expand_as(lse), -torch.inf)
        return out, lse
    if causal:
        mask = causal_mask(query.shape[-2], key.shape[-2], query.device)
    return attention_with_lse(query, key, value, mask, scaling, softcap)


def ragged_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor,
    scaling: float,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries ``[B, H, q, D]`` over a ragged per-head cache (every stored token visible to every
    query): ``(out [B, H, q, D], lse [B, H, q])`` float32.

    One small GEMM per (row, KV head) segment, straight on the packed tensors: nothing is copied
    into a padded layout (on CPU, allocating that copy on every decode step cost more than the
    attention itself)."""
    batch, heads, q_len, dim = query.shape
    segments = offsets.numel() - 1
    groups = heads * batch // segments
    grouped = query.float().reshape(segments, groups * q_len, dim)  # the G query heads of each segment
    out = grouped.new_zeros(segments, groups * q_len, dim)
    lse = grouped.new_full((segments, groups * q_len), -torch.inf)
    bounds = offsets.tolist()
    for segment in range(segments):
        start, stop = bounds[segment], bounds[segment + 1]
        if stop == start:
            continue  # an empty segment: out 0, lse -inf (vanishes when merged)
        logits = softcapped(grouped[segment] @ keys[start:stop].float().T * scaling, softcap)  # [G * q, n]
        lse[segment] = torch.logsumexp(logits, dim=-1)
        out[segment] = torch.exp(logits - lse[segment, :, None]) @ values[start:stop].float()
    return out.reshape(batch, heads, q_len, dim), lse.reshape(batch, heads, q_len)


# ---------------------------------------------------------------- block-sparse attention
# The block grid: ``S`` keys in ``ceil(S / n)`` blocks of ``n`` slots aligned to the *end* (the last
# block ends at the last key, the first may be partial), so a row of a left-padded batch meets the
# same blocks of real tokens as the row alone. The ``q`` new queries are the last ``q`` slots; they
# span the last ``ceil(q / n)`` blocks of the grid, the *query blocks*. A block index
# ``[B, H, Qb, K]`` (int, ascending, ``-1`` = no block) lists, for each query head and query block,
# the key blocks it computes; within them attention is causal over valid keys as usual.


def block_grid(q_len: int, kv_len: int, block_size: int) -> tuple[int, int, int]:
    """``(Qb, Nb, pad)``: query blocks, key blocks, and the empty slots in front of the first key
    block (``Nb * n - S``). Query block ``j`` is key block ``Nb - Qb + j`` of the grid."""
    num_key_blocks = -(-kv_len // block_size)
    return -(-q_len // block_size), num_key_blocks, num_key_blocks * block_size - kv_len


def is_causal_over(mask: torch.Tensor, valid: torch.Tensor, block: int | None = None) -> bool:
    """Whether ``mask [B|1, 1|H, q, S]`` lets every query (the last ``q`` slots) see exactly the
    valid keys up to its own slot, ``valid [B, Hkv, S]`` (rows of padding queries are not looked
    at). Compared ``block`` queries at a time: memory ``B x H x block x S``, by default no more
    elements than the mask has."""
    q_len, kv_len = mask.shape[-2:]
    batch, kv_heads = valid.shape[:2]
    heads = mask.shape[1] if mask.shape[1] > 1 else kv_heads
    if heads % kv_heads:
        return False
    if block is None:
        block = max(1, min(1024, mask.numel() // (batch * heads * kv_len)))
    keys = expand_kv_heads(valid, heads // kv_heads)[:, :, None, :]  # [B, H, 1, S]
    for start in range(0, q_len, block):
        stop = min(start + block, q_len)
        want = keys & causal_mask(q_len, kv_len, mask.device)[..., start:stop, :]
        own = keys[..., kv_len - q_len + start: kv_len - q_len + stop].transpose(-1, -2)  # [B, H, b, 1]
        if bool(((mask[..., start:stop, :] != want) & own).any()):
            return False
    return True


def block_sparse_mask(block_index: torch.Tensor, q_len: int, kv_len: int, block_size: int) -> torch.Tensor:
    """``[B, H, q, S]`` bool: the (query, key) pairs inside the blocks ``block_index [B, H, Qb, K]``
    selects (before causal and padding masks). Tests and the reference only: it is ``q x S``."""
    batch, heads = block_index.shape[:2]
    num_query_blocks, num_key_blocks, pad = block_grid(q_len, kv_len, block_size)
    device = block_index.device
    selected = torch.zeros(batch, heads, num_query_blocks, num_key_blocks + 1, dtype=torch.bool, device=device)
    index = torch.where(block_index < 0, num_key_blocks, block_index).long()  # -1 -> a spare column
    selected.scatter_(-1, index, True)
    query_block = (torch.arange(kv_len - q_len, kv_len, device=device) + pad) // block_size
    key_block = (torch.arange(kv_len, device=device) + pad) // block_size
    return selected[:, :, query_block - (num_key_blocks - num_query_blocks)][..., key_block]


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
    """Block-sparse causal attention, as dense attention with the equivalent mask: ``(out [B, H, q,
    Dv], lse [B, H, q])`` float32 of ``query [B, H, q, D]`` (the last ``q`` of ``S`` slots) over
    ``key [B, Hkv, S, D]`` / ``value [B, Hkv, S, Dv]``, computing only the key blocks of
    ``block_index [B, H, Qb, K]`` (see the block grid above); ``key_valid [B, Hkv, S]`` bool masks
    padding. A query that sees nothing: out 0, lse -inf. (MInference's block-sparse attention.)"""
    q_len, kv_len = query.shape[-2], key.shape[-2]
    mask = block_sparse_mask(block_index, q_len, kv_len, block_size) & causal_mask(q_len, kv_len, query.device)
    if key_valid is not None:
        mask = mask & expand_kv_heads(key_valid, query.shape[1] // key.shape[1])[:, :, None, :]
    return attention_with_lse(query, key, value, mask, scaling, softcap)
