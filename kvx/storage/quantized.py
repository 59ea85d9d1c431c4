"""Quantized storage: old tokens held as packed low-bit codes, recent ones (and optional attention
sinks) at full precision. The storage kind behind the ``int8`` and ``kivi`` policies.

One layer holds, in temporal order:

- *sinks*: the first ``sink`` real tokens of each (row, KV head), full precision;
- *packed*: everything older than the window, quantized (:class:`kvx.kernels.quant.Packed`);
- with mixed precision (``mikv``), *high*: the old tokens a selection marked important, at 8 bits
  or full precision, while the rest go to *packed* at 2 or 4;
- *tail*: the most recent tokens, full precision (``keys/values [B, Hkv, T, D]``, the window).

Sinks, packed and high tokens are segments (:mod:`kvx.storage.segments`) forming the prefix of
:class:`~kvx.storage.prefix.PrefixTailLayer`, whose read path this kind shares: decode attends over
packed segments with dequantization fused in (:func:`kvx.kernels.quant_kernels.packed_decode_attention`),
several queries over a dense view.

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

import math
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from kvx.kernels import quant
from kvx.policy import StoragePolicy, check_positive_int
from kvx.storage.prefix import PrefixTailLayer, View
from kvx.storage.segments import FullSegment, PackedSegment, RaggedSegment, Segment, SegmentsReader


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
    high_bits: int | None = None
    """Mixed precision: tokens a selection marks important are held at ``high_bits`` (8: packed
    per token; 16: full precision), the rest at ``key_bits`` / ``value_bits`` (None: one precision)."""
    ragged: bool = False
    """Each (row, KV head) holds its old tokens without padding to the longest (head-wise budgets:
    :class:`~kvx.storage.segments.RaggedSegment`)."""
    outliers: float = 0.0
    """Dense-and-sparse: the fraction of each token's elements (rounded up per token) kept exactly
    beside the low-bit codes (:func:`kvx.kernels.quant.quantize`)."""

    def outliers_per_token(self, dim: int) -> int:
        return math.ceil(self.outliers * dim - 1e-9)

    @property
    def unit(self) -> int:
        """Tokens quantized at a time: a whole group where keys have per-channel groups."""
        return self.group if self.key_axis == "channel" else 1

    def check_head_dims(self, key_dim: int, value_dim: int) -> None:
        quant.check_layout(self.key_bits, self.group, key_dim, self.key_axis, self.owner)
        quant.check_layout(self.value_bits, self.group, value_dim, "token", self.owner)


class QuantizedLayer(PrefixTailLayer):
    """KV storage of one full-attention layer with old tokens quantized (module docstring).

    The prefix is a list of :class:`~kvx.storage.segments.Segment` in a fixed order, ``None`` where
    empty: ``segments[SINKS]`` full precision, ``segments[PACKED]`` packed at the spec's bits, and
    with mixed precision ``segments[HIGH]`` (packed at 8 bits, or full precision). Each segment
    holds its own padding mask and policy statistics; the tail is the
    :class:`~kvx.storage.dense.DenseLayer` part.
    """

    kind = "quantized"
    SINKS, PACKED, HIGH = 0, 1, 2
    LOW_PRECISION = "kvx_low_precision"
    """The per-token statistic a mixed-precision selection (``mikv``) sets to 1 on tokens it would
    evict: they leave the window into the low-precision segment, the others into the high one."""

    def __init__(self, spec: QuantSpec, **kwargs: Any):
        super().__init__(**kwargs)
        self.spec = spec
        if spec.ragged:
            self.kind = f"{self.kind}(ragged)"
        self.segments: list[Segment | None] = [None, None, None]
        self._decoding = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.spec.check_head_dims(key_states.shape[-1], value_states.shape[-1])
        super().lazy_initialization(key_states, value_states)

    # --- sizes --------------------------------------------------------------------------------

    def _present(self) -> list[Segment]:
        return [segment for segment in self.segments if segment is not None]

    def slots_of(self, index: int) -> int:
        segment = self.segments[index]
        return 0 if segment is None else segment.tokens

    @property
    def prefix_slots(self) -> int:
        return sum(segment.tokens for segment in self._present())

    @property
    def has_prefix(self) -> bool:
        return self.prefix_slots > 0

    # --- the prefix in its layout (kvx.storage.prefix.PrefixTailLayer) -------------------------

    def dense_view(self) -> View:
        batch, kv_heads, device = *self.keys.shape[:2], self.keys.device
        parts = [segment.kv(self.keys.dtype) for segment in self._present()]
        valid = [segment.valid_mask(batch, kv_heads, device) for segment in self._present()]
        return (torch.cat([*(k for k, _ in parts), self.keys], dim=2), torch.cat([*(v for _, v in parts), self.values], dim=2),
                torch.cat([*valid, self.valid_mask()], dim=-1))

    def dense_state(self) -> dict[str, torch.Tensor]:
        batch, kv_heads, device = *self.keys.shape[:2], self.keys.device
        names = set(self.state).union(*(segment.state for segment in self._present()))
        tail = lambda name: self.state.get(name, torch.zeros(*self.keys.shape[:3], device=device))  # noqa: E731
        return {name: torch.cat([*(s.stat(name, batch, kv_heads, device) for s in self._present()), tail(name)], -1)
                for name in names}

    def decode_reader(self, mask: torch.Tensor | None):
        """Each segment and the tail in its own layout: a decode method reads (dequantizes) only the
        slots it chooses, and its state persists across steps (refreshed as tokens are quantized,
        :meth:`quantize_old_tokens`). Ragged segments: the transient dense view."""
        if not self.has_prefix or self.spec.ragged:
            return super().decode_reader(mask)
        if not self.mask_is_causal(mask):
            return None
        tail = FullSegment(valid=self.valid, keys=self.keys, values=self.values)
        return SegmentsReader([*self._present(), tail], self.keys.dtype)

    def prefix_decode_parts(self, query, scaling: float, softcap: float | None):
        """Each segment in its layout: full precision as is, packed through the fused decode kernel."""
        return [segment.decode_part(query, scaling, softcap) for segment in self._present()]

    def store_selection(self, keep: torch.Tensor, state: dict[str, torch.Tensor], view: View) -> None:
        """Drop what ``keep`` drops from each segment in its own layout: packed codes are gathered
        (with their groups' scales), never dequantized and quantized again."""
        keep, prefix = keep & view[2], self.prefix_slots
        self.store_state(state)
        for index, part in self._split(keep):
            if not bool(part.all()):
                kept = self.segments[index].keep(part)
                self.segments[index] = kept if kept.tokens else None
        self.keep_mask(keep[..., prefix:])

    def store_state(self, dense: dict[str, torch.Tensor]) -> None:
        prefix = self.prefix_slots
        for index, part in self._split_state(dense):
            self.segments[index].state = part
        self.state = {name: stat[..., prefix:] for name, stat in dense.items()}

    def _split(self, over_view: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """``[..., P + T]`` -> each present segment's index and its slice ``[..., n]``."""
        parts, start = [], 0
        for index, segment in enumerate(self.segments):
            if segment is not None:
                parts.append((index, over_view[..., start : start + segment.tokens]))
                start += segment.tokens
        return parts

    def _split_state(self, dense: dict[str, torch.Tensor]) -> list[tuple[int, dict[str, torch.Tensor]]]:
        split = {name: dict(self._split(stat)) for name, stat in dense.items()}
        return [(index, {name: parts[index] for name, parts in split.items()})
                for index, segment in enumerate(self.segments) if segment is not None]

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
        """Move the oldest real tail tokens beyond the window into the prefix (a unit at a time per
        row and KV head), after the first ``sink`` of them into the sinks the first time."""
        if self.keys is None or self.keys.shape[-2] == 0:
            return
        valid = self.valid_mask()
        age = valid.long().cumsum(-1) - 1  # rank of each real tail token from the oldest
        sinks = valid & (age < self.spec.sink) if self.spec.sink and not self.has_prefix else None
        done = 0 if sinks is None else sinks.sum(-1, keepdim=True)  # [B, Hkv, 1]
        movable = (valid.sum(-1, keepdim=True) - done - self.spec.window).clamp(min=0)
        movable = movable - movable % self.spec.unit
        outgoing = valid & (age >= done) & (age < done + movable)
        routes = ([] if sinks is None else [(self.SINKS, sinks)]) + self._route(outgoing)
        routes = [(index, mask) for index, mask in routes if bool(mask.any())]
        if not routes:
            return
        method_state, before = self.method_state, self._prefix_real() if self.method_state else None
        for index, mask in routes:
            self._move_to(index, mask)
        staying = valid & ~outgoing if sinks is None else valid & ~outgoing & ~sinks
        self.keep_mask(staying)  # drops method state (slots moved)
        if method_state and self.spec.high_bits is None:  # one precision: every real token keeps its order
            self.method_state = method_state
            self.tokens_rewritten(before, self._prefix_real())

    def _prefix_real(self) -> torch.Tensor:
        """``[B, Hkv]`` real tokens in the prefix (on the tail's device)."""
        batch, kv_heads, device = *self.keys.shape[:2], self.keys.device
        real = torch.zeros(batch, kv_heads, dtype=torch.long, device=device)
        for segment in self._present():
            real = real + segment.valid_mask(batch, kv_heads, device).sum(-1)
        return real

    def _route(self, outgoing: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """Which segment each outgoing tail token joins: packed, or with mixed precision, packed at
        low precision where a selection marked it, high precision otherwise."""
        if self.spec.high_bits is None:
            return [(self.PACKED, outgoing)]
        low = self.state.get(self.LOW_PRECISION)
        low = torch.zeros_like(outgoing) if low is None else low > 0
        return [(self.PACKED, outgoing & low), (self.HIGH, outgoing & ~low)]

    def _move_to(self, index: int, mask: torch.Tensor) -> None:
        """Append the tail tokens marked in ``mask [B, Hkv, T]`` to segment ``index`` in its layout
        (padding slots, where a row has fewer, as zeros)."""
        moved = FullSegment(state=self.state, keys=self.keys, values=self.values).keep(mask)
        real = 1 if moved.valid is None else moved.valid[..., None]
        segment = self._new_segment(index, moved.keys * real, moved.values * real, moved.state)
        segment.valid, segment.state = moved.valid, moved.state
        if self.spec.ragged:
            segment = RaggedSegment.from_padded(segment)
        current = self.segments[index]
        self.segments[index] = segment if current is None else current.append(segment)

    def _new_segment(self, index: int, keys: torch.Tensor, values: torch.Tensor,
                     state: dict[str, torch.Tensor]) -> Segment:
        """Tokens ``keys / values [B, Hkv, n, D]`` (with their statistics ``state``) in segment
        ``index``'s layout."""
        spec = self.spec
        if index == self.SINKS or (index == self.HIGH and spec.high_bits == 16):
            return FullSegment(keys=keys, values=values)
        if index == self.HIGH:
            return PackedSegment(keys=quant.quantize(keys, spec.high_bits, spec.group, "token", spec.symmetric),
                                 values=quant.quantize(values, spec.high_bits, spec.group, "token", spec.symmetric))
        key_outliers, value_outliers = spec.outliers_per_token(keys.shape[-1]), spec.outliers_per_token(values.shape[-1])
        return PackedSegment(
            keys=quant.quantize(keys, spec.key_bits, spec.group, spec.key_axis, spec.symmetric, key_outliers),
            values=quant.quantize(values, spec.value_bits, spec.group, "token", spec.symmetric, value_outliers))

    # --- counts, bytes, rows ------------------------------------------------------------------

    def kept_per_head(self) -> torch.Tensor:
        kept = super().kept_per_head()
        for segment in self._present():
            real = segment.kept()
            kept = kept + (segment.tokens if real is None else real.cpu())
        return kept

    def stored_slots(self) -> int:
        return self.num_stored + self.prefix_slots

    def held_tensors(self) -> list[torch.Tensor]:
        return super().held_tensors() + [t for segment in self._present() for t in segment.held_tensors()]

    def kv_tensors(self) -> list[torch.Tensor]:
        return super().kv_tensors() + [t for segment in self._present() for t in segment.kv_tensors()]

    def reset(self) -> None:
        super().reset()
        self.segments = [None, None, None]

    def _select_batch(self, fn) -> None:
        """Re-order or repeat rows (beam search): every segment moves with its row."""
        self.segments = [None if segment is None else segment.map_rows(fn) for segment in self.segments]
        super()._select_batch(fn)


class QuantizedStoragePolicy(StoragePolicy):
    """What the quantized storage policies share: ``group``, ``window`` and ``sink`` options checked,
    layers built from :meth:`spec`, the head dim checked at patch, a composed selection checked
    (:func:`check_fits_selection`). Subclasses are dataclasses that give :meth:`spec`."""

    storage: ClassVar[str] = "quantized"
    lossy: ClassVar[bool] = True  # what it stores differs from the model's keys and values

    def validate(self) -> None:
        super().validate()
        check_positive_int(self.name, "group", self.group)
        check_positive_int(self.name, "window", self.window, minimum=0)
        check_positive_int(self.name, "sink", self.sink, minimum=0)
        if not isinstance(getattr(self, "ragged", False), bool):
            raise TypeError(f"{self.name}: ragged must be true or false, got {self.ragged!r}")

    def spec(self) -> QuantSpec:
        raise NotImplementedError

    def layer_spec(self) -> QuantSpec:
        """:meth:`spec` with the ``ragged`` option where the policy has it (set by ``kvx.compose``
        under a selection that needs ragged storage)."""
        return replace(self.spec(), ragged=getattr(self, "ragged", False))

    def make_layer(self) -> QuantizedLayer:
        return QuantizedLayer(self.layer_spec())

    def check_head_dim(self, dim: int) -> None:
        """Raise unless keys and values of head dim ``dim`` fit the layout (``kvx.patch`` asks)."""
        self.spec().check_head_dims(dim, dim)

    def check_selection(self, selection: Any) -> None:
        check_fits_selection(self, selection)


RAGGED_HELP = ("each KV head keeps its old tokens without padding to the longest head (set by kvx.compose under "
               "a head-wise selection such as head_budget)")


def check_bits(policy: str, bits: object, choices: tuple[int, ...], option: str = "bits") -> None:
    """Raise a ValueError naming the option and the valid choices unless ``bits`` is one of them."""
    if isinstance(bits, bool) or bits not in choices:
        raise ValueError(f"{policy}: {option} must be one of {', '.join(map(str, choices))}, got {bits!r}")


def check_fits_selection(storage: Any, selection: Any) -> None:
    """Refuse a full-precision window (plus sinks) that holds everything a composed selection keeps:
    nothing would ever be quantized, while the name claims it is."""
    if selection is None or getattr(selection, "ratio", None) is not None:
        return
    kept = getattr(selection, "budget", None)
    if kept is None and hasattr(selection, "sink") and hasattr(selection, "window"):
        kept = selection.sink + selection.window  # streaming_llm
    if kept is not None and storage.window + storage.sink >= kept:
        raise ValueError(
            f"{storage.name}: window ({storage.window}) + sink ({storage.sink}) must be below the {kept} tokens "
            f"{selection.name} keeps: every one of them would stay at full precision; lower {storage.name}'s "
            "window or keep more"
        )

