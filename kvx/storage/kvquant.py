"""KVQuant: keys quantized per channel before RoPE, the largest outliers kept exactly, values per token.

Paper: Hooper et al., "KVQuant: Towards 10 Million Context Length LLM Inference with KV Cache
Quantization" (NeurIPS 2024). Keys have outlier channels before RoPE; RoPE rotates pairs of
channels by position-dependent angles and mixes them, so per-channel scales fit the keys best
before it. This storage un-rotates each key with the model's own RoPE (:class:`kvx.compat.Rope`)
when it leaves the full-precision window, quantizes it per channel in groups of ``group`` tokens,
and rotates it back to its position as it is read (the positions are the ones the cache counted:
real tokens before it in its row). Dense-and-sparse: the ``outliers`` fraction of each token's
elements farthest from their group's mean is kept exactly beside the codes, so the rest get finer
steps. Values are quantized per token. The first ``sink`` tokens stay at full precision (KVQuant's
attention-sink-aware quantization keeps the first token).

What differs from the paper: uniform levels, not its non-uniform (sensitivity-weighted k-means)
datatype, and outliers chosen per token (``ceil(outliers * head_dim)`` per token) rather than by
per-vector calibrated thresholds; nothing needs calibration. Reads go through the block-wise torch
path (dequantize a block, patch outliers, rotate, attend), not the fused Triton decode kernel.
Storage: :mod:`kvx.storage.quantized`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvx.compat import Rope
from kvx.policy import option, register_policy
from kvx.storage.quantized import RAGGED_HELP, QuantizedLayer, QuantizedStoragePolicy, QuantSpec, check_bits
from kvx.storage.segments import POSITION, Segment


class KvQuantLayer(QuantizedLayer):
    """A quantized layer whose packed keys are stored before RoPE (``stats()`` kind ``kvquant``).

    Each token's position is a per-token statistic (``POSITION``), so it follows the token through
    eviction and re-ordering; ``rope`` is bound by ``kvx.patch`` (``KVCache.bind_ropes``)."""

    kind = "kvquant"
    needs_rope = True

    def __init__(self, spec: QuantSpec, **kwargs: Any):
        super().__init__(spec, **kwargs)
        self.rope: Rope | None = None

    def begin_step(self, given_mask: torch.Tensor | None, q_len: int, num_heads: int) -> torch.Tensor | None:
        mask = super().begin_step(given_mask, q_len, num_heads)
        self._record_positions(q_len)
        return mask

    def _record_positions(self, q_len: int) -> None:
        """The positions of the ``q_len`` new tokens: the real tokens before each in its row (as
        transformers numbers them with left padding); padding slots get 0."""
        new_valid = self.valid_mask()[..., -q_len:]  # [B, Hkv, q]: padding is per row
        before = (self.real_seen - new_valid[:, 0].sum(-1).cpu()).to(new_valid.device)  # [B]
        positions = (before[:, None, None] + new_valid.long().cumsum(-1) - 1).clamp(min=0)
        stored = self.state.get(POSITION)
        if stored is None:  # the first step: the tail holds only the new tokens
            stored = torch.zeros(new_valid.shape[0], new_valid.shape[1], self.keys.shape[-2], device=new_valid.device)
        stored[..., -q_len:] = positions.float()
        self.state[POSITION] = stored

    def _new_segment(self, index: int, keys: torch.Tensor, values: torch.Tensor,
                     state: dict[str, torch.Tensor]) -> Segment:
        if index != self.PACKED:
            return super()._new_segment(index, keys, values, state)
        if self.rope is None:
            raise RuntimeError(f"{self.spec.owner} storage needs the model's RoPE, which kvx.patch binds to its cache; "
                               "use it through kvx.patch(model, ...)")
        unrotated = self.rope.rotate(keys, state[POSITION], inverse=True).to(keys.dtype)
        segment = super()._new_segment(index, unrotated, values, state)
        segment.rope = self.rope
        return segment


@register_policy
@dataclass
class KvQuant(QuantizedStoragePolicy):
    """2- or 4-bit keys per channel before RoPE and values per token, with exact outliers (Hooper et al., 2024)."""

    name: ClassVar[str] = "kvquant"
    summary: ClassVar[str] = ("storage: 2/4-bit KV, keys per channel before RoPE, the largest 1% kept exactly "
                              "(KVQuant, Hooper et al., 2024)")
    storage: ClassVar[str] = "kvquant"
    needs_rope: ClassVar[bool] = True
    valid_bits: ClassVar[tuple[int, ...]] = (2, 4)

    bits: int = option(4, "bits per key and value element: 2 or 4")
    outliers: float = option(0.01, "fraction of each token's key and value elements kept exactly, from 0 to 1 "
                                   "(dense-and-sparse; rounded up per token)")
    group: int = option(32, "tokens per key scale (per channel, before RoPE), channels per value scale (per token)")
    window: int = option(128, "most recent tokens kept at full precision (quantized group by group as it fills)")
    sink: int = option(1, "first tokens kept at full precision (attention sinks)")
    ragged: bool = option(False, RAGGED_HELP)

    def validate(self) -> None:
        super().validate()
        check_bits(self.name, self.bits, self.valid_bits)
        if isinstance(self.outliers, bool) or not isinstance(self.outliers, (int, float)) or not 0 <= self.outliers <= 1:
            raise ValueError(f"{self.name}: outliers must be a fraction from 0 to 1, got {self.outliers!r}")

    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.bits, self.group, "channel", symmetric=False, window=self.window,
                         sink=self.sink, owner=self.name, outliers=float(self.outliers))

    def make_layer(self) -> KvQuantLayer:
        return KvQuantLayer(self.layer_spec())
