"""Quantized storage: old tokens held as packed low-bit codes, recent ones (and optional attention
sinks) at full precision. The storage kind behind the ``int8`` and ``kivi`` policies.

One layer holds, in temporal order:

- *sinks*: the first ``sink`` real tokens of each (row, KV head), full precision
  ``sink_keys/sink_values [B, Hkv, s, D]``;
- *packed*: everything older than the window, quantized (:class:`kvx.kernels.quant.Packed`);
- *tail*: the most recent tokens, full precision (``keys/values [B, Hkv, T, D]``, the window).

Sinks and packed tokens form the prefix of :class:`~kvx.storage.prefix.PrefixTailLayer`, whose
read path this kind shares: decode attends over the packed tokens with dequantization fused in
(:func:`kvx.kernels.quant_kernels.packed_decode_attention`), several queries over a dense view.

When tokens are quantized: at the end of each decode step, and when the prompt ends
(:meth:`QuantizedLayer.end_prompt`, which ``kvx.prefill`` calls; otherwise the first decoded token
does it). Until then the whole prompt stays at full precision, so every prompt token is attended
and scored (by a composed selection) at full precision across chunks, and a selection prunes the
prompt before anything is quantized: nothing is dequantized, pruned and quantized again. Tokens
leave the window a quantization unit at a time (``group`` tokens when a tensor has per-channel
groups, else one), counted per (row, KV head) over real tokens, so a row in a padded batch is
quantized exactly as the row alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvx.kernels import quant, reference
from kvx.kernels.quant_kernels import packed_decode_attention
from kvx.policy import mask_to_indices
from kvx.storage.prefix import PrefixTailLayer, View


@dataclass(frozen=True)
class QuantSpec:
    """How a quantized layer stores keys and values (see :mod:`kvx.kernels.quant` for the layout).

    ``key_axis``: ``"channel"`` (KIVI: groups of ``group`` tokens per channel) or ``"token"``
    (groups of ``group`` channels per token); values are always grouped per token. ``window``:
    recent tokens kept at full precision; ``sink``: first tokens kept at full precision.
    ``owner`` names the policy in errors."""

    key_bits: int
    value_bits: int
    group: int
    key_axis: str
    symmetric: bool = False
    window: int = 0
    sink: int = 0
    owner: str = "quantized storage"

    @property
    def unit(self) -> int:
        """Tokens quantized at a time: a whole group where keys have per-channel groups."""
        return self.group if self.key_axis == "channel" else 1

    def check_head_dims(self, key_dim: int, value_dim: int) -> None:
        quant.check_layout(self.key_bits, self.group, key_dim, self.key_axis, self.owner)
        quant.check_layout(self.value_bits, self.group, value_dim, "token", self.owner)


class QuantizedLayer(PrefixTailLayer):
    """KV storage of one full-attention layer with old tokens quantized (module docstring).

    Attributes (besides the tail's, from :class:`~kvx.storage.dense.DenseLayer`):
        sink_keys, sink_values: ``[B, Hkv, s, D]`` full-precision sinks, or None.
        packed_keys, packed_values: :class:`~kvx.kernels.quant.Packed` of ``Q`` tokens, or None.
        prefix_valid: ``[B, Hkv, s + Q]`` bool (False on padding slots), or None when all are real.
        prefix_state: per-token policy statistics of the prefix, name -> ``[B, Hkv, s + Q]``.
    """

    kind = "quantized"

    def __init__(self, spec: QuantSpec, **kwargs: Any):
        super().__init__(**kwargs)
        self.spec = spec
        self.sink_keys: torch.Tensor | None = None
        self.sink_values: torch.Tensor | None = None
        self.packed_keys: quant.Packed | None = None
        self.packed_values: quant.Packed | None = None
        self.prefix_valid: torch.Tensor | None = None
        self.prefix_state: dict[str, torch.Tensor] = {}
        self._decoding = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.spec.check_head_dims(key_states.shape[-1], value_states.shape[-1])
        super().lazy_initialization(key_states, value_states)

    # --- sizes --------------------------------------------------------------------------------

    @property
    def sink_slots(self) -> int:
        return 0 if self.sink_keys is None else self.sink_keys.shape[-2]

    @property
    def packed_slots(self) -> int:
        return 0 if self.packed_keys is None else self.packed_keys.tokens

    @property
    def prefix_slots(self) -> int:
        return self.sink_slots + self.packed_slots

    @property
    def has_prefix(self) -> bool:
        return self.prefix_slots > 0

    def _prefix_valid(self) -> torch.Tensor:
        if self.prefix_valid is not None:
            return self.prefix_valid
        return torch.ones(*self.keys.shape[:2], self.prefix_slots, dtype=torch.bool, device=self.keys.device)

    def _tail_valid(self) -> torch.Tensor:
        if self.valid is not None:
            return self.valid
        return torch.ones(self.keys.shape[:3], dtype=torch.bool, device=self.keys.device)

    # --- the prefix in its layout (kvx.storage.prefix.PrefixTailLayer) -------------------------

    def dense_view(self) -> View:
        keys, values = [], []
        if self.sink_keys is not None:
            keys.append(self.sink_keys)
            values.append(self.sink_values)
        if self.packed_keys is not None:
            keys.append(quant.dequantize(self.packed_keys, self.keys.dtype))
            values.append(quant.dequantize(self.packed_values, self.values.dtype))
        valid = torch.cat([self._prefix_valid(), self._tail_valid()], dim=-1)
        return torch.cat([*keys, self.keys], dim=2), torch.cat([*values, self.values], dim=2), valid

    def dense_state(self) -> dict[str, torch.Tensor]:
        batch, kv_heads, tail = self.keys.shape[:3]
        dense = {}
        for name in set(self.state) | set(self.prefix_state):
            prefix = self.prefix_state.get(name)
            if prefix is None:
                prefix = self.keys.new_zeros(batch, kv_heads, self.prefix_slots, dtype=torch.float32)
            tail_stat = self.state.get(name, prefix.new_zeros(batch, kv_heads, tail))
            dense[name] = torch.cat([prefix, tail_stat], dim=-1)
        return dense

    def prefix_decode_parts(self, query, scaling: float, softcap: float | None):
        """The sinks at full precision, the packed tokens dequantized inside the decode kernel."""
        valid, groups = self.prefix_valid, query.shape[1] // self.keys.shape[1]
        parts = []
        if self.sink_keys is not None:
            mask = None if valid is None else reference.expand_kv_heads(valid[..., : self.sink_slots], groups)[:, :, None]
            parts.append(reference.attention_with_lse(query, self.sink_keys, self.sink_values, mask, scaling, softcap))
        if self.packed_keys is not None:
            packed_valid = None if valid is None else valid[..., self.sink_slots :]
            parts.append(packed_decode_attention(query, self.packed_keys, self.packed_values, packed_valid,
                                                 scaling, softcap))
        return parts

    def store_selection(self, keep: torch.Tensor, state: dict[str, torch.Tensor], view: View) -> None:
        """Drop what ``keep`` drops from each part in its own layout: packed codes are gathered
        (with their groups' scales), never dequantized and quantized again."""
        keep = keep & view[2]
        prefix = self.prefix_slots
        self.store_state(state)
        self._keep_prefix(keep[..., :prefix])
        self.keep_mask(keep[..., prefix:])

    def store_state(self, dense: dict[str, torch.Tensor]) -> None:
        prefix = self.prefix_slots
        self.prefix_state = {name: stat[..., :prefix] for name, stat in dense.items()}
        self.state = {name: stat[..., prefix:] for name, stat in dense.items()}

    def _keep_prefix(self, keep: torch.Tensor) -> None:
        """Keep the prefix tokens marked in ``keep [B, Hkv, s + Q]``, sinks and packed apart."""
        if bool(keep.all()):
            return
        sinks = self.sink_slots
        valid_parts, stat_parts = [], {name: [] for name in self.prefix_state}
        if self.sink_keys is not None:
            indices, slot_valid = mask_to_indices(keep[..., :sinks])
            self.sink_keys, self.sink_values = _gather(self.sink_keys, indices), _gather(self.sink_values, indices)
            valid_parts.append(slot_valid)
            for name, stat in self.prefix_state.items():
                stat_parts[name].append(stat[..., :sinks].gather(2, indices))
        if self.packed_keys is not None:
            indices, slot_valid = mask_to_indices(keep[..., sinks:])
            self.packed_keys = quant.gather_tokens(self.packed_keys, indices, slot_valid)
            self.packed_values = quant.gather_tokens(self.packed_values, indices, slot_valid)
            valid_parts.append(slot_valid)
            for name, stat in self.prefix_state.items():
                stat_parts[name].append(stat[..., sinks:].gather(2, indices))
        self.prefix_state = {name: torch.cat(parts, dim=-1) for name, parts in stat_parts.items()}
        self._set_prefix_valid(valid_parts)
        if self.sink_keys is not None and self.sink_keys.shape[-2] == 0:
            self.sink_keys = self.sink_values = None
        if self.packed_keys is not None and self.packed_keys.tokens == 0:
            self.packed_keys = self.packed_values = None

    def _set_prefix_valid(self, parts: list[torch.Tensor]) -> None:
        valid = torch.cat(parts, dim=-1) if parts else None
        self.prefix_valid = None if valid is None or bool(valid.all()) else valid.clone()

    # --- quantizing what leaves the window ----------------------------------------------------

    def begin_step(self, given_mask: torch.Tensor | None, q_len: int, num_heads: int) -> torch.Tensor | None:
        self._decoding = q_len == 1
        return super().begin_step(given_mask, q_len, num_heads)

    def end_step(self) -> None:
        super().end_step()
        if self._decoding:
            self.quantize_old_tokens()

    def end_prompt(self) -> None:
        """The prompt is complete: quantize every token older than the window now."""
        if self.is_initialized:
            self.quantize_old_tokens()

    def quantize_old_tokens(self) -> None:
        """Move the oldest real tail tokens beyond the window into the packed part (a unit at a
        time per row and KV head), after the first ``sink`` of them into the sinks."""
        if self.keys is None or self.keys.shape[-2] == 0:
            return
        valid = self._tail_valid()
        age = valid.long().cumsum(-1) - 1  # rank of each real tail token from the oldest
        first_time = not self.has_prefix
        sinks = valid & (age < self.spec.sink) if first_time and self.spec.sink else None
        done = 0 if sinks is None else sinks.sum(-1, keepdim=True)  # [B, Hkv, 1]
        real = valid.sum(-1, keepdim=True)
        movable = (real - done - self.spec.window).clamp(min=0)
        movable = movable - movable % self.spec.unit
        outgoing = valid & (age >= done) & (age < done + movable)
        if sinks is None and not bool(outgoing.any()):
            return
        state = dict(self.state)
        prefix_parts = [self._prefix_valid()] if self.has_prefix else []
        stat_parts = {name: [self._prefix_stat(name)] if self.has_prefix else [] for name in state}
        if sinks is not None:
            indices, slot_valid = mask_to_indices(sinks)
            self.sink_keys, self.sink_values = _gather(self.keys, indices), _gather(self.values, indices)
            prefix_parts.append(slot_valid)
            for name, stat in state.items():
                stat_parts[name].append(stat.gather(2, indices))
        if bool(outgoing.any()):
            indices, slot_valid = mask_to_indices(outgoing)
            self._pack(indices, slot_valid)
            prefix_parts.append(slot_valid)
            for name, stat in state.items():
                stat_parts[name].append(stat.gather(2, indices))
        self._set_prefix_valid(prefix_parts)
        self.prefix_state = {name: torch.cat(parts, dim=-1) for name, parts in stat_parts.items()}
        staying = valid & ~outgoing if sinks is None else valid & ~outgoing & ~sinks
        self.keep_mask(staying)

    def _prefix_stat(self, name: str) -> torch.Tensor:
        stat = self.prefix_state.get(name)
        if stat is None:
            stat = torch.zeros(*self.keys.shape[:2], self.prefix_slots, device=self.keys.device)
        return stat

    def _pack(self, indices: torch.Tensor, slot_valid: torch.Tensor) -> None:
        """Quantize the tail tokens ``indices [B, Hkv, W]`` (``W`` a multiple of the unit; padding
        slots, where ``slot_valid`` is False, as zeros) and append them to the packed part."""
        spec = self.spec
        keys = _gather(self.keys, indices) * slot_valid[..., None]
        values = _gather(self.values, indices) * slot_valid[..., None]
        new_keys = quant.quantize(keys, spec.key_bits, spec.group, spec.key_axis, spec.symmetric)
        new_values = quant.quantize(values, spec.value_bits, spec.group, "token", spec.symmetric)
        self.packed_keys = quant.concat(self.packed_keys, new_keys)
        self.packed_values = quant.concat(self.packed_values, new_values)

    # --- counts, bytes, rows ------------------------------------------------------------------

    def kept_per_head(self) -> torch.Tensor:
        kept = super().kept_per_head()
        if self.has_prefix:
            kept = kept + self._prefix_valid().sum(-1).cpu()
        return kept

    def stored_slots(self) -> int:
        return self.num_stored + self.prefix_slots

    def _prefix_kv(self) -> list[torch.Tensor]:
        tensors = [t for t in (self.sink_keys, self.sink_values) if t is not None]
        for packed in (self.packed_keys, self.packed_values):
            if packed is not None:
                tensors += packed.tensors()
        return tensors

    def held_tensors(self) -> list[torch.Tensor]:
        bookkeeping = [self.prefix_valid] if self.prefix_valid is not None else []
        return super().held_tensors() + self._prefix_kv() + bookkeeping + list(self.prefix_state.values())

    def kv_tensors(self) -> list[torch.Tensor]:
        return super().kv_tensors() + self._prefix_kv()

    def reset(self) -> None:
        super().reset()
        self.sink_keys = self.sink_values = self.prefix_valid = None
        self.packed_keys = self.packed_values = None
        self.prefix_state = {}

    def _select_batch(self, fn) -> None:
        """Re-order or repeat rows (beam search): every part of the prefix moves with its row."""
        if self.sink_keys is not None:
            self.sink_keys, self.sink_values = fn(self.sink_keys), fn(self.sink_values)
        if self.packed_keys is not None:
            self.packed_keys, self.packed_values = self.packed_keys.map_rows(fn), self.packed_values.map_rows(fn)
        if self.prefix_valid is not None:
            self.prefix_valid = fn(self.prefix_valid)
        self.prefix_state = {name: fn(stat) for name, stat in self.prefix_state.items()}
        super()._select_batch(fn)


def check_bits(policy: str, bits: object, choices: tuple[int, ...]) -> None:
    if isinstance(bits, bool) or bits not in choices:
        raise ValueError(f"{policy}: bits must be one of {', '.join(map(str, choices))}, got {bits!r}")


def check_fits_selection(storage: Any, selection: Any) -> None:
    """Refuse a full-precision window (plus sinks) that holds everything a composed selection keeps:
    nothing would ever be quantized, while the name claims it is."""
    budget = getattr(selection, "budget", None)
    if selection is None or budget is None or getattr(selection, "ratio", None) is not None:
        return
    if storage.window + storage.sink >= budget:
        raise ValueError(
            f"{storage.name}: window ({storage.window}) + sink ({storage.sink}) must be below the budget of "
            f"{selection.name} ({budget}): every token it keeps would stay at full precision; lower "
            f"{storage.name}'s window or raise the budget"
        )


def _gather(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``x [B, Hkv, S, D]`` at token ``indices [B, Hkv, K]`` -> ``[B, Hkv, K, D]``."""
    return x.gather(2, indices[..., None].expand(*indices.shape, x.shape[-1]))
