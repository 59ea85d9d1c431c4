"""Segments: runs of stored tokens held one way (full precision, or packed low-bit codes), each
with its padding mask and per-token policy statistics. Quantized storage keeps its prefix as a few
segments (sinks, low-precision tokens, high-precision tokens); attention reads each in its own
layout and merges the parts by log-sum-exp.

Shapes: ``B`` batch, ``Hkv`` KV heads, ``n`` tokens of the segment, ``D`` head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvx.compat import Rope
from kvx.kernels import quant, reference
from kvx.kernels.quant_kernels import packed_decode_attention


@dataclass
class Segment:
    """Tokens held one way. ``valid [B, Hkv, n]`` bool (None: every slot a real token), ``state``:
    per-token statistics, name -> ``[B, Hkv, n]``."""

    valid: torch.Tensor | None = None
    state: dict[str, torch.Tensor] = field(default_factory=dict)

    # --- what a layout gives --------------------------------------------------------------------

    @property
    def tokens(self) -> int:
        raise NotImplementedError

    def kv(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[B, Hkv, n, D]`` in ``dtype`` (dequantized if packed)."""
        raise NotImplementedError

    def kv_tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def _gather_kv(self, indices: torch.Tensor, slot_valid: torch.Tensor) -> Segment:
        """A segment of the same layout holding tokens ``indices [B, Hkv, K]`` (no valid, no state)."""
        raise NotImplementedError

    def _cat_kv(self, other: Segment) -> Segment:
        raise NotImplementedError

    def _map_kv(self, fn) -> Segment:
        raise NotImplementedError

    def decode_part(self, query: torch.Tensor, scaling: float, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of one query per head ``[B, H, 1, D]`` over the segment: ``(out, lse)``."""
        raise NotImplementedError

    # --- shared -------------------------------------------------------------------------------

    def valid_mask(self, batch: int, kv_heads: int, device: torch.device) -> torch.Tensor:
        if self.valid is not None:
            return self.valid
        return torch.ones(batch, kv_heads, self.tokens, dtype=torch.bool, device=device)

    def stat(self, name: str, batch: int, kv_heads: int, device: torch.device) -> torch.Tensor:
        found = self.state.get(name)
        return found if found is not None else torch.zeros(batch, kv_heads, self.tokens, device=device)

    def kept(self) -> torch.Tensor | None:
        """``[B, Hkv]`` real tokens, or None when every slot is real."""
        return None if self.valid is None else self.valid.sum(-1)

    def keep(self, keep: torch.Tensor) -> Segment:
        """The tokens marked in ``keep [B, Hkv, n]``, right-aligned (padding slots on the left)."""
        from kvx.policy import mask_to_indices

        indices, slot_valid = mask_to_indices(keep)
        kept = self._gather_kv(indices, slot_valid)
        kept.valid = _real_or_none(slot_valid)
        kept.state = {name: stat.gather(2, indices) for name, stat in self.state.items()}
        return kept

    def append(self, other: Segment) -> Segment:
        """This segment's tokens, then ``other``'s (same layout)."""
        joined = self._cat_kv(other)
        batch, kv_heads = other.kv_tensors()[0].shape[:2]
        device = other.kv_tensors()[0].device
        if self.valid is None and other.valid is None:
            joined.valid = None
        else:
            joined.valid = torch.cat([self.valid_mask(batch, kv_heads, device), other.valid_mask(batch, kv_heads, device)], -1)
        names = set(self.state) | set(other.state)
        joined.state = {n: torch.cat([self.stat(n, batch, kv_heads, device), other.stat(n, batch, kv_heads, device)], -1)
                        for n in names}
        return joined

    def map_rows(self, fn) -> Segment:
        """Re-order / repeat / select rows (beam search) with ``fn`` over ``[B, ...]`` tensors."""
        moved = self._map_kv(fn)
        moved.valid = None if self.valid is None else fn(self.valid)
        moved.state = {name: fn(stat) for name, stat in self.state.items()}
        return moved

    def held_tensors(self) -> list[torch.Tensor]:
        return self.kv_tensors() + ([self.valid] if self.valid is not None else []) + list(self.state.values())

    def _visible(self, groups: int) -> torch.Tensor | None:
        return None if self.valid is None else reference.expand_kv_heads(self.valid, groups)[:, :, None]


@dataclass
class FullSegment(Segment):
    """Full-precision keys and values ``[B, Hkv, n, D]``."""

    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None

    @property
    def tokens(self) -> int:
        return self.keys.shape[-2]

    def kv(self, dtype):
        return self.keys, self.values

    def kv_tensors(self):
        return [self.keys, self.values]

    def _gather_kv(self, indices, slot_valid):
        return FullSegment(keys=_gather(self.keys, indices), values=_gather(self.values, indices))

    def _cat_kv(self, other):
        return FullSegment(keys=torch.cat([self.keys, other.keys], 2), values=torch.cat([self.values, other.values], 2))

    def _map_kv(self, fn):
        return FullSegment(keys=fn(self.keys), values=fn(self.values))

    def decode_part(self, query, scaling, softcap):
        groups = query.shape[1] // self.keys.shape[1]
        return reference.attention_with_lse(query, self.keys, self.values, self._visible(groups), scaling, softcap)


POSITION = "kvx_position"
"""The per-token statistic holding each token's position (pre-RoPE keys are rotated to it on read)."""


@dataclass
class PackedSegment(Segment):
    """Packed low-bit keys and values (:class:`kvx.kernels.quant.Packed`).

    ``rope``: None, or the model's RoPE (:class:`kvx.compat.Rope`) when the keys are packed before
    RoPE (KVQuant); they are rotated to their positions (the ``POSITION`` statistic) as they are read."""

    keys: quant.Packed | None = None
    values: quant.Packed | None = None
    rope: Rope | None = None

    @property
    def tokens(self) -> int:
        return self.keys.tokens

    def kv(self, dtype):
        keys = quant.dequantize(self.keys)
        if self.rope is not None:
            keys = self.rope.rotate(keys, self.state[POSITION])
        return keys.to(dtype), quant.dequantize(self.values, dtype)

    def kv_tensors(self):
        return self.keys.tensors() + self.values.tensors()

    def _gather_kv(self, indices, slot_valid):
        return PackedSegment(keys=quant.gather_tokens(self.keys, indices, slot_valid),
                             values=quant.gather_tokens(self.values, indices, slot_valid), rope=self.rope)

    def _cat_kv(self, other):
        return PackedSegment(keys=quant.concat(self.keys, other.keys), values=quant.concat(self.values, other.values),
                             rope=self.rope)

    def _map_kv(self, fn):
        return PackedSegment(keys=self.keys.map_rows(fn), values=self.values.map_rows(fn), rope=self.rope)

    def decode_part(self, query, scaling, softcap):
        """Dequantization fused into the decode kernel (the CPU path on CPU); pre-RoPE keys and
        outliers go through the block-wise path, which rotates and patches each dequantized block."""
        if self.rope is None and not self.keys.has_outliers and not self.values.has_outliers:
            return packed_decode_attention(query, self.keys, self.values, self.valid, scaling, softcap)
        rotate = None
        if self.rope is not None:
            positions = self.state[POSITION]
            rotate = lambda keys, start, stop: self.rope.rotate(keys, positions[..., start:stop])  # noqa: E731
        return quant.packed_attention_with_lse(query, self.keys, self.values, self.valid, scaling, softcap,
                                               key_transform=rotate)


def _gather(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``x [B, Hkv, S, D]`` at token ``indices [B, Hkv, K]`` -> ``[B, Hkv, K, D]``."""
    return x.gather(2, indices[..., None].expand(*indices.shape, x.shape[-1]))


def _real_or_none(valid: torch.Tensor) -> torch.Tensor | None:
    return None if bool(valid.all()) else valid.clone()
