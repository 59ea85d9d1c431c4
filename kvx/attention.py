"""The attention function kvx registers with transformers, and the per-module context it reads.

Flow of one patched attention call (the model has already computed q, k, v, norms and RoPE, and
has appended k, v to the cache):

1. find this layer's cache storage through the context ``patch`` attached to the module;
2. build the mask over what is stored (evicted tokens are gone, padding slots are masked);
3. compute attention for the new queries over everything stored;
4. ask the policy which tokens to keep, and drop the rest from storage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kvx.cache import KVCache
from kvx.compat import attention_function, register_attention
from kvx.kernels import reference
from kvx.kernels.ragged_decode import ragged_decode_attention
from kvx.policy import CompressionView, Phase, Policy
from kvx.storage import DenseLayer, RaggedLayer

ATTN_IMPLEMENTATION = "kvx"
CONTEXT_ATTR = "_kvx_context"


@dataclass
class PatchState:
    """Model-wide state of one patch: the policy, and the cache of the forward in progress."""

    policy: Policy
    model_type: str
    original_attn_implementation: str
    original_chunk_size: int | None = None
    chunk_size: int | None = None
    hook_handles: list[Any] = field(default_factory=list)
    active_cache: KVCache | None = None


@dataclass
class LayerContext:
    """Attached by ``patch`` to each attention module as ``module._kvx_context``."""

    state: PatchState
    layer_idx: int | None  # None: attention kvx leaves to the model (a vision tower, bidirectional)

    def cache_layer(self):
        cache = self.state.active_cache
        return None if cache is None or self.layer_idx is None else cache.layers[self.layer_idx]


def register() -> None:
    """Register kvx's attention and mask functions under ``"kvx"`` (idempotent, additive only)."""
    register_attention(ATTN_IMPLEMENTATION, kvx_attention)


def _phase(layer: DenseLayer, q_len: int) -> Phase:
    if layer.past_seen == 0:
        return "prefill"
    return "decode" if q_len == 1 else "extend"


def _mask_over_storage(
    layer: DenseLayer, given: torch.Tensor | None, q_len: int, num_heads: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Mask for the new queries over the stored keys, and which stored slots are real tokens.

    Args:
        layer: the layer after ``update`` (new tokens appended).
        given: the mask transformers built, ``[B, 1, q, past_stored + q]`` bool or None.
    Returns:
        ``(mask [B|1, 1|H, q, S] or None, valid [B, Hkv, S] or None)``; None = nothing masked
        (beyond plain causal attention for the mask).
    """
    batch, kv_heads, num_stored = layer.keys.shape[:3]
    if not layer.has_evicted and layer.valid is None and (given is None or given.shape[-1] == num_stored):
        # storage is exactly what a dense cache would hold: transformers' mask is right as is
        # (at prefill this is where padding is first recorded, from the mask's last query row)
        valid = None if given is None else given[:, None, 0, -1, :].expand(batch, kv_heads, num_stored)
        return given, valid

    past = layer.past_stored
    if given is None:
        new_cols = reference.causal_mask(q_len, q_len, layer.keys.device)  # [1, 1, q, q]
        new_valid = torch.ones(batch, q_len, dtype=torch.bool, device=layer.keys.device)
    else:
        new_cols = given[..., -q_len:]  # causal + padding among the new tokens
        new_valid = given[:, 0, -1, -q_len:]
    past_valid = layer.valid[..., :past] if layer.valid is not None else None

    if past_valid is None:  # every stored token is real: one mask serves all heads
        if given is None and q_len == 1:
            return None, None
        mask = torch.cat([new_cols.new_ones(new_cols.shape[0], 1, q_len, past), new_cols], dim=-1)
        valid = torch.cat([new_valid.new_ones(batch, past), new_valid], dim=-1)
        return mask, valid[:, None, :].expand(batch, kv_heads, num_stored)

    valid = torch.cat([past_valid, new_valid[:, None, :].expand(batch, kv_heads, q_len)], dim=-1)
    if _heads_share_padding(past_valid):  # one mask serves all heads: [B, 1, q, S], not [B, H, q, S]
        past_cols = past_valid[:, :1, None, :].expand(batch, 1, q_len, past)
        return torch.cat([past_cols, new_cols.expand(batch, 1, q_len, q_len)], dim=-1), valid
    groups = num_heads // kv_heads
    past_cols = reference.expand_kv_heads(past_valid, groups)[:, :, None, :].expand(batch, num_heads, q_len, past)
    mask = torch.cat([past_cols, new_cols.expand(batch, num_heads, q_len, q_len)], dim=-1)
    return mask, valid


def _heads_share_padding(valid: torch.Tensor) -> bool:
    """Whether every KV head of a row holds its padding in the same slots: the usual case, since
    heads keep equal counts, right-aligned (``valid [B, Hkv, S]``)."""
    return bool((valid == valid[:, :1]).all())


IGNORED_KWARGS = frozenset({
    "position_ids", "cache_position", "use_cache", "output_attentions", "output_hidden_states", "return_dict",
    "sliding_window",  # the mask transformers builds for the layer already holds the window
    "position_embeddings", "is_causal", "dropout", "layer_idx", "logits_to_keep", "token_type_ids",
})
"""Keyword arguments the attention function may receive that change nothing it computes."""


def _check_kwargs(module: torch.nn.Module, kwargs: dict[str, Any]) -> None:
    """Refuse a tensor argument kvx does not know how to honour (a per-head bias, sparse indices...):
    ignoring it would give silently different outputs."""
    unknown = sorted(name for name, value in kwargs.items()
                     if name not in IGNORED_KWARGS and isinstance(value, torch.Tensor))
    if unknown:
        raise ValueError(
            f"{type(module).__name__} passes {', '.join(unknown)} to its attention function, which kvx cannot "
            f"honour; unpatch this model (kvx.unpatch) and run it without kvx"
        )


def _check_stored(module: torch.nn.Module, layer_idx: int, key: torch.Tensor, layer: DenseLayer) -> None:
    """The keys a module attends over must be what its cache layer stores: a model that writes to
    another layer, or caches something else (a latent) and expands it, would be compressed wrongly."""
    if key.shape[2] != layer.keys.shape[2] or key.shape[1] % layer.keys.shape[1]:  # (GQA expanded after update: ok)
        raise ValueError(
            f"kvx does not support this model: {type(module).__name__} (layer {layer_idx}) attends over keys of "
            f"shape {tuple(key.shape)}, but its cache layer holds {tuple(layer.keys.shape)} (the module calls its "
            "attention function more than once per cache update, or attends over keys it did not store there)"
        )


def kvx_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: ``query [B, H, q, D]``, ``key [B, Hkv, S, D]``, ``value
    [B, Hkv, S, Dv]`` (after ``cache.update``) -> ``(out [B, q, H, Dv], None)``.

    ``s_aux``: learned attention sinks ``[H]`` (gpt-oss and others), honoured on every path."""
    context: LayerContext | None = getattr(module, CONTEXT_ATTR, None)
    if context is None:
        raise RuntimeError(
            f"kvx attention was called on {type(module).__name__}, which kvx.patch did not set up; "
            "patch the model with kvx.patch(model, policy) instead of setting attn_implementation='kvx' by hand"
        )
    if context.layer_idx is None:  # not cached token by token: transformers' own SDPA, unchanged
        return attention_function("sdpa")(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
    _check_kwargs(module, kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    layer = context.cache_layer()
    if isinstance(layer, DenseLayer):
        _check_stored(module, context.layer_idx, key, layer)
    if not isinstance(layer, DenseLayer):  # no cache, or a layer kvx leaves to the model (sliding window...)
        out = reference.attention(query, key, value, attention_mask, scaling, softcap, s_aux)
        return out.transpose(1, 2).contiguous(), None

    q_len = query.shape[-2]
    mask, valid = _mask_over_storage(layer, attention_mask, q_len, query.shape[1])
    layer.set_valid(valid)
    layer.count_real(None if valid is None else valid[:, 0, -q_len:], query.shape[0], q_len)
    dense_view = None
    if isinstance(layer, RaggedLayer) and layer.has_prefix:
        if q_len == 1:  # decode: read the packed prefix directly (the ragged kernel), merge with the tail
            out = _decode_with_prefix(query, key, value, mask, layer, scaling, softcap, s_aux)
        else:  # several queries: one pass over the dense view, which the policy then scores on
            dense_view = layer.dense_view()
            out = _attend_over_view(query, dense_view, layer.keys.shape[-2], mask, scaling, softcap, s_aux)
    else:
        out = reference.attention(query, key, value, mask, scaling, softcap, s_aux)
    _compress(context, layer, query, mask, scaling, softcap, dense_view)
    return out.transpose(1, 2).contiguous(), None


def _decode_with_prefix(query, key, value, mask, layer: RaggedLayer, scaling: float, softcap: float | None,
                        sinks: torch.Tensor | None = None):
    """One new query per head over a ragged layer: its packed per-head prefix (the ragged decode
    kernel) and its dense tail, merged by log-sum-exp (with the attention sinks, if any)."""
    tail = reference.attention_with_lse(query, key, value, mask, scaling, softcap)
    prefix = ragged_decode_attention(query, layer.prefix_keys, layer.prefix_values, layer.prefix_offsets, scaling, softcap)
    parts = [prefix, tail] if sinks is None else [prefix, tail, reference.sink_part(sinks, tail[0])]
    return reference.merge_attention(parts).to(query.dtype)


VIEW_BLOCK_ELEMENTS = 2**25  # mask entries per query block in _attend_over_view (32 MB of bool)


def _attend_over_view(query, view, tail_len: int, tail_mask, scaling: float, softcap: float | None,
                      sinks: torch.Tensor | None = None):
    """Several new queries ``[B, H, q, D]`` over a ragged layer's dense view ``(keys, values [B,
    Hkv, P + T, D], valid [B, Hkv, P + T])``: SDPA a block of queries at a time, so the per-head
    mask (and any score matrix SDPA builds for it) is ``block x (P + T)``, never ``q x (P + T)``."""
    batch, heads, q_len = query.shape[:3]
    keys, values, valid = view
    block = min(1024, max(16, VIEW_BLOCK_ELEMENTS // (batch * heads * keys.shape[-2])))
    outs = []
    for start in range(0, q_len, block):
        stop = min(start + block, q_len)
        mask = _view_mask(valid, tail_len, tail_mask, query.shape, start, stop)
        outs.append(reference.attention(query[:, :, start:stop], keys, values, mask, scaling, softcap, sinks))
    return torch.cat(outs, dim=2)


def _compress(context: LayerContext, layer: DenseLayer, query, mask, scaling: float, softcap: float | None,
              dense_view=None) -> None:
    """Ask the policy what to keep, and drop the rest from storage (not once the cache is frozen).
    ``dense_view``: a ragged layer's :meth:`RaggedLayer.dense_view`, where attention built it already."""
    policy, phase = context.state.policy, _phase(layer, query.shape[-2])
    if context.state.active_cache.frozen or not policy.wants_view(phase):
        return
    ragged = isinstance(layer, RaggedLayer)
    if ragged and dense_view is None:
        dense_view = layer.dense_view()
    keys, values, valid = dense_view if ragged else (layer.keys, layer.values, layer.valid)
    if valid is None:
        valid = torch.ones(keys.shape[:3], dtype=torch.bool, device=keys.device)
    mask_rows = None
    state = layer.dense_state() if ragged else layer.state
    if ragged and layer.has_prefix:
        tail_mask, tail_len, q_len = mask, layer.keys.shape[-2], query.shape[-2]
        mask, mask_rows = None, lambda last: _view_mask(valid, tail_len, tail_mask, query.shape, q_len - last, q_len)
    view = CompressionView(
        query=query,
        keys=keys,
        values=values,
        valid=valid,
        attention_mask=mask,
        phase=phase,
        layer_idx=context.layer_idx,
        scaling=scaling,
        softcap=softcap,
        num_seen=layer.seen,
        num_layers=len(context.state.active_cache.layers),
        state=state,
        seen_per_row=layer.real_seen.to(keys.device),
        mask_rows=mask_rows,
    )
    keep = policy.select_mask(view)
    if ragged:  # the statistics of a ragged layer were unpacked for the view: pack them back
        layer.keep_mask(keep, state, dense_view) if keep is not None else layer.store_state(state)
    elif keep is not None:
        layer.keep_mask(keep)


def _view_mask(valid, tail_len: int, tail_mask, query_shape, start: int, stop: int) -> torch.Tensor:
    """Mask ``[B, H, stop - start, P + T]`` of new queries ``start:stop`` over a ragged layer's dense
    view: every real prefix token of the query's KV head, then the tail under ``tail_mask``
    (``[B|1, 1|H, q, T]``, or None for causal)."""
    batch, heads, q_len = query_shape[:3]
    kv_heads, num_keys = valid.shape[1:]
    rows = stop - start
    prefix_cols = reference.expand_kv_heads(valid[..., : num_keys - tail_len], heads // kv_heads)[:, :, None, :]
    prefix_cols = prefix_cols.expand(batch, heads, rows, num_keys - tail_len)
    if tail_mask is None:
        tail_mask = reference.causal_mask(q_len, tail_len, valid.device)
    return torch.cat([prefix_cols, tail_mask[..., start:stop, :].expand(batch, heads, rows, -1)], dim=-1)
