"""SnapKV: keep the prompt tokens that the last queries of the prompt attend to.

Paper: Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation" (NeurIPS 2024).

At prefill, the last ``window`` queries of the prompt (the observation window) score every prompt
token by their summed attention probabilities; scores are smoothed along the sequence with a
pooling kernel, reduced from query heads to their KV head (GQA), and each KV head keeps its
top-``budget`` tokens. The observation window itself is always kept.

A prompt fed in several forwards (chunks, or a second turn on a returned cache) is compressed
after each one, scored by the last ``window`` queries of that forward over everything stored.
Decoded tokens are appended without further eviction (decode-time compression is a separate
mechanism).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from kvx.kernels.reference import window_attention_probs
from kvx.policy import (
    BudgetedPolicy,
    CompressionView,
    Phase,
    check_choice,
    check_positive_int,
    option,
    register_policy,
)

POOLINGS = ("avg", "max", "none")
GQA_REDUCTIONS = ("mean", "max")


@register_policy
@dataclass
class SnapKV(BudgetedPolicy):
    """Observation-window attention scores, pooled, top-k per KV head (Li et al., 2024)."""

    name: ClassVar[str] = "snapkv"
    summary: ClassVar[str] = "observation-window attention scores, pooled, top-k per KV head (Li et al., 2024)"
    phases: ClassVar[tuple[Phase, ...]] = ("prefill", "extend")

    window: int = option(32, "last queries that score the tokens; these tokens are always kept")
    kernel_size: int = option(7, "width of the pooling kernel that smooths scores along the sequence (odd)")
    pooling: str = option("avg", f"score smoothing: {', '.join(POOLINGS)}")
    gqa_reduce: str = option("mean", f"how the query heads of a KV head combine scores: {', '.join(GQA_REDUCTIONS)}")

    always_kept_option: ClassVar[str] = "window"
    always_kept_minimum: ClassVar[int] = 1

    def validate(self) -> None:
        super().validate()
        check_positive_int(self.name, "kernel_size", self.kernel_size)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"snapkv: kernel_size must be odd so pooling keeps positions aligned, got {self.kernel_size}")
        check_choice(self.name, "pooling", self.pooling, POOLINGS)
        check_choice(self.name, "gqa_reduce", self.gqa_reduce, GQA_REDUCTIONS)

    def score(self, view: CompressionView) -> torch.Tensor:
        window = min(self.window, view.query.shape[-2])
        probs = window_attention_probs(
            view.query[..., -window:, :], view.keys, view.query_mask(window), view.scaling, view.softcap
        )  # [B, Hkv, G, window, S]
        scores = self._pool(probs.sum(dim=-2))  # [B, Hkv, G, S]
        scores = scores.mean(dim=2) if self.gqa_reduce == "mean" else scores.amax(dim=2)
        scores[..., -self.window :] = math.inf  # the observation window is always kept
        return scores

    def _pool(self, scores: torch.Tensor) -> torch.Tensor:
        """Smooth ``[..., S]`` scores along S with a ``kernel_size`` window, same length out."""
        if self.pooling == "none" or self.kernel_size == 1:
            return scores
        shape = scores.shape
        flat = scores.reshape(-1, 1, shape[-1])
        pad = self.kernel_size // 2
        if self.pooling == "avg":
            flat = F.avg_pool1d(flat, self.kernel_size, stride=1, padding=pad)
        else:
            flat = F.max_pool1d(flat, self.kernel_size, stride=1, padding=pad)
        return flat.reshape(shape)
