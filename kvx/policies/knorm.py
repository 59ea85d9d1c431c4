"""KNorm: keep the keys with the lowest L2 norm; no attention needed.

Paper: Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression"
(EMNLP 2024): low-norm keys tend to receive high attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvx.policies._scoring import keep_recent
from kvx.policy import BudgetedPolicy, CompressionView, option, register_policy


@register_policy
@dataclass
class KNorm(BudgetedPolicy):
    """Lowest key L2 norm first (Devoto et al., 2024)."""

    name: ClassVar[str] = "knorm"
    summary: ClassVar[str] = "keep the keys with the lowest L2 norm, no attention needed (Devoto et al., 2024)"

    recent: int = option(0, "most recent tokens that are always kept")

    always_kept_option: ClassVar[str] = "recent"

    def score(self, view: CompressionView) -> torch.Tensor:
        return keep_recent(-view.keys.float().norm(dim=-1), self.recent)
