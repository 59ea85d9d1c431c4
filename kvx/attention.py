"""The attention function kvx registers with transformers: a thin, storage-agnostic sequence.

One patched attention call (the model has already computed q, k, v, norms and RoPE, and has
appended k, v to its cache layer, a storage kind of :mod:`kvx.storage`):

1. the storage records padding among the new tokens and gives the mask over what it holds
   (``begin_step``);
2. the attention method (:mod:`kvx.methods`) computes the new queries' output through the storage
   (and, for a policy that reads them (H2O), the column sums of that attention where one pass gives both);
3. the selection policy (:mod:`kvx.policies`) reads the storage's scoring view and returns what to
   keep; the storage drops the rest (``apply_selection``).

Nothing here knows a storage layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kvx.cache import KVCache
from kvx.compat import attention_function, register_attention
from kvx.compose import Composed
from kvx.kernels import reference
from kvx.methods import Dense, Method
from kvx.policy import CompressionView, Phase, Policy
from kvx.storage.base import Storage

ATTN_IMPLEMENTATION = "kvx"
CONTEXT_ATTR = "_kvx_context"


@dataclass
class PatchState:
    """Model-wide state of one patch: the policy as given, its axes (the policy as a composition,
    with the storage a selection needs), and the cache of the forward in progress."""

    policy: Policy
    axes: Composed
    model_type: str
    original_attn_implementation: str
    original_chunk_size: int | None = None
    chunk_size: int | None = None
    wrapped_generate: Any = None  # the generate() patch gave the model (drops chunking where impossible)
    original_generate: Any = None  # the instance generate() the model had before, if any
    hook_handles: list[Any] = field(default_factory=list)
    active_cache: KVCache | None = None
    method: Method = field(default_factory=Dense)
    ropes: dict[int, Any] = field(default_factory=dict)  # layer -> the model's RoPE, for storage that needs it


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


def _phase(layer: Storage, q_len: int) -> Phase:
    if layer.past_seen == 0:
        return "prefill"
    return "decode" if q_len == 1 else "extend"


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
    if not isinstance(layer, Storage):  # no cache, or a layer kvx leaves to the model (sliding window...)
        out = reference.attention(query, key, value, attention_mask, scaling, softcap, s_aux)
        return out.transpose(1, 2).contiguous(), None
    layer.check_attended(module, context.layer_idx, key)
    mask = layer.begin_step(attention_mask, query.shape[-2], query.shape[1])
    try:
        method = context.state.method.for_layer(context.state.active_cache, context.layer_idx)
        phase = _phase(layer, query.shape[-2])
        axes = context.state.axes
        # not once the cache is frozen, nor in a phase where the policy promises to do nothing
        selects = not context.state.active_cache.frozen and axes.wants_view_at(phase, layer.seen)
        column_sums = None
        if selects and s_aux is None and axes.reads_column_sums(phase):
            out, column_sums = method.attend_with_column_sums(layer, query, key, value, mask, scaling, softcap)
        else:
            out = method.attend(layer, query, key, value, mask, scaling, softcap, s_aux)
        if selects:
            _select(context, layer, query, mask, scaling, softcap, phase, column_sums)
    finally:
        layer.end_step()
    return out.transpose(1, 2).contiguous(), None


def _select(context: LayerContext, layer: Storage, query, mask, scaling: float, softcap: float | None, phase: Phase,
            column_sums: torch.Tensor | None) -> None:
    """Ask the selection policy what to keep in ``phase``, and have the storage drop the rest.
    ``column_sums``: what the attention pass computed for the policy, or None."""
    policy = context.state.axes
    inputs = layer.scoring_inputs(query, mask)
    view = CompressionView(
        query=query,
        keys=inputs.keys,
        values=inputs.values,
        valid=inputs.valid,
        attention_mask=inputs.attention_mask,
        phase=phase,
        layer_idx=context.layer_idx,
        scaling=scaling,
        softcap=softcap,
        num_seen=layer.seen,
        num_layers=len(context.state.active_cache.layers),
        state=inputs.state,
        seen_per_row=layer.real_seen.to(inputs.keys.device),
        mask_rows=inputs.mask_rows,
        column_sums=column_sums,
    )
    layer.apply_selection(policy.select_mask(view), inputs)
