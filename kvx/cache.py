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
    mask_query_length,
)
from kvx.policy import mask_to_indices


class CompressedLayer(CacheLayerMixin):
    """KV storage of one full-attention layer, compressed by a policy.

    Attributes:
        keys, values: ``[B, Hkv, S, D]`` stored tokens in temporal order.
        valid: ``[B, Hkv, S]`` bool or None (None = every slot holds a real token).
        state: per-token policy statistics, name -> ``[B, Hkv, S]``, kept aligned with storage.
        seen: tokens this layer has been given in total (the logical sequence length).
        past_stored, past_seen: stored / seen counts before the latest ``update``.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, **kwargs: Any):
        super().__init__()
        self.valid: torch.Tensor | None = None
        self.state: dict[str, torch.Tensor] = {}
        self.real_seen: torch.Tensor | None = None  # [B] real tokens seen per row (CPU)
        self.seen = 0
        self.past_stored = 0
        self.past_seen = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states[..., :0, :]
        self.values = value_states[..., :0, :]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Append ``[B, Hkv, q, D]`` new keys/values; return everything stored (new tokens last)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.past_stored, self.past_seen = self.num_stored, self.seen
        self.seen += key_states.shape[-2]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        if self.valid is not None:
            new_valid = self.valid.new_ones(*self.valid.shape[:2], key_states.shape[-2])
            self.valid = torch.cat([self.valid, new_valid], dim=-1)
        for name, stat in self.state.items():
            self.state[name] = torch.cat([stat, stat.new_zeros(*stat.shape[:2], key_states.shape[-2])], dim=-1)
        return self.keys, self.values

    @property
    def num_stored(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    @property
    def has_evicted(self) -> bool:
        """Whether any token seen before the latest update is no longer stored."""
        return self.past_stored != self.past_seen

    def keep_mask(self, keep: torch.Tensor) -> None:
        """Keep only the tokens marked in ``keep [B, Hkv, S]``; free the rest. Rows or heads that
        keep fewer than the most get padding slots on the left, marked invalid."""
        indices, slot_valid = mask_to_indices(keep)
        # keys and values may differ in head dim (MLA: rope + nope key dims vs the value dim)
        self.keys = self.keys.gather(2, indices[..., None].expand(-1, -1, -1, self.keys.shape[-1]))
        self.values = self.values.gather(2, indices[..., None].expand(-1, -1, -1, self.values.shape[-1]))
        valid = slot_valid if self.valid is None else self.valid.gather(2, indices) & slot_valid
        self.set_valid(valid)
        for name, stat in self.state.items():
            self.state[name] = stat.gather(2, indices)

    def count_real(self, new_valid: torch.Tensor | None, batch: int, new_tokens: int) -> None:
        """Add the real (non-padding) tokens of the latest update, ``new_valid [B, q]``, per row."""
        added = torch.full((batch,), new_tokens, dtype=torch.long) if new_valid is None else new_valid.sum(-1).cpu()
        self.real_seen = added if self.real_seen is None else self.real_seen + added

    def set_valid(self, valid: torch.Tensor | None) -> None:
        """Record which stored slots hold real tokens (None or all True: every slot)."""
        # a copy: `valid` is often a view of a much larger mask that must not stay alive
        self.valid = None if valid is None or bool(valid.all()) else valid.clone(memory_format=torch.contiguous_format)

    def kept_per_head(self) -> torch.Tensor:
        """``[B, Hkv]`` real tokens stored per row and KV head."""
        if self.keys is None:
            return torch.zeros(0, 0, dtype=torch.long)
        if self.valid is None:
            return torch.full(self.keys.shape[:2], self.num_stored, dtype=torch.long)
        return self.valid.sum(-1).cpu()

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        query_length = mask_query_length(query_length)
        # the stored tokens stand in for the last `num_stored` positions; kvx's attention rebuilds
        # the part of the mask over them from `valid`, and uses the rest for the new tokens
        return self.num_stored + query_length, self.seen - self.num_stored

    def get_max_length(self) -> int:
        return -1

    get_max_cache_shape = get_max_length  # its name before transformers 5.10

    def reset(self) -> None:
        self.keys = self.values = self.valid = self.real_seen = None
        self.state = {}
        self.is_initialized = False
        self.seen = self.past_stored = self.past_seen = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "kvx compressed layers cannot be cropped (tokens may already be evicted); "
            "assisted/speculative decoding is not supported on a kvx-patched model yet"
        )

    def _select_batch(self, fn) -> None:
        if self.keys is not None:
            self.keys, self.values = fn(self.keys), fn(self.values)
            if self.valid is not None:
                self.valid = fn(self.valid)
            self.state = {name: fn(stat) for name, stat in self.state.items()}
            if self.real_seen is not None:
                self.real_seen = fn(self.real_seen.to(self.keys.device)).cpu()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_batch(lambda t: t[indices, ...])


class RaggedLayer(CompressedLayer):
    """KV storage where each KV head keeps its own number of tokens (head-wise budgets).

    Two parts: a *prefix* packed per (row, KV head) segment, with no padding to the longest head
    (``prefix_keys/prefix_values [N, D]``, ``prefix_offsets [B * Hkv + 1]``, see
    ``kvx.kernels.reference.pack_ragged``), and a dense *tail* (``keys/values [B, Hkv, T, D]``,
    inherited) of the tokens appended since the last compression. Attention reads both and merges
    them by log-sum-exp; a compression re-packs everything into the prefix.
    """

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.prefix_keys: torch.Tensor | None = None
        self.prefix_values: torch.Tensor | None = None
        self.prefix_offsets: torch.Tensor | None = None
        self.prefix_state: dict[str, torch.Tensor] = {}  # per-token policy statistics, packed like the keys

    @property
    def has_prefix(self) -> bool:
        return self.prefix_offsets is not None

    def dense_view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Everything stored as ``(keys, values [B, Hkv, P + T, D], valid [B, Hkv, P + T])``, the
        prefix padded to its longest head (a transient view for scoring)."""
        from kvx.kernels.reference import unpack_ragged

        batch, kv_heads, tail = self.keys.shape[:3]
        tail_valid = self.valid if self.valid is not None else self.keys.new_ones(batch, kv_heads, tail, dtype=torch.bool)
        if not self.has_prefix:
            return self.keys, self.values, tail_valid
        keys, valid = unpack_ragged(self.prefix_keys, self.prefix_offsets, batch, kv_heads)
        values, _ = unpack_ragged(self.prefix_values, self.prefix_offsets, batch, kv_heads)
        return torch.cat([keys, self.keys], 2), torch.cat([values, self.values], 2), torch.cat([valid, tail_valid], -1)

    def dense_state(self) -> dict[str, torch.Tensor]:
        """The per-token statistics aligned with :meth:`dense_view`: name -> ``[B, Hkv, P + T]``."""
        from kvx.kernels.reference import unpack_ragged

        if not self.has_prefix:
            return dict(self.state)
        batch, kv_heads, tail = self.keys.shape[:3]
        dense = {}
        for name in set(self.state) | set(self.prefix_state):
            prefix = self.prefix_state.get(name)
            prefix = (unpack_ragged(prefix, self.prefix_offsets, batch, kv_heads)[0] if prefix is not None
                      else self.keys.new_zeros(batch, kv_heads, int(self.prefix_offsets.diff().max()), dtype=torch.float32))
            tail_stat = self.state.get(name, prefix.new_zeros(batch, kv_heads, tail))
            dense[name] = torch.cat([prefix, tail_stat], dim=-1)
        return dense

    def store_state(self, dense: dict[str, torch.Tensor]) -> None:
        """Write statistics given over :meth:`dense_view` back into the packed prefix and the tail."""
        from kvx.kernels.reference import pack_ragged, ragged_valid

        tail = self.keys.shape[-2]
        prefix_valid = ragged_valid(self.prefix_offsets, *self.keys.shape[:2]) if self.has_prefix and dense else None
        for name, stat in dense.items():
            self.state[name] = stat[..., stat.shape[-1] - tail :]
            if prefix_valid is not None:
                self.prefix_state[name] = pack_ragged(stat[..., : stat.shape[-1] - tail], prefix_valid)[0]

    def repack(self, keep: torch.Tensor, state: dict[str, torch.Tensor] | None = None,
               view: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
        """Keep the tokens marked in ``keep [B, Hkv, P + T]`` (a mask over :meth:`dense_view`),
        packed per head, with their statistics from ``state``; the tail starts empty again.
        ``view``: the :meth:`dense_view` the caller already built (saves building it again)."""
        from kvx.kernels.reference import pack_ragged

        keys, values, valid = self.dense_view() if view is None else view
        state = self.dense_state() if state is None else state
        keep = keep & valid
        self.prefix_keys, self.prefix_offsets = pack_ragged(keys, keep)
        self.prefix_values, _ = pack_ragged(values, keep)
        self.prefix_state = {name: pack_ragged(stat, keep)[0] for name, stat in state.items()}
        self.state = {name: stat[..., :0].clone() for name, stat in state.items()}
        self.keys, self.values = keys[..., :0, :].clone(), values[..., :0, :].clone()
        self.valid = None

    def keep_mask(self, keep: torch.Tensor, state: dict[str, torch.Tensor] | None = None,
                  view: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
        self.repack(keep, state, view)

    def kept_per_head(self) -> torch.Tensor:
        kept = super().kept_per_head()
        if self.has_prefix:
            kept = kept + self.prefix_offsets.diff().reshape(kept.shape).cpu()
        return kept

    def reset(self) -> None:
        super().reset()
        self.prefix_keys = self.prefix_values = self.prefix_offsets = None
        self.prefix_state = {}

    def _select_batch(self, fn) -> None:
        """Re-order or repeat rows (beam search): ``fn`` maps a ``[B, ...]`` tensor to ``[B', ...]``.
        The prefix is re-packed from the selected rows' segments."""
        if self.has_prefix:
            from kvx.kernels.reference import pack_ragged, ragged_valid, unpack_ragged

            batch, kv_heads = self.keys.shape[:2]
            offsets = self.prefix_offsets
            valid = fn(ragged_valid(offsets, batch, kv_heads))
            rows = {name: fn(unpack_ragged(packed, offsets, batch, kv_heads)[0])
                    for name, packed in (("keys", self.prefix_keys), ("values", self.prefix_values))}
            self.prefix_state = {name: pack_ragged(fn(unpack_ragged(stat, offsets, batch, kv_heads)[0]), valid)[0]
                                 for name, stat in self.prefix_state.items()}
            self.prefix_keys, self.prefix_offsets = pack_ragged(rows["keys"], valid)
            self.prefix_values = pack_ragged(rows["values"], valid)[0]
        super()._select_batch(fn)


def _layer_tensors(layer: CacheLayerMixin) -> list[torch.Tensor]:
    if not isinstance(layer, (CompressedLayer, DynamicSlidingWindowLayer)):
        return _tensors_held(layer)
    tensors = [getattr(layer, n, None) for n in ("keys", "values", "valid", "prefix_keys", "prefix_values",
                                                  "prefix_offsets")]
    stats = list(getattr(layer, "state", {}).values()) + list(getattr(layer, "prefix_state", {}).values())
    return [t for t in tensors + stats if t is not None]


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
    names = ("keys", "values", "prefix_keys", "prefix_values")
    return _held_bytes([t for t in (getattr(layer, n, None) for n in names) if t is not None])


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

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


class KVCache(Cache):
    """A transformers ``Cache`` for a kvx-patched model.

    Full-attention layers get a :class:`CompressedLayer` that the policy compresses; sliding-window
    layers (Gemma 2/3, Mistral with ``sliding_window``) keep transformers' window layer, which
    already bounds them to ``sliding_window`` tokens, and are not compressed further. Layers that
    are not attention (Mamba, gated delta-net, linear attention and convolution layers of hybrid
    models) keep the cache layer transformers gives them.

    ``patch`` makes the model build one of these whenever it would build a cache, so ``generate()``,
    plain forward loops and wrappers such as lm-eval's ``HFLM`` need no change. To create one
    by hand: ``kvx.KVCache(model.config)``.
    """

    STORAGES = ("dense", "ragged")

    def __init__(self, config: PretrainedConfig, storage: str = "dense"):
        if storage not in self.STORAGES:
            raise ValueError(f"unknown KV storage {storage!r}; choose from {', '.join(self.STORAGES)}")
        self.storage = storage
        full_layer = RaggedLayer if storage == "ragged" else CompressedLayer
        layers = [
            full_layer() if is_dense_layer(layer)
            else SlidingWindowLayer(sliding_window=layer.sliding_window) if is_sliding_layer(layer)
            else layer  # not plain attention (linear attention, convolution, shared KV...): transformers' own
            for layer in default_cache_layers(decoder_config(config))
        ]
        super().__init__(layers=layers)
        self.frozen = False  # True: nothing more is evicted (see kvx.compress_context)

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

    def real_tokens_seen(self) -> torch.Tensor | None:
        """``[B]`` real (non-padding) tokens seen per row, or None before any compressed layer has any."""
        return next((layer.real_seen for layer in self.layers
                     if isinstance(layer, CompressedLayer) and layer.real_seen is not None), None)

    def nbytes(self) -> int:
        """Bytes actually held by the cache, summed over every stored tensor of every layer."""
        return cache_nbytes(self)

    def stats(self) -> list[dict[str, Any]]:
        """Per layer: tokens seen and kept, slots stored, bytes (and kept per KV head where they differ)."""
        return [self._layer_stats(idx, layer).as_dict() for idx, layer in enumerate(self.layers)]

    def _layer_stats(self, idx: int, layer: CacheLayerMixin) -> LayerStats:
        keys = getattr(layer, "keys", None)
        stored = keys.shape[-2] if isinstance(keys, torch.Tensor) and keys.dim() >= 2 else 0
        if isinstance(layer, CompressedLayer):
            kept = layer.kept_per_head()
            low, high = (int(kept.min()), int(kept.max())) if kept.numel() else (0, 0)
            per_head = kept.tolist() if low != high else None
            kind = "ragged" if isinstance(layer, RaggedLayer) else "compressed"
            if isinstance(layer, RaggedLayer) and layer.has_prefix:
                stored += int(layer.prefix_offsets.diff().reshape(kept.shape).max())
            return LayerStats(idx, kind, layer.seen, stored, low, high, layer_nbytes(layer), _kv_bytes(layer), per_head)
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
