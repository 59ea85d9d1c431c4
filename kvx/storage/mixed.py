"""Mixed-precision storage: old tokens at two precisions, chosen per token by a selection's scores.

The storage half of MiKV (Yang et al., "No Token Left Behind: Reliable KV Cache Compression via
Importance-Aware Mixed Precision Quantization", 2024): tokens the composed selection (``mikv``)
marks important leave the full-precision window at ``high_bits`` (8, or 16: full precision), the
others at ``low_bits`` (2 or 4); nothing is dropped. Keys and values are quantized per token in
groups of ``group`` channels. The layer is :class:`~kvx.storage.quantized.QuantizedLayer` with a
high-precision segment; ``kvx.patch(model, "mikv")`` adds this storage with its defaults, and
``mikv+mixed:high_bits=16,low_bits=4`` chooses the precisions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvx.policy import option, register_policy
from kvx.storage.quantized import QuantizedLayer, QuantizedStoragePolicy, QuantSpec, check_bits


class MixedLayer(QuantizedLayer):
    """A quantized layer with a high-precision segment (``stats()`` kind ``mixed``)."""

    kind = "mixed"


@register_policy
@dataclass
class Mixed(QuantizedStoragePolicy):
    """Two precisions for old tokens, chosen by a mixed-precision selection (``mikv``)."""

    name: ClassVar[str] = "mixed"
    summary: ClassVar[str] = ("storage: old tokens at high or low precision as a selection marks them (with mikv; "
                              "MiKV, Yang et al., 2024)")
    storage: ClassVar[str] = "mixed"

    high_bits: int = option(8, "bits of the old tokens the selection marks important: 8, or 16 (full precision)")
    low_bits: int = option(2, "bits of the other old tokens: 2 or 4")
    group: int = option(32, "channels per scale (per-token groups; must divide the head dim)")
    window: int = option(32, "most recent tokens kept at full precision")
    sink: int = option(0, "first tokens kept at full precision (attention sinks)")

    def validate(self) -> None:
        super().validate()
        check_bits(self.name, self.high_bits, (8, 16), option="high_bits")
        check_bits(self.name, self.low_bits, (2, 4), option="low_bits")

    def spec(self) -> QuantSpec:
        return QuantSpec(self.low_bits, self.low_bits, self.group, "token", window=self.window, sink=self.sink,
                         owner=self.name, high_bits=self.high_bits)

    def make_layer(self) -> MixedLayer:
        return MixedLayer(self.spec())

    def check_selection(self, selection) -> None:
        """Precision comes from a selection that marks it (``mikv``): alone, or under an evicting
        selection, every token would stay at high precision while the name claims two."""
        if selection is None or selection.storage != "mixed":
            given = "no selection" if selection is None else f"{selection.name}, which evicts"
            raise ValueError(f"mixed storage takes each token's precision from a mixed-precision selection (mikv); "
                             f"got {given}: compose mikv with it (e.g. mikv:budget=256+mixed:high_bits=8), or use "
                             "kivi / int8 for one precision")
