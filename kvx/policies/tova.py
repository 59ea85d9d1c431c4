"""TOVA: at every step, evict the token the current query attends to least.

Paper: Oren et al., "Transformers are Multi-State RNNs" (EMNLP 2024).

Scores are the attention of the newest query only (no accumulation), averaged over all heads of
the layer so every KV head keeps the same tokens (the paper's choice; ``per_head`` keeps each
KV head's own). The newest token is always kept. Evicts at prefill and after every decoded token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvx.kernels.reference import window_attention_probs
from kvx.policy import BudgetedPolicy, CompressionView, option, register_policy


@register_policy
@dataclass
class TOVA(BudgetedPolicy):
    """Token omission via attention of the current query (Oren et al., 2024)."""

    name: ClassVar[str] = "tova"
    summary: ClassVar[str] = "evict what the current query attends to least, every step (Oren et al., 2024)"

    decode_interval: int = option(1, "also compress while generating, every N tokens past capacity (0: prompt only)")
    per_head: bool = option(False, "score per KV head instead of averaging over the layer's heads")

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.per_head, bool):
            raise TypeError(f"tova: per_head must be true or false, got {self.per_head!r}")

    def always_kept(self) -> int:
        return 1  # the newest token

    def score(self, view: CompressionView) -> torch.Tensor:
        probs = window_attention_probs(view.query[..., -1:, :], view.keys, view.query_mask(1), view.scaling, view.softcap)
        scores = probs[..., 0, :].mean(dim=2)  # [B, Hkv, S]
        if not self.per_head:
            scores = scores.mean(dim=1, keepdim=True).expand_as(scores)
        scores = scores.clone()
        scores[..., -1] = math.inf  # the newest token
        return scores
