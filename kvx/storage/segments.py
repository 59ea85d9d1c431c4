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
from kvx.storage.base import TokenReader


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

    def kv_at(self, indices: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[B, Hkv, K, D]`` of tokens ``indices [B, Hkv, K]`` in ``dtype``, equal to
        :meth:`kv` at those tokens, reading (dequantizing) only them."""
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

    def kv_at(self, indices, dtype):
        return _gather(self.keys, indices), _gather(self.values, indices)

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

    def kv_at(self, indices, dtype):
        keys = quant.dequantize_tokens(self.keys, indices)
        if self.rope is not None:
            keys = self.rope.rotate(keys, self.state[POSITION].gather(2, indices))
        return keys.to(dtype), quant.dequantize_tokens(self.values, indices, dtype)

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


class SegmentsReader(TokenReader):
    """Segments in stored order (a layer's prefix, then its dense tail as a :class:`FullSegment`) read
    as one :class:`~kvx.storage.base.TokenReader`: slots numbered across them as in the layer's
    dense view, a chosen slot read (dequantized) from its own segment alone. ``dtype``: what packed
    tokens are dequantized to (the tail's dtype)."""

    persistent = True

    def __init__(self, segments: list[Segment], dtype: torch.dtype):
        self.segments, self.dtype = segments, dtype
        sizes = [segment.tokens for segment in segments]
        self.starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self.stored = sum(sizes)
        self._valid: torch.Tensor | None = None

    @property
    def valid(self) -> torch.Tensor:
        """``[B, Hkv, S]`` bool over every segment's slots (built on first use)."""
        if self._valid is None:
            batch, kv_heads = self.segments[-1].kv_tensors()[0].shape[:2]
            device = self.segments[-1].kv_tensors()[0].device
            self._valid = torch.cat([s.valid_mask(batch, kv_heads, device) for s in self.segments], -1)
        return self._valid

    def keys(self) -> torch.Tensor:
        return torch.cat([segment.kv(self.dtype)[0] for segment in self.segments], 2)

    def new_key(self) -> torch.Tensor:
        last = self.segments[-1]
        index = torch.full((*last.kv_tensors()[0].shape[:2], 1), last.tokens - 1, device=last.kv_tensors()[0].device)
        return last.kv_at(index, self.dtype)[0]

    def appended_real(self) -> bool:
        last = self.segments[-1]
        return last.valid is None or bool(last.valid[..., -1].all())

    def gather(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys = values = None
        for segment, start in zip(self.segments, self.starts):
            inside = (slots >= start) & (slots < start + segment.tokens)  # [B, Hkv, T]
            if segment.tokens == 0 or not bool(inside.any()):
                continue
            k, v = segment.kv_at((slots - start).clamp(0, segment.tokens - 1), self.dtype)
            if keys is None:  # every slot belongs to one segment: later ones overwrite theirs
                keys, values = k, v
            else:
                keys, values = torch.where(inside[..., None], k, keys), torch.where(inside[..., None], v, values)
        return keys, values


def _gather(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``x [B, Hkv, S, D]`` at token ``indices [B, Hkv, K]`` -> ``[B, Hkv, K, D]``."""
    return reference.take_tokens(x, indices)


def _real_or_none(valid: torch.Tensor) -> torch.Tensor | None:
    return None if bool(valid.all()) else valid.clone()


class RaggedSegment:
    """A segment whose every (row, KV head) holds its own number of tokens, with no padding to the
    longest: quantized storage under head-wise budgets (``head_budget+kivi``), where one head may
    keep many times what another keeps. ``parts[b][h]``: the tokens of row ``b``, KV head ``h`` as a
    segment of shape ``[1, 1, n_bh, ...]`` in its own layout (None when it holds none).

    It reads and is read as a :class:`Segment` left-padded to its longest (row, head) (``kv``,
    ``valid_mask``, ``state``), but stores only real tokens; decode attends over each part in its own
    layout (a loop over rows and KV heads: each part's kernel is vectorised over its tokens)."""

    def __init__(self, parts: list[list[Segment | None]]):
        self.parts = parts

    @classmethod
    def from_padded(cls, segment: Segment) -> RaggedSegment:
        """Split ``segment [B, Hkv, n]`` into its (row, head) parts, dropping its padding slots."""
        batch, kv_heads = segment.kv_tensors()[0].shape[:2]
        valid = segment.valid_mask(batch, kv_heads, segment.kv_tensors()[0].device)
        parts = []
        for b in range(batch):
            row = []
            for h in range(kv_heads):
                part = segment.map_rows(lambda t, b=b, h=h: t[b : b + 1, h : h + 1])
                row.append(part.keep(valid[b : b + 1, h : h + 1]) if bool(valid[b, h].any()) else None)
            parts.append(row)
        return cls(parts)

    # --- sizes --------------------------------------------------------------------------------

    def _present(self) -> list[Segment]:
        return [part for row in self.parts for part in row if part is not None]

    def counts(self) -> torch.Tensor:
        """``[B, Hkv]`` tokens of each part (CPU)."""
        return torch.tensor([[0 if part is None else part.tokens for part in row] for row in self.parts])

    @property
    def tokens(self) -> int:
        return int(self.counts().max()) if self.parts else 0

    def kept(self) -> torch.Tensor:
        return self.counts()

    # --- the padded view ----------------------------------------------------------------------

    def _pad(self, pieces: list[list[torch.Tensor | None]], like: torch.Tensor, width: int) -> torch.Tensor:
        """Stack per-part tensors ``[1, 1, n_bh, ...]`` into ``[B, Hkv, width, ...]``, padding on the left
        with zeros (``like``: any part's tensor, for the trailing shape, dtype and device)."""
        rows = []
        for row in pieces:
            heads = []
            for piece in row:
                n = 0 if piece is None else piece.shape[2]
                pad = like.new_zeros(1, 1, width - n, *like.shape[3:])
                heads.append(pad if piece is None else torch.cat([pad, piece], dim=2))
            rows.append(torch.cat(heads, dim=1))
        return torch.cat(rows, dim=0)

    def _first(self) -> Segment:
        return self._present()[0]

    def kv(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [[None if part is None else part.kv(dtype) for part in row] for row in self.parts]
        like_k, like_v = next(pair for row in pairs for pair in row if pair is not None)  # (each part read once)
        width = self.tokens
        keys = self._pad([[None if p is None else p[0] for p in row] for row in pairs], like_k, width)
        values = self._pad([[None if p is None else p[1] for p in row] for row in pairs], like_v, width)
        return keys, values

    def valid_mask(self, batch: int, kv_heads: int, device: torch.device) -> torch.Tensor:
        counts = self.counts().to(device)
        slots = torch.arange(self.tokens, device=device)
        return slots >= (self.tokens - counts)[..., None]  # real tokens are the last n_bh slots

    @property
    def state(self) -> dict[str, torch.Tensor]:
        names = set().union(*(part.state for part in self._present()))
        return {name: self.stat(name, len(self.parts), len(self.parts[0]), self._first().kv_tensors()[0].device)
                for name in names}

    @state.setter
    def state(self, padded: dict[str, torch.Tensor]) -> None:
        width = self.tokens
        for b, row in enumerate(self.parts):
            for h, part in enumerate(row):
                if part is not None:
                    part.state = {name: stat[b : b + 1, h : h + 1, width - part.tokens :] for name, stat in padded.items()}

    def stat(self, name: str, batch: int, kv_heads: int, device: torch.device) -> torch.Tensor:
        pieces = [[None if part is None else part.stat(name, 1, 1, device)[..., None] for part in row]
                  for row in self.parts]
        like = torch.zeros(1, 1, 0, 1, device=device)
        return self._pad(pieces, like, self.tokens)[..., 0]

    # --- changes ------------------------------------------------------------------------------

    def keep(self, keep: torch.Tensor) -> RaggedSegment:
        """The tokens marked in ``keep [B, Hkv, n]`` (a mask over the padded view)."""
        width, parts = keep.shape[-1], []
        for b, row in enumerate(self.parts):
            kept_row = []
            for h, part in enumerate(row):
                mask = None if part is None else keep[b : b + 1, h : h + 1, width - part.tokens :]
                kept_row.append(part.keep(mask) if mask is not None and bool(mask.any()) else None)
            parts.append(kept_row)
        return RaggedSegment(parts)

    def append(self, other: RaggedSegment) -> RaggedSegment:
        """Each part's tokens, then ``other``'s part of the same row and head."""
        joined = [[a if b is None else b if a is None else a.append(b) for a, b in zip(mine, theirs)]
                  for mine, theirs in zip(self.parts, other.parts)]
        return RaggedSegment(joined)

    def map_rows(self, fn) -> RaggedSegment:
        """Re-order / repeat / select rows with ``fn`` (as it acts on a ``[B, ...]`` tensor)."""
        rows = fn(torch.arange(len(self.parts), device=self._first().kv_tensors()[0].device)[:, None])[:, 0].tolist()
        copy = lambda part: None if part is None else part.map_rows(lambda t: t)  # noqa: E731  (own state dicts)
        return RaggedSegment([[copy(part) for part in self.parts[r]] for r in rows])

    def held_tensors(self) -> list[torch.Tensor]:
        return [t for part in self._present() for t in part.held_tensors()]

    def kv_tensors(self) -> list[torch.Tensor]:
        return [t for part in self._present() for t in part.kv_tensors()]

    def decode_part(self, query: torch.Tensor, scaling: float, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One query per head ``[B, H, 1, D]`` over each (row, KV head) part: ``(out [B, H, 1, Dv], lse [B, H, 1])``."""
        batch, heads = query.shape[:2]
        groups = heads // len(self.parts[0])
        outs, lses = [], []
        for b, row in enumerate(self.parts):
            for h, part in enumerate(row):
                q = query[b : b + 1, h * groups : (h + 1) * groups]
                if part is None:
                    outs.append(None)
                    lses.append(torch.full((1, groups, 1), -torch.inf, device=query.device))
                    continue
                out, lse = part.decode_part(q, scaling, softcap)
                outs.append(out)
                lses.append(lse)
        like = next(out for out in outs if out is not None)
        outs = [torch.zeros_like(like) if out is None else out for out in outs]
        out = torch.cat(outs, dim=1).reshape(batch, heads, 1, like.shape[-1])
        return out, torch.cat(lses, dim=1).reshape(batch, heads, 1)
