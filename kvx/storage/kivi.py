"""KIVI: keys quantized per channel, values per token, recent tokens at full precision.

Paper: Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache" (ICML 2024).
Keys have outlier channels, so each channel of a group of ``group`` tokens gets its own scale and
zero point; values are quantized per token in groups of ``group`` channels. The ``window`` most
recent tokens stay at full precision and leave it ``group`` tokens at a time; the first ``sink``
tokens can stay at full precision too. Storage: :mod:`kvx.storage.quantized`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvx.policy import option, register_policy
from kvx.storage.quantized import RAGGED_HELP, QuantizedStoragePolicy, QuantSpec, check_bits


@register_policy
@dataclass
class Kivi(QuantizedStoragePolicy):
    """2- or 4-bit keys per channel and values per token, a full-precision window (Liu et al., 2024)."""

    name: ClassVar[str] = "kivi"
    summary: ClassVar[str] = ("storage: 2/4-bit KV, keys per channel, values per token, recent tokens in full "
                              "precision (KIVI, Liu et al., 2024)")
    valid_bits: ClassVar[tuple[int, ...]] = (2, 4)

    bits: int = option(4, "bits per key and value element: 2 or 4")
    group: int = option(32, "tokens per key scale (per channel), channels per value scale (per token)")
    window: int = option(128, "most recent tokens kept at full precision (quantized group by group as it fills)")
    sink: int = option(0, "first tokens kept at full precision (attention sinks)")
    ragged: bool = option(False, RAGGED_HELP)

    def validate(self) -> None:
        super().validate()
        check_bits(self.name, self.bits, self.valid_bits)

    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.bits, self.group, "channel", symmetric=False, window=self.window,
                         sink=self.sink, owner=self.name)
