"""Ragged storage: each KV head keeps its own number of tokens, packed with no padding (head-wise
budgets, e.g. AdaKV)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvx.kernels import reference
from kvx.kernels.ragged_decode import ragged_decode_attention
from kvx.policy import StoragePolicy, register_policy
from kvx.storage.base import TokenReader
from kvx.storage.prefix import PrefixTailLayer


@register_policy
@dataclass
class RaggedStorage(StoragePolicy):
    """Store each KV head's tokens packed, with no padding to the longest head: compose with any
    selection (``kvx.compose(kvx.make_policy("snapkv"), kvx.make_policy("ragged"))``); head budgets
    (``head_budget``) need it."""

    name: ClassVar[str] = "ragged"
    summary: ClassVar[str] = "storage: each KV head's tokens packed, no padding (compose with a selection policy)"
    storage: ClassVar[str] = "ragged"


class RaggedLayer(PrefixTailLayer):
    """KV storage where each KV head keeps its own number of tokens (head-wise budgets).

    Two parts: a *prefix* packed per (row, KV head) segment, with no padding to the longest head
    (``prefix_keys/prefix_values [N, D]``, ``prefix_offsets [B * Hkv + 1]``, see
    ``kvx.kernels.reference.pack_ragged``), and a dense *tail* (``keys/values [B, Hkv, T, D]``,
    inherited) of the tokens appended since the last compression. Attention reads both and merges
    them by log-sum-exp; a compression re-packs everything into the prefix.
    """

    kind = "ragged"

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

        batch, kv_heads = self.keys.shape[:2]
        tail_valid = self.valid_mask()
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
        self.layout_changed()

    def keep_mask(self, keep: torch.Tensor, state: dict[str, torch.Tensor] | None = None,
                  view: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
        self.repack(keep, state, view)

    def decode_reader(self, mask: torch.Tensor | None) -> TokenReader | None:
        """The packed prefix and the tail as they are: a decode method reads only the slots it
        chooses, and its state persists across steps (until the next re-pack)."""
        if not self.has_prefix:
            return super().decode_reader(mask)
        if not self.mask_is_causal(mask):
            return None
        return RaggedReader(self)

    # --- the prefix in its layout (kvx.storage.prefix.PrefixTailLayer) -------------------------

    def prefix_decode_parts(self, query, scaling: float, softcap: float | None):
        """The packed per-head prefix read directly by the ragged decode kernel."""
        return [ragged_decode_attention(query, self.prefix_keys, self.prefix_values, self.prefix_offsets,
                                        scaling, softcap)]

    def store_selection(self, keep, state, view) -> None:
        self.repack(keep, state, view)

    def stored_slots(self) -> int:
        stored = self.num_stored
        if self.has_prefix:
            stored += int(self.prefix_offsets.diff().max())
        return stored

    def held_tensors(self) -> list[torch.Tensor]:
        prefix = [t for t in (self.prefix_keys, self.prefix_values, self.prefix_offsets) if t is not None]
        return super().held_tensors() + prefix + list(self.prefix_state.values())

    def kv_tensors(self) -> list[torch.Tensor]:
        return super().kv_tensors() + [t for t in (self.prefix_keys, self.prefix_values) if t is not None]


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


class RaggedReader(TokenReader):
    """A :class:`RaggedLayer` read as its dense view (the prefix left-padded to its longest head
    ``W``, then the tail: ``S = W + T`` slots) without building it: a chosen slot is read from the
    packed prefix (``prefix_keys [N, D]`` at its (row, head)'s offset) or from the tail."""

    persistent = True

    def __init__(self, layer: RaggedLayer):
        self.layer = layer
        batch, kv_heads, tail = layer.keys.shape[:3]
        self.counts = layer.prefix_offsets.diff().view(batch, kv_heads)  # [B, Hkv] prefix tokens
        self.width = int(self.counts.max())
        self.stored = self.width + tail
        self._valid: torch.Tensor | None = None

    @property
    def valid(self) -> torch.Tensor:
        """``[B, Hkv, W + T]`` bool (built on first use)."""
        if self._valid is None:
            batch, kv_heads = self.counts.shape
            prefix = reference.ragged_valid(self.layer.prefix_offsets, batch, kv_heads)
            self._valid = torch.cat([prefix, self.layer.valid_mask()], -1)
        return self._valid

    def keys(self) -> torch.Tensor:
        return self.layer.dense_view()[0]

    def new_key(self) -> torch.Tensor:
        return self.layer.keys[:, :, -1:]

    def appended_real(self) -> bool:
        return self.layer.valid is None or bool(self.layer.valid[..., -1].all())

    def gather(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        layer, tail = self.layer, self.layer.keys.shape[2]
        if layer.prefix_keys.shape[0] == 0:  # every head's prefix empty: the tail alone
            local = (slots - self.width).clamp(0, tail - 1)
            return reference.take_tokens(layer.keys, local), reference.take_tokens(layer.values, local)
        starts = layer.prefix_offsets[:-1].view_as(self.counts) - (self.width - self.counts)  # row of slot 0
        rows = (starts[..., None] + slots).clamp(0, max(layer.prefix_keys.shape[0] - 1, 0)).flatten()
        shape = (*slots.shape, -1)
        prefix_k = layer.prefix_keys.index_select(0, rows).view(shape)  # [B, Hkv, T, D]
        prefix_v = layer.prefix_values.index_select(0, rows).view(shape)
        if tail == 0:
            return prefix_k, prefix_v
        local = (slots - self.width).clamp(0, tail - 1)
        inside = (slots < self.width)[..., None]
        return (torch.where(inside, prefix_k, reference.take_tokens(layer.keys, local)),
                torch.where(inside, prefix_v, reference.take_tokens(layer.values, local)))
