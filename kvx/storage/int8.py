"""int8 KV: keys and values quantized per token to 8 bits, in groups of ``group`` channels.

The plainest quantized cache (as vLLM / SGLang's int8 and fp8 KV, per-token scales): half the bytes
of a 16-bit cache (plus a scale, and a zero point when asymmetric, per group), with an error small
enough that greedy outputs rarely change. Storage: :mod:`kvx.storage.quantized`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvx.policy import option, register_policy
from kvx.storage.quantized import RAGGED_HELP, QuantizedStoragePolicy, QuantSpec


@register_policy
@dataclass
class Int8(QuantizedStoragePolicy):
    """8-bit keys and values, per-token groups, symmetric or asymmetric."""

    name: ClassVar[str] = "int8"
    summary: ClassVar[str] = "storage: 8-bit keys and values, per-token groups of channels"

    group: int = option(32, "channels per scale (must divide the head dim)")
    symmetric: bool = option(False, "symmetric codes (scale only) instead of scale and zero point")
    window: int = option(0, "most recent tokens kept at full precision")
    sink: int = option(0, "first tokens kept at full precision (attention sinks)")
    ragged: bool = option(False, RAGGED_HELP)

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"{self.name}: symmetric must be true or false, got {self.symmetric!r}")

    def spec(self) -> QuantSpec:
        return QuantSpec(8, 8, self.group, "token", symmetric=self.symmetric, window=self.window,
                         sink=self.sink, owner=self.name)
