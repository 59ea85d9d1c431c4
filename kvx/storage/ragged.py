"""Ragged storage: each KV head keeps its own number of tokens, packed with no padding (head-wise
budgets, e.g. AdaKV)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvx.kernels import reference
from kvx.kernels.ragged_decode import ragged_decode_attention
from kvx.policy import StoragePolicy, register_policy
from kvx.storage.base import ScoringInputs
from kvx.storage.dense import DenseLayer


@register_policy
@dataclass
class RaggedStorage(StoragePolicy):
    """Store each KV head's tokens packed, with no padding to the longest head: compose with any
    selection (``kvx.compose(kvx.make_policy("snapkv"), kvx.make_policy("ragged"))``); head budgets
    (``head_budget``) need it."""

    name: ClassVar[str] = "ragged"
    summary: ClassVar[str] = "storage: each KV head's tokens packed, no padding (compose with a selection policy)"
    storage: ClassVar[str] = "ragged"


class RaggedLayer(DenseLayer):
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
        self._step_view: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # this call's dense view
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

    # --- the read path (kvx.storage.base.Storage) ---------------------------------------------

    def attend(self, query, key, value, mask, scaling: float, softcap: float | None, sinks=None) -> torch.Tensor:
        if not self.has_prefix:
            return super().attend(query, key, value, mask, scaling, softcap, sinks)
        if query.shape[-2] == 1:  # decode: read the packed prefix directly (the ragged kernel), merge with the tail
            return _decode_with_prefix(query, key, value, mask, self, scaling, softcap, sinks)
        # several queries: one pass over the dense view, which the policy then scores on
        self._step_view = self.dense_view()
        return _attend_over_view(query, self._step_view, self.keys.shape[-2], mask, scaling, softcap, sinks)

    def scoring_inputs(self, query: torch.Tensor, mask: torch.Tensor | None) -> ScoringInputs:
        if self._step_view is None:
            self._step_view = self.dense_view()
        keys, values, valid = self._step_view
        mask_rows = None
        if self.has_prefix:  # the mask over the whole view would be q x (P + T): built on demand
            tail_mask, tail_len, q_len = mask, self.keys.shape[-2], query.shape[-2]
            mask, mask_rows = None, lambda last: _view_mask(valid, tail_len, tail_mask, query.shape, q_len - last, q_len)
        return ScoringInputs(keys, values, valid, self.dense_state(), mask, mask_rows)

    def apply_selection(self, keep: torch.Tensor | None, inputs: ScoringInputs) -> None:
        # the statistics were unpacked for the view: pack them back
        if keep is not None:
            self.keep_mask(keep, inputs.state, self._step_view)
        else:
            self.store_state(inputs.state)

    def end_step(self) -> None:
        self._step_view = None

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
