"""Pure-torch reference of every attention op kvx uses.

These are the ground truth that Triton kernels are tested against, and the CPU path. Shapes:
``B`` batch, ``H`` query heads, ``Hkv`` KV heads (``G = H // Hkv`` query heads per KV head),
``q`` queries, ``S`` keys, ``D`` head dim. Masks are bool, True = may attend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_mask(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """``[1, 1, q_len, kv_len]`` bool, bottom-right aligned: query i sits at key position
    ``kv_len - q_len + i`` and sees every key up to it."""
    query_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    return (torch.arange(kv_len, device=device)[None, :] <= query_pos)[None, None]


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
) -> torch.Tensor:
    """Dense attention ``[B, H, q, D]`` of ``query [B, H, q, D]`` over ``key/value [B, Hkv, S, D]``.

    ``mask``: ``[B|1, 1|H, q, S]`` bool, or None for causal attention (bottom-right aligned when
    ``q < S``). ``softcap``: Gemma 2's logit soft-capping ``tanh(x / c) * c``.
    """
    q_len, kv_len = query.shape[-2], key.shape[-2]
    groups = query.shape[1] // key.shape[1]
    if mask is None and 1 < q_len < kv_len:
        mask = causal_mask(q_len, kv_len, query.device)
    if softcap is None:
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
    return attention_with_lse(query, key, value, mask, scaling, softcap)[0].to(query.dtype)


def softcapped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Gemma 2's attention logit soft-capping ``tanh(x / c) * c`` (identity when ``c`` is None)."""
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


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
    grouped_query = query.reshape(batch, kv_heads, groups, window, dim).float()
    logits = softcapped(torch.matmul(grouped_query, key.float()[:, :, None].transpose(-1, -2)) * scaling, softcap)
    grouped_mask = mask.reshape(mask.shape[0], -1, 1, window, mask.shape[-1])  # heads -> [Hkv|1, G|1]
    if mask.shape[1] == heads:
        grouped_mask = mask.reshape(mask.shape[0], kv_heads, groups, window, mask.shape[-1])
    logits = logits.masked_fill(~grouped_mask, -torch.inf)
    probs = torch.softmax(logits, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)  # rows with nothing visible (padding queries)


def attention_column_sums(
    query: torch.Tensor,
    key: torch.Tensor,
    key_valid: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
    block: int = 256,
) -> torch.Tensor:
    """Attention each key receives, summed over the queries: ``[B, Hkv, G, S]`` float32.

    Queries are the last ``q`` positions of the ``S`` keys (causal); a query whose own slot is
    padding contributes nothing. Computed ``block`` queries at a time, so memory is
    ``block x S``, never ``q x S`` (H2O's accumulated attention at prefill).

    Args:
        query: ``[B, H, q, D]``; key: ``[B, Hkv, S, D]``; key_valid: ``[B, Hkv, S]`` bool or None.
    """
    batch, heads, q_len, dim = query.shape
    kv_heads, num_keys = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    keys = key.float()[:, :, None]  # [B, Hkv, 1, S, D]
    valid = key_valid[:, :, None, None, :] if key_valid is not None else None  # [B, Hkv, 1, 1, S]
    sums = query.new_zeros(batch, kv_heads, groups, num_keys, dtype=torch.float32)
    for start in range(0, q_len, block):
        stop = min(start + block, q_len)
        q = query[:, :, start:stop].float().reshape(batch, kv_heads, groups, stop - start, dim)
        logits = softcapped(torch.matmul(q, keys.transpose(-1, -2)) * scaling, softcap)  # [B, Hkv, G, b, S]
        visible = causal_mask(stop - start, num_keys - q_len + stop, query.device)[0, 0]  # [b, S']
        visible = torch.nn.functional.pad(visible, (0, num_keys - visible.shape[-1]))  # [b, S]
        mask = visible[None, None, None]
        if valid is not None:
            own = valid[..., num_keys - q_len + start : num_keys - q_len + stop].transpose(-1, -2)  # [B,Hkv,1,b,1]
            mask = mask & valid & own
        probs = torch.softmax(logits.masked_fill(~mask, -torch.inf), dim=-1)
        sums += torch.nan_to_num(probs, nan=0.0).sum(dim=-2)
    return sums


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
    dense = packed.new_zeros(batch, kv_heads, valid.shape[-1], *packed.shape[1:])
    dense[valid] = packed
    return dense, valid


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
    """Attention and the log-sum-exp of its logits, both float32: ``([B, H, q, D], [B, H, q])``.

    ``mask``: ``[B|1, 1|H, q, S]`` bool or None (everything visible). Rows that see nothing give
    ``out = 0`` and ``lse = -inf``, so they vanish when merged. Computed ``block`` queries at a
    time: memory ``block x S``, never ``q x S``.
    """
    groups = query.shape[1] // key.shape[1]
    keys = expand_kv_heads(key, groups).float().transpose(-1, -2)
    values = expand_kv_heads(value, groups).float()
    outs, lses = [], []
    for start in range(0, query.shape[2], block):
        stop = min(start + block, query.shape[2])
        logits = softcapped(torch.matmul(query[:, :, start:stop].float(), keys) * scaling, softcap)
        if mask is not None:
            rows = mask if mask.shape[-2] == 1 else mask[..., start:stop, :]  # a mask may broadcast over queries
            logits = logits.masked_fill(~rows, -torch.inf)
        lse = torch.logsumexp(logits, dim=-1)  # [B, H, b]
        outs.append(torch.matmul(torch.exp(logits - lse[..., None]).nan_to_num(0.0), values))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def merge_attention(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Combine attention over disjoint key sets from their ``(out, lse)``: the attention over all of them."""
    lses = torch.stack([lse for _, lse in parts])  # [P, B, H, q]
    total = torch.logsumexp(lses, dim=0)
    weights = torch.exp(lses - total).nan_to_num(0.0)[..., None]
    return sum(w * out for w, (out, _) in zip(weights, parts))


def ragged_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor,
    scaling: float,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries ``[B, H, q, D]`` over a ragged per-head cache (every stored token visible to every
    query): ``(out [B, H, q, D], lse [B, H, q])`` float32."""
    batch, heads = query.shape[:2]
    kv_heads = (offsets.numel() - 1) // batch
    dense_k, valid = unpack_ragged(keys, offsets, batch, kv_heads)
    dense_v, _ = unpack_ragged(values, offsets, batch, kv_heads)
    mask = expand_kv_heads(valid, heads // kv_heads)[:, :, None, :]  # [B, H, 1, P]
    return attention_with_lse(query, dense_k, dense_v, mask, scaling, softcap)
