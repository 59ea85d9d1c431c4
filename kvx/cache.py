"""The kvx KV cache: a transformers ``Cache`` whose layers store only what the policy keeps.

Contract with transformers (the one ``DynamicSlidingWindowLayer`` follows):

- ``get_seq_length()`` is the number of tokens *seen*, so RoPE positions of new tokens stay
  logical after eviction;
- ``get_mask_sizes()`` describes what is *stored*, so masks match storage.

Storage of a compressible layer is ``keys/values [B, Hkv, S, D]`` (GQA never expanded) plus an
optional ``valid [B, Hkv, S]`` bool that marks padding slots (rows of a batch that own fewer
tokens than the widest row). Evicted tokens are really gone: the tensors are re-gathered, and the
old ones freed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvx.compat import (
    Cache,
    CacheLayerMixin,
    DynamicCache,
    DynamicSlidingWindowLayer,
    PretrainedConfig,
    decoder_config,
    default_cache_layers,
    is_dense_layer,
    is_sliding_layer,
)
from kvx.compose import from_spec, to_spec
from kvx.policy import Policy, list_policies
from kvx.storage import make_layer
from kvx.storage.base import Storage


def _storage_policy(storage: str) -> Policy | None:
    """The storage policy a spec names (``ragged``, ``kivi:bits=2``), or None for ``dense``."""
    def choices() -> str:
        names = [p["name"] for p in list_policies() if p["axis"] == "storage"]
        return f"dense, or a storage policy with options ({', '.join(names)}; e.g. 'kivi:bits=2')"

    if not isinstance(storage, str):
        raise TypeError(f"KVCache storage must be a string: {choices()}; got {type(storage).__name__}")
    if storage == "dense":
        return None
    try:
        policy = from_spec(storage)
    except (TypeError, ValueError) as err:
        raise ValueError(f"KVCache storage {storage!r}: {err}") from None
    if policy.axis != "storage":
        raise ValueError(f"KVCache storage {storage!r} is a {policy.axis} policy; choose {choices()}")
    return policy


def _layer_tensors(layer: CacheLayerMixin) -> list[torch.Tensor]:
    if isinstance(layer, Storage):
        return layer.held_tensors()
    if isinstance(layer, DynamicSlidingWindowLayer):
        return _keys_values(layer)
    return _tensors_held(layer)


def _keys_values(layer: CacheLayerMixin) -> list[torch.Tensor]:
    """The key and value tensors of a transformers cache layer (none for one that holds no KV)."""
    return [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if isinstance(t, torch.Tensor)]


def _tensors_held(layer: Any) -> list[torch.Tensor]:
    """Every tensor a cache layer of transformers' own holds, directly or in a list / dict
    attribute (linear-attention layers keep ``conv_states`` and ``recurrent_states`` dicts)."""
    found = []
    for value in vars(layer).values():
        items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
        found.extend(item for item in items if isinstance(item, torch.Tensor))
    return found


def _held_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the storage behind ``tensors``, each storage counted once: a view that pins a
    larger tensor is charged for all of it."""
    storages = {}
    for t in tensors:
        storage = t.untyped_storage()
        storages[(storage.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def layer_nbytes(layer: CacheLayerMixin) -> int:
    """Bytes of every tensor a cache layer holds (keys, values and bookkeeping masks)."""
    return _held_bytes(_layer_tensors(layer))


def cache_nbytes(cache: Cache | None) -> int:
    """Bytes held by any transformers cache (a kvx one or a plain ``DynamicCache``)."""
    return 0 if cache is None else _held_bytes([t for layer in cache.layers for t in _layer_tensors(layer)])


def _kv_bytes(layer: CacheLayerMixin) -> int:
    if isinstance(layer, Storage):
        return _held_bytes(layer.kv_tensors())
    return _held_bytes(_keys_values(layer))


class SlidingWindowLayer(DynamicSlidingWindowLayer):
    """transformers' sliding-window layer, minus one leak: after a long prefill it would keep a
    view of the whole prompt's keys/values alive; this copies the window out instead."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        if self.keys.untyped_storage().nbytes() > 2 * self.keys.nbytes:
            self.keys, self.values = self.keys.clone(), self.values.clone()
        return keys, values


@dataclass
class LayerStats:
    """What one cache layer holds. ``kept_min``/``kept_max`` range over rows and KV heads."""

    layer: int
    kind: str  # "compressed" / "ragged" (policy applies), "sliding(W)" (the model's own window), "model(Class)"
    seen: int
    stored: int
    kept_min: int
    kept_max: int
    nbytes: int
    kv_bytes: int = 0  # keys and values alone (nbytes adds bookkeeping: padding masks, offsets, stats)
    kept_per_head: list[list[int]] | None = None  # [B][Hkv], given where heads differ
    blocks_computed: int | None = None  # attention blocks a block-sparse method computed for the prompt ...
    blocks_causal: int | None = None  # ... of the causal ones (their ratio: the density it really ran at)
    decode_keys_read: int | None = None  # real keys a decode-sparse method (quest, tidal) read at decode ...
    decode_keys_total: int | None = None  # ... of those stored (summed over steps, rows and query heads)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


class KVCache(Cache):
    """A transformers ``Cache`` for a kvx-patched model.

    Full-attention layers get the storage kind of the policy (:mod:`kvx.storage`), which the policy compresses; sliding-window
    layers (Gemma 2/3, Mistral with ``sliding_window``) keep transformers' window layer, which
    already bounds them to ``sliding_window`` tokens, and are not compressed further. Layers that
    are not attention (Mamba, gated delta-net, linear attention and convolution layers of hybrid
    models) keep the cache layer transformers gives them.

    ``patch`` makes the model build one of these whenever it would build a cache, so ``generate()``,
    plain forward loops and wrappers such as lm-eval's ``HFLM`` need no change. To create one
    by hand: ``kvx.KVCache(model.config)``.
    """

    def __init__(self, config: PretrainedConfig, storage: str = "dense"):
        if not isinstance(config, PretrainedConfig):
            raise TypeError(f"kvx.KVCache needs the model's config (model.config), got {type(config).__name__}")
        storage_policy = _storage_policy(storage)
        self.storage = "dense" if storage_policy is None else to_spec(storage_policy)
        layers = [
            make_layer(storage_policy) if is_dense_layer(layer)
            else SlidingWindowLayer(sliding_window=layer.sliding_window) if is_sliding_layer(layer)
            else layer  # not plain attention (linear attention, convolution, shared KV...): transformers' own
            for layer in default_cache_layers(decoder_config(config))
        ]
        super().__init__(layers=layers)
        for idx, layer in enumerate(self.layers):
            if isinstance(layer, Storage):
                layer.layer_idx = idx
        self.frozen = False  # True: nothing more is evicted (see kvx.compress_context)
        self.method_state: dict[str, Any] = {}  # a method's state across the layers of one forward (tidal)

    @classmethod
    def convert_in_place(cls, cache: Any, config: PretrainedConfig, storage: str = "dense") -> KVCache:
        """Turn an empty ``DynamicCache`` (what ``generate()`` builds, or what a caller made and
        will pass again) into a kvx cache, keeping the object, so every reference to it sees the
        compressed cache. Anything else raises."""
        if type(cache) is not DynamicCache:
            raise ValueError(
                f"a kvx-patched model stores its KV in a kvx.KVCache, but was given a {type(cache).__name__}; "
                "drop cache_implementation / past_key_values, or pass kvx.KVCache(model.config)"
            )
        if cache.get_seq_length() > 0:
            raise ValueError(
                "a kvx-patched model was given a DynamicCache that already holds tokens; "
                "pass the kvx cache from an earlier call (output.past_key_values), or an empty one"
            )
        cache.__dict__.clear()
        cache.__class__ = cls
        cls.__init__(cache, config, storage)
        return cache

    def bind_ropes(self, ropes: dict[int, Any]) -> None:
        """Give the layers that store keys before RoPE (``kvquant``) their model's RoPE
        (:class:`kvx.compat.Rope`, by layer index); ``kvx.patch`` does it for every cache it uses."""
        for idx, rope in ropes.items():
            if getattr(self.layers[idx], "needs_rope", False):
                self.layers[idx].rope = rope

    def real_tokens_seen(self) -> torch.Tensor | None:
        """``[B]`` real (non-padding) tokens seen per row, or None before any compressed layer has any."""
        return next((layer.real_seen for layer in self.layers
                     if isinstance(layer, Storage) and layer.real_seen is not None), None)

    def end_prompt(self) -> None:
        """The prompt is complete: every compressed layer stores it in its final form."""
        for layer in self.layers:
            if isinstance(layer, Storage):
                layer.end_prompt()

    def nbytes(self) -> int:
        """Bytes actually held by the cache, summed over every stored tensor of every layer."""
        return cache_nbytes(self)

    def stats(self) -> list[dict[str, Any]]:
        """Per layer: tokens seen and kept, slots stored, bytes (and kept per KV head where they differ)."""
        return [self._layer_stats(idx, layer).as_dict() for idx, layer in enumerate(self.layers)]

    def _layer_stats(self, idx: int, layer: CacheLayerMixin) -> LayerStats:
        keys = getattr(layer, "keys", None)
        stored = keys.shape[-2] if isinstance(keys, torch.Tensor) and keys.dim() >= 2 else 0
        if isinstance(layer, Storage):
            kept = layer.kept_per_head()
            low, high = (int(kept.min()), int(kept.max())) if kept.numel() else (0, 0)
            per_head = kept.tolist() if low != high else None
            computed, causal = layer.attention_blocks or (None, None)
            read, total = layer.decode_keys or (None, None)
            return LayerStats(idx, layer.kind, layer.seen, layer.stored_slots(), low, high, layer_nbytes(layer),
                              _kv_bytes(layer), per_head, computed, causal, read, total)
        if isinstance(layer, SlidingWindowLayer):
            kind = f"sliding({layer.sliding_window})"
        else:  # a layer transformers keeps for the model (not attention, or attention kvx leaves alone)
            kind = f"model({type(layer).__name__})"
        seen = layer.get_seq_length() if hasattr(layer, "get_seq_length") else 0
        return LayerStats(idx, kind, seen, stored, stored, stored, layer_nbytes(layer), _kv_bytes(layer))

    def format_stats(self) -> str:
        """The per-layer stats as an aligned text table."""
        rows = [("layer", "kind", "seen", "stored", "kept", "bytes")]
        for s in self.stats():
            kept = str(s["kept_min"]) if s["kept_min"] == s["kept_max"] else f"{s['kept_min']}-{s['kept_max']}"
            rows.append((str(s["layer"]), s["kind"], str(s["seen"]), str(s["stored"]), kept, str(s["nbytes"])))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)
