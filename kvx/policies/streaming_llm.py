"""StreamingLLM: attention sinks plus a window of recent tokens.

Paper: Xiao et al., "Efficient Streaming Language Models with Attention Sinks" (ICLR 2024).

The first ``sink`` tokens of each row and the ``window`` most recent ones are kept; everything in
between is evicted, at prefill and after every decoded token, so a layer never holds more than
``sink + window`` tokens. ``decode_interval=N`` evicts while generating only once a row holds N
tokens past that (then back to ``sink + window``): the layer is re-gathered once every N tokens
instead of at each one, and holds at most ``sink + window + N - 1`` tokens. Unlike the paper, positions are not re-assigned inside the cache: RoPE
positions stay those of the original text (as in kvpress), which keeps the model's view of
distances exact for the tokens that remain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvx.policy import (
    CompressionView,
    EvictionPolicy,
    Phase,
    capacity_tensor,
    check_positive_int,
    option,
    past_capacity,
    register_policy,
)


@register_policy
@dataclass
class StreamingLLM(EvictionPolicy):
    """Keep ``sink`` first tokens and ``window`` recent tokens per row (Xiao et al., 2024)."""

    name: ClassVar[str] = "streaming_llm"
    summary: ClassVar[str] = "attention sinks + recent window (Xiao et al., 2024); evicts at prefill and decode"
    phases: ClassVar[tuple[Phase, ...]] = ("prefill", "decode", "extend")

    sink: int = option(4, "first tokens of each row that are always kept (attention sinks)")
    window: int = option(1020, "most recent tokens that are always kept")
    decode_interval: int = option(1, "while generating, evict once a row holds this many tokens past sink + window "
                                     "(1: after every token, as the paper; N: at most sink + window + N - 1 held)")

    def validate(self) -> None:
        super().validate()
        check_positive_int(self.name, "sink", self.sink, minimum=0)
        check_positive_int(self.name, "window", self.window, minimum=1)
        check_positive_int(self.name, "decode_interval", self.decode_interval, minimum=1)

    scores_rank_tokens: ClassVar[bool] = False

    def capacity(self, view: CompressionView) -> torch.Tensor:
        return capacity_tensor(view, self.sink + self.window)

    def score(self, view: CompressionView) -> torch.Tensor:
        return self._keep(view.valid, view.valid.sum(-1, keepdim=True)).float()

    def select_mask(self, view: CompressionView) -> torch.Tensor | None:
        """The keep mask itself, without ranking scores (a sort per layer at every decode step):
        a row that holds no more than ``sink + window`` real tokens keeps them all. While
        generating, nothing is evicted until a row holds ``decode_interval`` tokens past that."""
        interval = self.decode_interval if view.phase == "decode" else 1
        num_real = view.valid.sum(-1, keepdim=True)  # [B, Hkv, 1]
        if not bool(past_capacity(num_real, self.sink + self.window, interval).any()):
            return None
        return self._keep(view.valid, num_real)

    def _keep(self, valid: torch.Tensor, num_real: torch.Tensor) -> torch.Tensor:
        """``[B, Hkv, S]`` bool: the first ``sink`` and the last ``window`` real tokens of each row, of
        ``valid [B, Hkv, S]`` holding ``num_real [B, Hkv, 1]`` real tokens."""
        rank = valid.long().cumsum(-1) - 1  # rank of each real token among the row's real tokens
        return valid & ((rank < self.sink) | (rank >= num_real - self.window))
