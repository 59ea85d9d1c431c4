"""Which key blocks each query block computes: scores estimated without a ``q x S`` matrix, and the
index builder that turns scores (or a fixed pattern) into block lists for
:func:`kvx.kernels.block_sparse.block_sparse_attention`.

Everything runs on the tensors' device, vectorised over rows and heads (no Python loop over heads).
The block grid is :mod:`kvx.kernels.reference`'s: aligned to the end of the keys, query block
``j`` is key block ``Nb - Qb + j`` (its *own* block). Shapes: ``B`` batch, ``H`` query heads,
``Hkv`` KV heads, ``G = H / Hkv``, ``q`` queries (the last ``q`` of ``S`` slots), ``n`` block size,
``Qb`` / ``Nb`` query / key blocks.

- :func:`pooled_block_scores`: mean-pooled query blocks against mean-pooled key blocks, softmax
  over the causal key blocks (SeerAttention's and FlexPrefill's estimate, without a trained gate);
  :func:`pooled_query_scores`: mean-pooled query blocks against every key, summed per key block
  (a key that stands out is not averaged away with its block); the blocks holding its last
  ``last_queries`` queries are scored from those queries instead (:func:`final_block_scores`).
- :func:`final_block_scores`: the attention the last queries give each key block, averaged over
  the queries of each query block they fall in (the exact block mass when they fill it).
- :func:`vertical_slash_scores`: MInference's estimate: the attention of the last queries, summed
  down each key column (*vertical* lines) and along each diagonal (*slash* lines), spread to the
  tiles those lines cross.
- :func:`block_index`: per list, the sink and local blocks plus the best-scored blocks up to a
  count (a density) or a cumulative score (a threshold).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvx.kernels import reference
from kvx.kernels.reference import block_grid


def first_real_block(key_valid: torch.Tensor | None, batch: int, heads: int, kv_len: int, block_size: int,
                     device) -> torch.Tensor:
    """``[B, H]`` the first key block of the grid holding a real key of each (row, query head):
    where a row of a left-padded batch begins, so sinks are its first tokens, as for the row alone."""
    pad = block_grid(1, kv_len, block_size)[2]
    if key_valid is None:
        return torch.zeros(batch, heads, dtype=torch.long, device=device)
    first_slot = key_valid.to(torch.uint8).argmax(dim=-1)  # [B, Hkv] (0 where a head holds nothing)
    return reference.expand_kv_heads((first_slot + pad) // block_size, heads // key_valid.shape[1])


def _pool(x: torch.Tensor, weight: torch.Tensor | None, block_size: int) -> torch.Tensor:
    """Mean of ``x [B, h, L, D]`` over the real slots (``weight [B, h, L]``, 1 / 0; None: every slot)
    of each block of the end-aligned grid: ``[B, h, ceil(L / n), D]`` float32 (zero where a block
    has none)."""
    pad = -x.shape[-2] % block_size
    if weight is None:
        weight = torch.ones(1, 1, x.shape[-2], device=x.device)  # [1, 1, L]
        x = x.float()
    else:
        x = x.float() * weight[..., None]
    x, weight = (F.pad(x, (0, 0, pad, 0)), F.pad(weight, (pad, 0))) if pad else (x, weight)  # no copy unless padded
    sums = x.reshape(*x.shape[:2], -1, block_size, x.shape[-1]).sum(dim=-2)  # a view unless x is strided
    counts = weight.view(*weight.shape[:2], -1, block_size).sum(dim=-1, keepdim=True)
    return sums / counts.clamp(min=1)


def pooled_block_scores(query: torch.Tensor, key: torch.Tensor, key_valid: torch.Tensor | None, scaling: float,
                        block_size: int, softcap: float | None = None) -> torch.Tensor:
    """``[B, H, Qb, Nb]`` float32: softmax over key blocks of each mean-pooled query block's logits
    against the mean-pooled key blocks (real slots only), over the key blocks it may see (up to its
    own, holding a real key); 0 elsewhere. ``Qb x Nb`` per head: never ``q x S``.

    Args:
        query: ``[B, H, q, D]``; key: ``[B, Hkv, S, D]``; key_valid: ``[B, Hkv, S]`` bool or None.
    """
    batch, heads, q_len, _ = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    num_qb, num_kb, _ = block_grid(q_len, kv_len, block_size)
    valid = (torch.ones(batch, kv_heads, kv_len, device=key.device) if key_valid is None else key_valid.float())
    keys = _pool(key, valid, block_size)  # [B, Hkv, Nb, D]
    query_weight = reference.expand_kv_heads(valid[..., kv_len - q_len:], groups)  # a padding query weighs 0
    queries = _pool(query, query_weight, block_size)  # [B, H, Qb, D]
    logits = reference.grouped_logits(queries, keys, scaling, softcap).view(batch, heads, num_qb, num_kb)
    pad = num_kb * block_size - kv_len
    has_real = F.pad(valid, (pad, 0)).view(batch, kv_heads, num_kb, block_size).amax(dim=-1) > 0  # [B, Hkv, Nb]
    has_real = reference.expand_kv_heads(has_real, groups)
    visible = _causal_blocks(num_qb, num_kb, key.device) & has_real[:, :, None, :]
    probs = torch.softmax(logits.masked_fill(~visible, -torch.inf), dim=-1)
    return probs.nan_to_num_(0.0)


def pooled_query_scores(query: torch.Tensor, key: torch.Tensor, key_valid: torch.Tensor | None, scaling: float,
                        block_size: int, softcap: float | None = None, chunk_elements: int = 2**21,
                        last_queries: int = 0) -> torch.Tensor:
    """``[B, H, Qb, Nb]`` float32: the attention each mean-pooled query block gives each key block,
    a softmax over every real key it may see (key blocks up to its own) summed per key block; 0
    elsewhere. Keys are not pooled, so one key that stands out (a needle) is not averaged away with
    its block. ``Qb x S`` per head, a chunk of query blocks at a time (about ``chunk_elements``
    logits: they stay in the cache): never ``q x S``. The causal cut is at block edges, so it masks
    the chunk's last blocks alone; a per-key mask is applied only where keys hold padding.

    The query blocks holding the last ``last_queries`` queries are not pooled: their rows are
    :func:`final_block_scores`, the mean of those queries' own attention (a block whose last query
    asks for a needle is not averaged into one query that asks for nothing).

    Args:
        query: ``[B, H, q, D]``; key: ``[B, Hkv, S, D]``; key_valid: ``[B, Hkv, S]`` bool or None.
    """
    batch, heads, q_len, _ = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    groups, n = heads // kv_heads, block_size
    num_qb, num_kb, pad = block_grid(q_len, kv_len, n)
    query_weight = None if key_valid is None else reference.expand_kv_heads(key_valid[..., kv_len - q_len:].float(),
                                                                            groups)  # a padding query weighs 0
    queries = _pool(query, query_weight, n)  # [B, H, Qb, D]
    keys = F.pad(key.float(), (0, 0, pad, 0)) if pad else key.float()  # [B, Hkv, Nb * n, D]: empty slots masked
    real = None  # [B, H, 1, Nb * n] the grid's real keys, where any slot is not one
    if key_valid is not None or pad:
        valid = torch.ones(batch, kv_heads, kv_len, dtype=torch.bool, device=key.device) if key_valid is None \
            else key_valid
        real = reference.expand_kv_heads(F.pad(valid, (pad, 0), value=False), groups)[:, :, None, :]
    scores = torch.zeros(batch, heads, num_qb, num_kb, device=key.device)
    pooled = num_qb - -(-min(max(last_queries, 0), q_len) // n)  # query blocks scored by their mean query
    step = max(1, chunk_elements // (batch * heads * num_kb * n))
    for start in range(0, pooled, step):
        stop = min(start + step, pooled)
        seen = num_kb - num_qb + stop  # key blocks up to the chunk's last own block
        probs = _pooled_chunk_probs(queries[:, :, start:stop], keys[:, :, :seen * n], real, scaling, softcap, n)
        scores[:, :, start:stop, :seen] = probs.view(batch, heads, stop - start, seen, n).sum(-1)
    if pooled < num_qb:
        scores[:, :, pooled:] = final_block_scores(query, key, key_valid, scaling, n, last_queries, softcap)
    return scores


def final_block_scores(query: torch.Tensor, key: torch.Tensor, key_valid: torch.Tensor | None, scaling: float,
                       block_size: int, last: int = 16, softcap: float | None = None,
                       chunk_elements: int = 2**23) -> torch.Tensor:
    """``[B, H, r, Nb]`` float32 for the last ``r`` query blocks, those holding the last ``w =
    min(last, q)`` queries: the attention those real queries give each key block (each query's
    softmax over the real keys it may see, causal per token, summed per key block), averaged over
    the ones in each block. Where they fill a block, exactly the share of its attention that
    computing a key block keeps; the final block holds ``n`` queries, so ``last < n`` reads its
    last ones alone. Rows sum to 1 (0 where a block holds none of them). ``w x S`` logits per head,
    a chunk of KV heads at a time (about ``chunk_elements``); never ``q x S``.

    Args:
        query: ``[B, H, q, D]`` (its last ``w`` are read); key: ``[B, Hkv, S, D]``;
        key_valid: ``[B, Hkv, S]`` bool or None.
    """
    batch, heads, q_len, _ = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    groups, n = heads // kv_heads, block_size
    num_qb, num_kb, pad = block_grid(q_len, kv_len, n)
    width = min(max(last, 1), q_len)  # the last query block is full (end-aligned grid)
    rows = -(-width // n)
    front = rows * n - width  # slots in front of the first query read, in the first of those blocks
    step = max(1, chunk_elements // (batch * groups * width * kv_len))  # KV heads per chunk
    mass = torch.empty(batch, heads, width, num_kb, device=key.device)
    for start in range(0, kv_heads, step):
        stop = min(start + step, kv_heads)
        probs = _last_queries_attention(query[:, start * groups:stop * groups, -width:], key[:, start:stop],
                                        None if key_valid is None else key_valid[:, start:stop], scaling, softcap)
        probs = F.pad(probs, (pad, 0)) if pad else probs  # [B, h, w, Nb * n]
        mass[:, start * groups:stop * groups] = probs.view(batch, -1, width, num_kb, n).sum(-1)
    weight = torch.ones(1, 1, width, device=key.device) if key_valid is None else \
        reference.expand_kv_heads(key_valid[..., kv_len - width:].float(), groups)  # a padding query weighs 0
    mass = mass * weight[..., None]
    if front:
        mass, weight = F.pad(mass, (0, 0, front, 0)), F.pad(weight, (front, 0))
    sums = mass.view(batch, heads, rows, n, num_kb).sum(dim=-2)
    counts = weight.expand(batch, heads, -1).reshape(batch, heads, rows, n).sum(-1, keepdim=True)
    return sums / counts.clamp(min=1)


def _pooled_chunk_probs(queries: torch.Tensor, keys: torch.Tensor, real: torch.Tensor | None, scaling: float,
                        softcap: float | None, block_size: int) -> torch.Tensor:
    """``[B, H, c, L]`` softmax of ``c`` consecutive pooled query blocks ``[B, H, c, D]`` over ``keys
    [B, Hkv, L, D]`` (``L = seen * n``, the last query block's own block last), each over the key
    blocks up to its own and the ``real [B, H, 1, >= L]`` keys (None: all); 0 where none is seen."""
    batch, heads, chunk = queries.shape[:3]
    seen = keys.shape[-2] // block_size
    logits = reference.grouped_logits(queries, keys, scaling, softcap).view(batch, heads, chunk, seen, block_size)
    ahead = torch.ones(chunk, chunk, dtype=torch.bool, device=keys.device).triu_(1)  # [c, c] blocks after its own
    logits[:, :, :, seen - chunk:].masked_fill_(ahead[..., None], -torch.inf)
    logits = logits.view(batch, heads, chunk, -1)
    if real is None:
        return torch.softmax(logits, dim=-1)
    logits.masked_fill_(~real[..., :logits.shape[-1]], -torch.inf)
    return torch.softmax(logits, dim=-1).nan_to_num_(0.0)


def _causal_blocks(num_qb: int, num_kb: int, device) -> torch.Tensor:
    """``[Qb, Nb]`` bool: key blocks up to each query block's own."""
    own = num_kb - num_qb + torch.arange(num_qb, device=device)
    return torch.arange(num_kb, device=device)[None, :] <= own[:, None]


def vertical_slash_scores(query: torch.Tensor, key: torch.Tensor, key_valid: torch.Tensor | None, scaling: float,
                          block_size: int, last: int = 64, softcap: float | None = None) -> torch.Tensor:
    """``[B, H, Qb, Nb]`` float32: MInference's vertical-slash estimate as tile scores.

    The attention of the last ``last`` queries over every key (``last x S`` per head) is summed
    down each key column (vertical lines: keys every query reads) and along each diagonal (slash
    lines: keys at a fixed distance behind the query); a tile scores the mass of the columns in its
    key block plus that of the diagonals crossing it (a diagonal ``d = m * n + r`` crosses ``n - r``
    cells of the tiles ``m`` blocks below the diagonal and ``r`` of those ``m + 1`` below).

    Args:
        query: ``[B, H, q, D]`` (the last ``last`` of them are read); key: ``[B, Hkv, S, D]``.
    """
    batch, heads, q_len, _ = query.shape
    kv_len = key.shape[2]
    n = block_size
    num_qb, num_kb, pad = block_grid(q_len, kv_len, n)
    last = min(last, q_len)
    probs = _last_queries_attention(query[:, :, -last:], key, key_valid, scaling, softcap)  # [B, H, w, S]
    columns = F.pad(probs.sum(dim=-2), (pad, 0)).view(batch, heads, num_kb, n).sum(dim=-1) / last  # [B, H, Nb]
    diagonals = F.pad(_diagonal_sums(probs), (0, num_kb * n - kv_len)) / last  # [B, H, Nb * n] by distance
    # a diagonal m * n + r lies (n - r) / n in block-diagonal m, r / n in m + 1
    by_offset = diagonals.view(batch, heads, num_kb, n)
    share = torch.arange(n, device=key.device, dtype=torch.float32) / n  # r / n
    block_diagonals = (by_offset * (1 - share)).sum(-1) + F.pad((by_offset * share).sum(-1), (1, 0))[..., :num_kb]
    own = num_kb - num_qb + torch.arange(num_qb, device=key.device)
    behind = (own[:, None] - torch.arange(num_kb, device=key.device)[None, :])  # [Qb, Nb] block-diagonal of a tile
    tiles = columns[:, :, None, :] + block_diagonals[:, :, behind.clamp(min=0)]  # [B, H, Qb, Nb]
    return tiles.masked_fill_(behind < 0, 0.0)


def _last_queries_attention(query: torch.Tensor, key: torch.Tensor, key_valid: torch.Tensor | None, scaling: float,
                            softcap: float | None) -> torch.Tensor:
    """``[B, H, w, S]`` float32, contiguous: the causal attention of ``query [B, H, w, D]``, the last
    ``w`` slots, over ``key [B, Hkv, S, D]`` and real keys (``key_valid [B, Hkv, S]`` or None); a
    query that sees no key gets zeros. The causal mask is applied to the last ``w x w`` keys alone
    (the only ones a last query may not see), in place: no ``w x S`` mask is built."""
    batch, heads, window, _ = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    logits = reference.grouped_logits(query, key, scaling, softcap).view(batch, heads, window, kv_len)
    future = torch.ones(window, window, dtype=torch.bool, device=key.device).triu_(1)  # [w, w] keys after a query
    logits[..., kv_len - window:].masked_fill_(future, -torch.inf)
    if key_valid is None:
        return torch.softmax(logits, dim=-1)
    real = reference.expand_kv_heads(key_valid, heads // kv_heads)[:, :, None, :]  # [B, H, 1, S]
    return torch.softmax(logits.masked_fill_(~real, -torch.inf), dim=-1).nan_to_num_(0.0)


def _diagonal_sums(probs: torch.Tensor) -> torch.Tensor:
    """``[B, H, S]``: ``probs [B, H, w, S]`` (contiguous; query ``i`` is slot ``S - w + i``) summed
    along each distance ``d = S - w + i - c`` of query and key (keys after a query, ``d < 0``,
    carry nothing). Distances up to ``S - w`` read one strided view (query ``i``'s row shifted by
    ``i``: stride ``S + 1``), no index; the larger ones (keys ``c < i``) come from the corner
    ``[w, w]``."""
    batch, heads, window, kv_len = probs.shape
    width = kv_len - window + 1  # distances 0 .. S - w: key c = i + j, d = S - w - j
    shifted = probs.as_strided((batch, heads, window, width), (heads * window * kv_len, window * kv_len, kv_len + 1, 1),
                               probs.storage_offset())
    near = shifted.sum(dim=-2).flip(-1)  # [B, H, S - w + 1] by distance 0 .. S - w
    corner = probs[..., :window].tril(-1)  # [B, H, w, w] keys c < i: distance S - w + (i - c)
    rows = torch.arange(window, device=probs.device)
    gap = (rows[:, None] - rows[None, :]).clamp_(min=0)  # [w, w] i - c
    far = probs.new_zeros(batch, heads, window).scatter_add_(
        -1, gap.reshape(1, 1, -1).expand(batch, heads, -1), corner.reshape(batch, heads, -1))  # [B, H, w] by i - c
    return torch.cat([near, far[..., 1:]], dim=-1)  # [B, H, S]


def block_index(
    scores: torch.Tensor | None,
    num_qb: int,
    num_kb: int,
    first_block: torch.Tensor,
    sink: int,
    local: int | torch.Tensor,
    density: float | torch.Tensor | None = None,
    threshold: float | None = None,
) -> torch.Tensor:
    """Block lists ``[B, H, Qb, K]`` (int32, ``-1`` = none) for
    :func:`kvx.kernels.block_sparse.block_sparse_attention`.

    Each list holds the key blocks its query block may see (from ``first_block [B, H]``, a row's
    first real block, up to its own) that are among: the first ``sink`` of them, the last ``local``
    (its own included), and the best ``scores [B, H, Qb, Nb]`` up to ``ceil(density * visible)``
    blocks, or up to the fewest whose scores (normalised over the visible blocks) sum to
    ``threshold``; a list never holds fewer than its sink and local blocks. ``scores`` None: sink
    and local blocks alone (A-shape). ``local`` and ``density`` may be ``[H]`` tensors, one per
    query head (a searched pattern file, :mod:`kvx.methods.head_patterns`; a density of 0 keeps the
    sink and local blocks alone).
    """
    batch, heads = first_block.shape
    device = first_block.device
    if isinstance(local, torch.Tensor):
        local = local.to(device)[:, None, None]  # [H, 1, 1]
    if isinstance(density, torch.Tensor):
        density = density.to(device, torch.float64)[:, None]  # [H, 1]
    blocks = torch.arange(num_kb, device=device)
    own = (num_kb - num_qb + torch.arange(num_qb, device=device))[:, None]  # [Qb, 1]
    first = first_block[:, :, None, None]  # [B, H, 1, 1]
    visible = (blocks >= first) & (blocks <= own)  # [B, H, Qb, Nb]
    forced = visible & ((blocks < first + sink) | (blocks > own - local))
    # counted, not summed over the [B, H, Qb, Nb] masks: a list sees blocks first .. own, and forces the
    # first sink and the last local of them
    seen = (own[:, 0] - first[..., 0] + 1).clamp(min=0)  # [B, H, Qb]
    count = seen.clamp(max=sink + local) if isinstance(local, int) else torch.minimum(seen, sink + local[..., 0].long())
    if scores is None:
        rank_by = forced.float().masked_fill(~visible, -torch.inf)
    else:
        weights = scores.float().masked_fill(~visible, 0.0)
        rank_by = torch.where(forced, torch.inf, weights.masked_fill(~visible, -torch.inf))
        if density is not None:
            wanted = torch.ceil(density * seen.double() - 1e-9).long()
            count = torch.maximum(count, wanted.clamp(max=seen))
        elif threshold is not None:
            count = torch.maximum(count, _threshold_count(weights, rank_by, threshold).clamp(max=seen))
    width = max(1, int(count.max()))
    top = rank_by.topk(width, dim=-1, sorted=True).indices  # [B, H, Qb, K]
    index = torch.where(torch.arange(width, device=device) < count[..., None], top, -1)
    return index.to(torch.int32)


def _threshold_count(weights: torch.Tensor, rank_by: torch.Tensor, threshold: float) -> torch.Tensor:
    """``[B, H, Qb]`` the fewest blocks, taken in ``rank_by`` order (forced ones first), whose
    ``weights`` (normalised per list) sum to ``threshold`` or more."""
    order = rank_by.argsort(dim=-1, descending=True, stable=True)
    mass = weights.gather(-1, order)
    mass = mass / mass.sum(-1, keepdim=True).clamp(min=1e-30)
    before = mass.cumsum(-1) - mass  # mass of the blocks ranked ahead of each
    return (before < threshold - 1e-6).sum(-1)
