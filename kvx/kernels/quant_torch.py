"""Decode attention over packed keys and values in torch, fast enough for the CPU.

What :func:`kvx.kernels.quant.packed_attention_with_lse` computes (that is the reference), but a
block of tokens at a time into one reused float buffer, with the scales folded into small
matrices instead of applied to every element:

- keys grouped per channel (KIVI): ``q . k_s = sum_d c_sd (q_d scale_gd) + sum_d q_d zero_gd`` for
  the tokens ``s`` of group ``g``: one batched matmul of the codes against ``q * scale`` per group;
- keys or values grouped per token (``group`` channels share a scale): the codes of each channel
  group are multiplied by the query (keys) or by ``p * scale`` (values, ``p`` the softmax
  weights) in one batched matmul over the groups, and the zero points add a rank-one term.

So each code is unpacked into the buffer once and read once by a matmul; nothing of the size of
the cache is scaled, shifted or allocated per step. Keys whose per-channel groups were thinned by
an eviction (``group_index``) take the plain route: dequantized in place in the buffer.
Online softmax across blocks, as flash-decoding.

Shapes: ``B`` batch, ``H`` query heads, ``Hkv`` KV heads, ``G = H / Hkv``, ``S`` tokens, ``n``
tokens in a block, ``D`` / ``Dv`` key / value head dims, ``R = B * Hkv``.
"""

from __future__ import annotations

import torch

from kvx.kernels import reference
from kvx.kernels.quant import Packed

BLOCK_ELEMENTS = 2**20  # codes unpacked per block (4 MB of float32): fewer, larger ops where rows are few
TINY_WEIGHT = 1e-30  # softmax weights below this (relative to the block's largest, 1) count as 0


def packed_decode(
    query: torch.Tensor,
    keys: Packed,
    values: Packed,
    valid: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
    block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per head ``[B, H, 1, D]`` over packed keys/values of ``S`` tokens; ``valid [B,
    Hkv, S]`` masks padding -> ``(out [B, H, 1, Dv], lse [B, H, 1])`` float32 (no valid token:
    out 0, lse -inf). ``block``: tokens per block (default: ``BLOCK_ELEMENTS`` codes per block,
    at least 1024 tokens)."""
    batch, heads, _, dim = query.shape
    kv_heads, tokens = keys.codes.shape[1], keys.tokens
    rows, groups, value_dim = batch * kv_heads, heads // kv_heads, values.dim
    q = query.reshape(rows, groups, dim).float()  # heads of a KV head are consecutive
    if block is None:
        block = max(1024, BLOCK_ELEMENTS // (rows * max(dim, value_dim)))
    if keys.axis == "channel" and keys.group_index is None:
        block = max(keys.group, block // keys.group * keys.group)  # whole key groups per block
    buffer = torch.empty(rows * min(block, max(tokens, 1)) * max(dim, value_dim), dtype=torch.float32,
                         device=query.device)
    running_max = torch.full((rows, groups), -torch.inf, device=query.device)
    running_sum = torch.zeros(rows, groups, device=query.device)
    acc = torch.zeros(rows, groups, value_dim, device=query.device)
    for start in range(0, tokens, block):
        stop = min(start + block, tokens)
        logits = _key_logits(q, keys, start, stop, buffer) * scaling  # [R, G, n]
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        if valid is not None:
            logits = logits.masked_fill(~valid[..., start:stop].reshape(rows, 1, stop - start), -torch.inf)
        block_max = logits.amax(-1)
        new_max = torch.maximum(running_max, block_max)
        safe_max = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
        correction = torch.exp(running_max - safe_max)
        weights = torch.exp(logits - safe_max[..., None])  # [R, G, n]
        weights.masked_fill_(weights < TINY_WEIGHT, 0.0)  # no denormals into the matmul (tens of times slower on CPU)
        running_sum = running_sum * correction + weights.sum(-1)
        acc = acc * correction[..., None] + _weighted_values(weights, values, start, stop, buffer)
        running_max = new_max
    out = torch.where(running_sum[..., None] > 0, acc / running_sum.clamp_min(1e-30)[..., None], torch.zeros_like(acc))
    lse = torch.where(running_sum > 0, torch.log(running_sum.clamp_min(1e-30)) + running_max,
                      torch.full_like(running_sum, -torch.inf))
    return out.reshape(batch, heads, 1, value_dim), lse.reshape(batch, heads, 1)


def _key_logits(q: torch.Tensor, keys: Packed, start: int, stop: int, buffer: torch.Tensor) -> torch.Tensor:
    """``q [R, G, D]`` against keys ``start:stop`` -> logits ``[R, G, n]`` (unscaled)."""
    rows, n, dim = q.shape[0], stop - start, keys.dim
    if keys.axis == "channel" and keys.group_index is None:
        codes = _unpack_tokens(keys, start, stop, buffer, rows, n, dim, lanes=True)  # [R, n, D] lane-major
        first, count = start // keys.group, n // keys.group
        scale = keys.scale[:, :, first : first + count].reshape(rows, count, dim).float()  # [R, m, D]
        zero = keys.zero[:, :, first : first + count].reshape(rows, count, dim).float() if keys.zero is not None else None
        scaled_q = scale[..., None] * q.transpose(1, 2)[:, None]  # [R, m, D, G]
        logits = torch.matmul(codes.view(rows, count, keys.group, dim), _lane_order(scaled_q, keys.bits, 2))  # [R, m, g, G]
        if zero is None:
            offset = -(2 ** (keys.bits - 1)) * scaled_q.sum(2)  # symmetric: (code - 2^(b-1)) * scale
        else:
            offset = torch.matmul(zero, q.transpose(1, 2))  # [R, m, G]
        return (logits + offset[:, :, None]).reshape(rows, n, -1).transpose(1, 2)
    if keys.axis == "token" and _lanes_fit(keys):
        partial = _grouped_products(keys, start, stop, buffer, rows, n, q.transpose(1, 2))  # [R, j, n, G]
        scale, zero = _token_scales(keys, start, stop, rows)  # [R, j, n]
        logits = (partial * scale[..., None]).sum(1)  # [R, n, G]
        q_sums = q.reshape(rows, q.shape[1], -1, keys.group).sum(-1)  # [R, G, j]
        if zero is None:
            logits = logits - 2 ** (keys.bits - 1) * torch.matmul(scale.transpose(1, 2), q_sums.transpose(1, 2))
        else:
            logits = logits + torch.matmul(zero.transpose(1, 2), q_sums.transpose(1, 2))
        return logits.transpose(1, 2)
    dense = _dequantized(keys, start, stop, buffer, rows, n)  # [R, n, D]
    return torch.matmul(q, dense.transpose(1, 2))


def _weighted_values(weights: torch.Tensor, values: Packed, start: int, stop: int, buffer: torch.Tensor) -> torch.Tensor:
    """``weights [R, G, n]`` times values ``start:stop`` -> ``[R, G, Dv]``."""
    rows, n = weights.shape[0], stop - start
    if values.axis == "token" and _lanes_fit(values):
        scale, zero = _token_scales(values, start, stop, rows)  # [R, j, n]
        scaled = weights[:, None] * scale[:, :, None, :]  # [R, j, G, n]
        codes = _unpack_grouped(values, start, stop, buffer, rows, n)  # [R, j, n, g], lane-major within a group
        out = _channel_order(torch.matmul(scaled, codes), values.bits, 3)  # [R, j, G, g]
        if zero is None:
            shift = -(2 ** (values.bits - 1)) * scaled.sum(-1)  # [R, j, G]
        else:
            shift = torch.matmul(zero, weights.transpose(1, 2))  # [R, j, G]
        out = out + shift[..., None]
        return out.permute(0, 2, 1, 3).reshape(rows, weights.shape[1], -1)
    return torch.matmul(weights, _dequantized(values, start, stop, buffer, rows, n))


def _lanes_fit(p: Packed) -> bool:
    """Whether each channel group is whole bytes of codes (then codes unpack into group-major lanes)."""
    return p.group % (8 // p.bits) == 0


def _token_scales(p: Packed, start: int, stop: int, rows: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token group scales and zeros of tokens ``start:stop``, ``[R, j, n]`` float32."""
    def take(t):
        return t[:, :, start:stop].reshape(rows, stop - start, -1).transpose(1, 2).float()
    return take(p.scale), None if p.zero is None else take(p.zero)


def _grouped_products(keys: Packed, start, stop, buffer, rows, n, q_t: torch.Tensor) -> torch.Tensor:
    """Per channel group ``j``: codes of the group times the query's channels of the group,
    ``[R, j, n, G]`` (``q_t [R, D, G]``)."""
    codes = _unpack_grouped(keys, start, stop, buffer, rows, n)  # [R, j, n, g], lane-major within a group
    q_groups = q_t.reshape(rows, -1, keys.group, q_t.shape[-1])  # [R, j, g, G]
    return torch.matmul(codes, _lane_order(q_groups, keys.bits, 2))


def _unpack_tokens(p: Packed, start, stop, buffer, rows, n, dim, lanes: bool = False) -> torch.Tensor:
    """Codes of tokens ``start:stop`` as floats ``[R, n, D]`` in ``buffer``; ``lanes``: channels in
    lane-major order (see :func:`_lane_order`), else in their own order."""
    out = buffer[: rows * n * dim].view(rows, n, dim)
    codes = p.codes[:, :, start:stop].reshape(rows, n, -1)
    _unpack_lanes(out, codes, p.bits) if lanes else _unpack_interleaved(out, codes, p.bits)
    return out


def _unpack_grouped(p: Packed, start, stop, buffer, rows, n) -> torch.Tensor:
    """Codes of tokens ``start:stop`` as floats, channel groups first: ``[R, j, n, g]`` in ``buffer``,
    lane-major within each group."""
    groups = p.dim // p.group
    out = buffer[: rows * n * p.dim].view(rows, groups, n, p.group)
    codes = p.codes[:, :, start:stop].reshape(rows, n, groups, -1)  # [R, n, j, g * bits / 8]
    _unpack_lanes(out.permute(0, 2, 1, 3), codes, p.bits)  # written through an [R, n, j, g] view
    return out


def _unpack_lanes(out: torch.Tensor, codes: torch.Tensor, bits: int) -> None:
    """Write uint8 ``codes [..., C * bits / 8]`` as floats into ``out [..., C]`` lane by lane: lane
    ``k`` (bits ``k * bits`` and up of every byte) fills ``out[..., k * C / L : (k + 1) * C / L]``,
    ``L = 8 / bits`` lanes, each a contiguous converting copy."""
    if bits == 8:
        out.copy_(codes)
        return
    codes = codes.contiguous()  # (a slice of a row of heads; shifts over a strided uint8 view are far slower)
    per_byte, mask, width = 8 // bits, 2**bits - 1, codes.shape[-1]
    for lane in range(per_byte):
        out[..., lane * width : (lane + 1) * width].copy_((codes >> (bits * lane)) & mask if lane else codes & mask)


def _unpack_interleaved(out: torch.Tensor, codes: torch.Tensor, bits: int) -> None:
    """Write uint8 ``codes [..., C * bits / 8]`` unpacked into float ``out [..., C]`` in channel order
    (lowest bits first: lane ``k`` of every byte is channel ``k`` modulo ``8 / bits``)."""
    if bits == 8:
        out.copy_(codes)
        return
    codes = codes.contiguous()
    per_byte, mask = 8 // bits, 2**bits - 1
    for lane in range(per_byte):
        out[..., lane::per_byte].copy_((codes >> (bits * lane)) & mask if lane else codes & mask)


def _lane_order(x: torch.Tensor, bits: int, axis: int) -> torch.Tensor:
    """Channels of ``x`` along ``axis`` re-ordered as :func:`_unpack_lanes` writes codes: channel
    ``L * i + k`` moves to ``k * C / L + i``."""
    per_byte = 8 // bits
    if per_byte == 1:
        return x
    return x.unflatten(axis, (-1, per_byte)).transpose(axis, axis + 1).flatten(axis, axis + 1)


def _channel_order(x: torch.Tensor, bits: int, axis: int) -> torch.Tensor:
    """The inverse of :func:`_lane_order`."""
    per_byte = 8 // bits
    if per_byte == 1:
        return x
    return x.unflatten(axis, (per_byte, -1)).transpose(axis, axis + 1).flatten(axis, axis + 1)


def _dequantized(p: Packed, start, stop, buffer, rows, n) -> torch.Tensor:
    """Tokens ``start:stop`` dequantized in place in ``buffer``: ``[R, n, C]`` float32."""
    out = _unpack_tokens(p, start, stop, buffer, rows, n, p.dim)  # channel order
    if p.axis == "token":
        scale = p.scale[:, :, start:stop].reshape(rows, n, -1, 1).float()
        view = out.view(rows, n, -1, p.group)
        zero = None if p.zero is None else p.zero[:, :, start:stop].reshape(rows, n, -1, 1).float()
    else:
        index = p.token_groups()[..., start:stop]
        take = lambda t: reference.take_tokens(t, index).reshape(rows, n, -1).float()  # noqa: E731
        scale, view = take(p.scale), out
        zero = None if p.zero is None else take(p.zero)
    if zero is None:
        view.sub_(2 ** (p.bits - 1)).mul_(scale)
    else:
        view.mul_(scale).add_(zero)
    return out
