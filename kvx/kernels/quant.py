"""Packed low-bit keys and values, and the torch reference ops over them.

Layout of one packed tensor (:class:`Packed`), standing for ``x [B, Hkv, S, D]``:

- ``codes [B, Hkv, S, D * bits / 8]`` uint8: ``bits``-bit unsigned codes packed along ``D``,
  ``8 / bits`` per byte, the lowest bits first;
- ``scale``, ``zero`` float16, one per group: ``x ~ code * scale + zero`` (asymmetric), or
  ``x ~ (code - 2^(bits-1)) * scale`` (symmetric: no ``zero`` stored);
- groups run along one axis:
  - ``"token"``: ``group`` consecutive channels of one token, ``scale [B, Hkv, S, D / group]``
    (values in KIVI, keys and values in int8);
  - ``"channel"``: ``group`` consecutive tokens of one channel, ``scale [B, Hkv, S / group, D]``
    (keys in KIVI: Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache",
    2024). Once tokens inside a group are evicted, ``group_index [B, Hkv, S]`` names each
    token's group; until then it is None and token ``s`` is in group ``s // group``.

So the quantized part costs exactly ``bits / 8 + 2 * 2 / group`` bytes per element (asymmetric),
``bits / 8 + 2 / group`` (symmetric), plus ``group_index`` after an eviction inside it.

Dense-and-sparse (KVQuant: Hooper et al., "KVQuant: Towards 10 Million Context Length LLM Inference
with KV Cache Quantization", 2024): with ``outliers=k``, the ``k`` elements of each token farthest
from their group's mean are kept exactly, ``outlier_index [B, Hkv, S, k]`` (uint8, or int16 past
256 channels) and ``outlier_value [B, Hkv, S, k]`` (the input's dtype), and are left out of the
scale and zero point, so the other elements get finer steps.

Attention over packed keys and values (:func:`packed_attention_with_lse`) dequantizes a block of
tokens at a time: never the whole cache per step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from kvx.kernels import reference

AXES = ("token", "channel")
BITS = (2, 4, 8)
SCALE_DTYPE = torch.float16


@dataclass
class Packed:
    """Low-bit codes with their groups' scales and zero points (see the module docstring)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    group: int
    axis: str
    group_index: torch.Tensor | None = None
    outlier_index: torch.Tensor | None = None
    outlier_value: torch.Tensor | None = None

    @property
    def tokens(self) -> int:
        return self.codes.shape[-2]

    @property
    def dim(self) -> int:
        return self.codes.shape[-1] * 8 // self.bits

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor it holds (its bytes)."""
        return [t for t in (self.codes, self.scale, self.zero, self.group_index, self.outlier_index,
                            self.outlier_value) if t is not None]

    @property
    def has_outliers(self) -> bool:
        return self.outlier_index is not None

    def token_groups(self) -> torch.Tensor:
        """``[B, Hkv, S]`` long: the scale group of every token (``"channel"`` axis)."""
        if self.group_index is not None:
            return self.group_index.long()
        batch, heads, tokens = self.codes.shape[:3]
        groups = torch.arange(tokens, device=self.codes.device) // self.group
        return groups.expand(batch, heads, tokens)

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Packed:
        """Apply a row (batch) re-order / repeat / select ``fn`` to every tensor."""
        maybe = lambda t: None if t is None else fn(t)  # noqa: E731
        return replace(self, codes=fn(self.codes), scale=fn(self.scale), zero=maybe(self.zero),
                       group_index=maybe(self.group_index), outlier_index=maybe(self.outlier_index),
                       outlier_value=maybe(self.outlier_value))

    def per_token(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor | None]:
        """The outlier fields with ``fn`` applied along their token axis (they are per token)."""
        if self.outlier_index is None:
            return {}
        return {"outlier_index": fn(self.outlier_index), "outlier_value": fn(self.outlier_value)}


def check_layout(bits: int, group: int, dim: int, axis: str, who: str = "quantized storage") -> None:
    """Raise a ValueError naming the value and the valid choices unless the layout can hold ``dim``."""
    if bits not in BITS:
        raise ValueError(f"{who}: bits must be one of {', '.join(map(str, BITS))}, got {bits!r}")
    if axis not in AXES:
        raise ValueError(f"{who}: axis must be one of {', '.join(AXES)}, got {axis!r}")
    if (dim * bits) % 8:
        raise ValueError(f"{who}: {bits}-bit codes of a head dim of {dim} do not fill whole bytes")
    if axis == "token" and dim % group:
        raise ValueError(f"{who}: group ({group}) must divide the head dim ({dim}) for per-token groups")


def quantize(x: torch.Tensor, bits: int, group: int, axis: str, symmetric: bool = False, outliers: int = 0) -> Packed:
    """Quantize ``x [B, Hkv, S, D]``; on the ``"channel"`` axis ``S`` must be a multiple of ``group``.
    ``outliers``: elements per token kept exactly (dense-and-sparse, module docstring)."""
    batch, heads, tokens, dim = x.shape
    check_layout(bits, group, dim, axis)
    if axis == "channel" and tokens % group:
        raise ValueError(f"per-channel groups take a multiple of {group} tokens, got {tokens}")
    if not 0 <= outliers <= dim:
        raise ValueError(f"outliers per token must be between 0 and the head dim ({dim}), got {outliers}")
    sparse = {}
    if outliers:
        x, sparse = _split_outliers(x, group, axis, outliers)
    grouped = _grouped(x.float(), group, axis)  # [..., n_groups, group] along the grouped axis
    scale, zero = _scale_and_zero(grouped, bits, symmetric)
    levels = 2**bits - 1
    if symmetric:
        codes = torch.round(grouped / scale.float()[..., None]) + 2 ** (bits - 1)
    else:
        codes = torch.round((grouped - zero.float()[..., None]) / scale.float()[..., None])
    codes = torch.nan_to_num(codes, nan=0.0).clamp_(0, levels).to(torch.uint8)
    return Packed(_pack(_ungrouped(codes, x.shape, group, axis), bits), scale, zero, bits, group, axis, **sparse)


def _split_outliers(x: torch.Tensor, group: int, axis: str, count: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The ``count`` elements of each token of ``x [B, Hkv, S, D]`` farthest from their group's mean:
    ``x`` with them set to that mean (so they widen no group's range), and their indices and values."""
    grouped = _grouped(x.float(), group, axis)
    center = _ungrouped(grouped.mean(-1, keepdim=True).expand_as(grouped), x.shape, group, axis)  # [B, Hkv, S, D]
    index = (x.float() - center).abs().topk(count, dim=-1).indices  # [B, Hkv, S, k]
    inliers = x.scatter(-1, index, center.gather(-1, index).to(x.dtype))
    index_dtype = torch.uint8 if x.shape[-1] <= 256 else torch.int16
    return inliers, {"outlier_index": index.to(index_dtype), "outlier_value": x.gather(-1, index)}


def dequantize(p: Packed, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x [B, Hkv, S, D]`` in ``dtype`` from a packed tensor."""
    codes = _unpack(p.codes, p.bits).float()
    scale = _per_element(p, p.scale)
    if p.zero is None:
        x = (codes - 2 ** (p.bits - 1)) * scale
    else:
        x = codes * scale + _per_element(p, p.zero)
    if p.outlier_index is not None:
        x.scatter_(-1, p.outlier_index.long(), p.outlier_value.float())
    return x.to(dtype)


def _per_element(p: Packed, per_group: torch.Tensor) -> torch.Tensor:
    """A group-wise tensor broadcast to ``[B, Hkv, S, D]`` float32."""
    per_group = per_group.float()
    if p.axis == "token":  # [B, Hkv, S, D/g] -> [B, Hkv, S, D]
        return per_group.repeat_interleave(p.group, dim=-1)
    groups = p.token_groups()
    return reference.take_tokens(per_group, groups)  # [B, Hkv, S_groups, D] -> [B, Hkv, S, D]


def _grouped(x: torch.Tensor, group: int, axis: str) -> torch.Tensor:
    """``[B, Hkv, S, D]`` -> groups last: ``[B, Hkv, S, D/g, g]`` (token) or ``[B, Hkv, S/g, D, g]`` (channel)."""
    batch, heads, tokens, dim = x.shape
    if axis == "token":
        return x.reshape(batch, heads, tokens, dim // group, group)
    return x.reshape(batch, heads, tokens // group, group, dim).transpose(-1, -2)


def _ungrouped(grouped: torch.Tensor, shape: torch.Size, group: int, axis: str) -> torch.Tensor:
    if axis == "token":
        return grouped.reshape(shape)
    return grouped.transpose(-1, -2).reshape(shape)


def _scale_and_zero(grouped: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per group: float16 ``(scale, zero)``; zero is None when symmetric."""
    if symmetric:
        absmax = grouped.abs().amax(-1)
        return (absmax / (2 ** (bits - 1) - 1)).to(SCALE_DTYPE).clamp_min(torch.finfo(SCALE_DTYPE).tiny), None
    low, high = grouped.amin(-1), grouped.amax(-1)
    zero = low.to(SCALE_DTYPE)
    scale = ((high - zero.float()) / (2**bits - 1)).to(SCALE_DTYPE).clamp_min(torch.finfo(SCALE_DTYPE).tiny)
    return scale, zero


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[..., D]`` (each < 2^bits) -> ``[..., D * bits / 8]``, lowest bits first."""
    if bits == 8:
        return codes.contiguous()
    per_byte = 8 // bits
    lanes = codes.reshape(*codes.shape[:-1], -1, per_byte)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (lanes << shifts).sum(-1, dtype=torch.uint8)


def _unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """``[..., D * bits / 8]`` uint8 -> codes ``[..., D]`` uint8."""
    if bits == 8:
        return packed
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    lanes = (packed[..., None] >> shifts) & (2**bits - 1)
    return lanes.reshape(*packed.shape[:-1], -1)


def concat(first: Packed | None, second: Packed) -> Packed:
    """Tokens of ``first`` then ``second`` (same layout; ``first`` None: ``second``)."""
    if first is None:
        return second
    codes = torch.cat([first.codes, second.codes], dim=2)
    scale = torch.cat([first.scale, second.scale], dim=2)
    zero = None if first.zero is None else torch.cat([first.zero, second.zero], dim=2)
    group_index = None
    if first.axis == "channel" and (first.group_index is not None or second.group_index is not None):
        offset = first.scale.shape[2]  # the second's groups follow the first's
        group_index = torch.cat([first.token_groups(), second.token_groups() + offset], 2)
        group_index = group_index.to(torch.int16 if scale.shape[2] < 2**15 else torch.int32)
    if first.has_outliers != second.has_outliers:
        raise ValueError("cannot join packed tensors with and without outliers")
    sparse = {}
    if first.has_outliers:
        sparse = {"outlier_index": torch.cat([first.outlier_index, second.outlier_index], dim=2),
                  "outlier_value": torch.cat([first.outlier_value, second.outlier_value], dim=2)}
    return replace(first, codes=codes, scale=scale, zero=zero, group_index=group_index, **sparse)


def gather_tokens(p: Packed, indices: torch.Tensor, slot_valid: torch.Tensor | None = None) -> Packed:
    """The tokens ``indices [B, Hkv, K]`` of ``p``, in that order (``slot_valid [B, Hkv, K]``: False
    on padding slots, which hold any token). Per-channel groups keep their scales: each kept token
    records its group (``group_index``), and groups no real token uses any more are dropped, so
    memory follows the kept tokens."""
    gather = lambda t: reference.take_tokens(t, indices)  # noqa: E731
    codes, sparse = gather(p.codes), p.per_token(gather)
    if p.axis == "token":
        return replace(p, codes=codes, scale=gather(p.scale), zero=None if p.zero is None else gather(p.zero), **sparse)
    groups = p.token_groups().gather(2, indices)
    if slot_valid is not None:  # padding slots (on the left) share the first real token's group
        first = groups.masked_fill(~slot_valid, torch.iinfo(groups.dtype).max).amin(-1, keepdim=True)
        groups = torch.where(slot_valid, groups, first.clamp(max=max(p.scale.shape[2] - 1, 0)))
    return _compact_groups(replace(p, codes=codes, **sparse), groups, p.scale, p.zero)


def _compact_groups(p: Packed, groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> Packed:
    """Renumber the groups of ``groups [B, Hkv, K]`` (ascending per row and head) densely from 0 and
    keep only the scales and zero points of groups still in use."""
    starts = torch.ones_like(groups, dtype=torch.bool)
    starts[..., 1:] = groups[..., 1:] != groups[..., :-1]
    new_index = starts.long().cumsum(-1) - 1  # [B, Hkv, K]
    used = int(new_index[..., -1].max()) + 1 if groups.shape[-1] else 0
    source = torch.zeros(*groups.shape[:2], used, dtype=torch.long, device=groups.device)
    source.scatter_(2, new_index, groups)  # new group -> old group
    take = lambda t: reference.take_tokens(t, source)  # noqa: E731
    index_dtype = torch.int16 if used < 2**15 else torch.int32
    return replace(p, scale=take(scale), zero=None if zero is None else take(zero),
                   group_index=new_index.to(index_dtype))


def packed_attention_with_lse(
    query: torch.Tensor,
    keys: Packed,
    values: Packed,
    valid: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
    block: int = 1024,
    key_transform: Callable[[torch.Tensor, int, int], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``query [B, H, q, D]`` over every (valid) packed token: ``(out [B, H, q, Dv],
    lse [B, H, q])`` float32, for :func:`kvx.kernels.reference.merge_attention`. Dequantizes
    ``block`` tokens at a time (GQA native, no expansion of keys/values); ``valid [B, Hkv, S]``
    masks padding slots. ``key_transform(keys, start, stop)``: applied to each dequantized block of
    keys (float32) before use (pre-RoPE keys get their RoPE there). No token: out 0, lse -inf."""
    if keys.tokens == 0:
        shape = query.shape[:3]
        return (torch.zeros(*shape, values.dim, device=query.device),
                torch.full(shape, -torch.inf, device=query.device))
    parts = []
    for start in range(0, keys.tokens, block):
        stop = min(start + block, keys.tokens)
        k = dequantize(_token_slice(keys, start, stop))
        k = (k if key_transform is None else key_transform(k, start, stop)).to(query.dtype)
        v = dequantize(_token_slice(values, start, stop), query.dtype)
        mask = None
        if valid is not None:
            groups = query.shape[1] // valid.shape[1]
            mask = reference.expand_kv_heads(valid[..., start:stop], groups)[:, :, None, :]
        parts.append(reference.attention_with_lse(query, k, v, mask, scaling, softcap))
    return reference.merge_with_lse(parts)


def _token_slice(p: Packed, start: int, stop: int) -> Packed:
    """Tokens ``start:stop`` of ``p`` (per-channel scales re-indexed to the slice's groups)."""
    codes, sparse = p.codes[:, :, start:stop], p.per_token(lambda t: t[:, :, start:stop])
    if p.axis == "token":
        return replace(p, codes=codes, scale=p.scale[:, :, start:stop],
                       zero=None if p.zero is None else p.zero[:, :, start:stop], **sparse)
    groups = p.token_groups()[..., start:stop]
    index = groups[..., None].expand(*groups.shape, p.scale.shape[-1])
    take = lambda t: t.gather(2, index)  # noqa: E731  per-token scales of the slice [B, Hkv, n, D]
    return replace(p, codes=codes, scale=take(p.scale), zero=None if p.zero is None else take(p.zero),
                   group=1, group_index=None, **sparse)


def take_tokens(p: Packed, indices: torch.Tensor) -> Packed:
    """Tokens ``indices [B, Hkv, K]`` of ``p`` (any order, repeats allowed) with their own per-token
    scales (per-channel groups re-indexed as in :func:`_token_slice`): what
    :func:`dequantize_tokens` reads. Not a storage layout (it repeats scales per token)."""
    take = lambda t: reference.take_tokens(t, indices)  # noqa: E731
    codes, sparse = take(p.codes), p.per_token(take)
    if p.axis == "token":
        return replace(p, codes=codes, scale=take(p.scale), zero=None if p.zero is None else take(p.zero), **sparse)
    groups = p.token_groups().gather(2, indices)  # [B, Hkv, K]
    per_group = lambda t: reference.take_tokens(t, groups)  # noqa: E731  per-token scales [B, Hkv, K, D]
    return replace(p, codes=codes, scale=per_group(p.scale), zero=None if p.zero is None else per_group(p.zero),
                   group=1, group_index=None, **sparse)


def dequantize_tokens(p: Packed, indices: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x [B, Hkv, K, D]`` in ``dtype`` at tokens ``indices [B, Hkv, K]`` of ``p``: only those
    tokens are read and dequantized, bit for bit as :func:`dequantize` gives them."""
    return dequantize(take_tokens(p, indices), dtype)


def error_bound(x: torch.Tensor, bits: int, group: int, axis: str, symmetric: bool = False) -> torch.Tensor:
    """Largest round-trip error ``|x - dequantize(quantize(x))|`` the layout allows per element:
    half a step, plus the float16 rounding of the scale and zero point."""
    grouped = _grouped(x.float(), group, axis)
    scale, zero = _scale_and_zero(grouped, bits, symmetric)
    step = scale.float()[..., None]
    slack = step * (2**bits) * 2**-10 + (0 if zero is None else zero.float().abs()[..., None] * 2**-10)
    return _ungrouped((0.5 * step + slack).expand_as(grouped), x.shape, group, axis)


__all__ = ["AXES", "BITS", "Packed", "check_layout", "concat", "dequantize", "dequantize_tokens", "error_bound", "gather_tokens",
           "packed_attention_with_lse", "quantize"]
