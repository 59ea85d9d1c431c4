"""MoA: each KV head keeps a sliding window of its own size, chosen from a head profile under a
total budget.

Paper: Fu et al., "MoA: Mixture of Sparse Attention for Automatic Large Language Model
Compression" (2024).

MoA gives each attention head its own span (attention sinks plus a window of recent tokens), sized
by profiling how much each head matters and solving for the best mix under a density budget. kvx
keeps the structure and takes the sizes from a scores file of ``kvx profile-heads`` (``pattern``):
every scored KV head keeps ``sink`` first tokens and at least ``min_window`` recent ones, and the
rest of the model's total budget (``budget x`` KV heads) goes to the heads' windows in proportion
to their scores (equally when no head scores above 0). Unlike the paper there is no search over
candidate spans and no span that grows with the input length: one fixed window per head.

Windows are enforced at prefill, between prefill chunks and every ``decode_interval`` decoded
tokens; heads keep different numbers of tokens, so storage is ragged. A head whose window holds the
whole context keeps everything (its unused share is not given to other heads).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvx.policies._head_scores import load_scores
from kvx.policies.retrieval_heads import DecodeInterval, layer_row, streaming_keep
from kvx.policy import CompressionView, check_positive_int, option, register_policy


@register_policy
@dataclass
class MoA(DecodeInterval):
    """A window per KV head, sized from a head profile under a total budget (Fu et al., 2024)."""

    name: ClassVar[str] = "moa"
    summary: ClassVar[str] = ("a window per KV head sized from a head profile under a total budget; ragged storage "
                              "(MoA, Fu et al., 2024)")
    storage: ClassVar[str] = "ragged"

    pattern: str | None = option(None, "scores file from `kvx profile-heads` (.safetensors); required")
    budget: int = option(1024, "mean tokens kept per KV head, sinks included (the model keeps budget x KV heads)")
    sink: int = option(64, "first tokens every head keeps (attention sinks)")
    min_window: int = option(64, "recent tokens every head keeps at least")
    decode_interval: int = option(16, "windows are enforced every N decoded tokens (a head holds at most its "
                                      "sink + window + N - 1 tokens)")

    def validate(self) -> None:
        super().validate()
        for name, minimum in (("budget", 1), ("sink", 0), ("min_window", 1), ("decode_interval", 1)):
            check_positive_int(self.name, name, getattr(self, name), minimum=minimum)
        if self.sink + self.min_window > self.budget:
            raise ValueError(f"{self.name}: sink + min_window ({self.sink} + {self.min_window}) must not exceed budget "
                             f"({self.budget}): every head keeps them")
        if not isinstance(self.pattern, str):
            raise ValueError(f"{self.name}: pattern is required (a scores file): run `kvx profile-heads MODEL --out "
                             f"heads.safetensors`, then use moa:pattern=heads.safetensors; got {self.pattern!r}")
        self._scores = load_scores(self.pattern)
        self._windows = allocate_windows(self._scores.scores, self.budget, self.sink, self.min_window)

    def prepare(self, model: Any) -> None:
        self._scores.check_model(model, self.pattern)

    def windows(self) -> torch.Tensor:
        """``[L, Hkv]`` recent-token window of each KV head (0 for layers no policy compresses)."""
        return self._windows.clone()

    def select_mask(self, view: CompressionView) -> torch.Tensor | None:
        self.note_phase(view)
        windows = layer_row(self._windows, view, f"{self.name}: pattern {self.pattern}")
        keep = streaming_keep(view.valid, self.sink, windows)
        return keep if bool((view.valid & ~keep).any()) else None


def allocate_windows(scores: torch.Tensor, budget: int, sink: int, min_window: int) -> torch.Tensor:
    """``[L, Hkv]`` windows: ``min_window`` each, plus the rest of ``budget x n`` (``n`` scored heads,
    ``sink`` each already spent) shared in proportion to the scores ``[L, Hkv]`` (NaN: unscored, 0)."""
    scored = ~scores.isnan()
    weights = scores.nan_to_num(0).clamp(min=0) * scored
    if float(weights.sum()) <= 0:
        weights = scored.float()
    free = int(scored.sum()) * (budget - sink - min_window)
    extra = torch.floor(free * weights / weights.sum()).long()
    return torch.where(scored, min_window + extra, torch.zeros_like(extra))
