"""H2O: heavy hitters (tokens with the most accumulated attention) plus a recent window.

Paper: Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large
Language Models" (NeurIPS 2023).

Every token's attention received from every query so far is accumulated (at prefill without a
T x T matrix: ``attention_column_sums``: a Triton kernel on GPU, a blocked torch reference on CPU,
where the attention pass computes them with its output in one pass over the logits); the ``recent``
newest tokens are always kept. Eviction continues while decoding (``decode_interval`` 1 by
default), so the cache never exceeds its budget by more than the interval.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvx.kernels.column_sums import attention_column_sums
from kvx.policies._scoring import GQA_REDUCTIONS, accumulate, keep_recent, reduce_groups
from kvx.policy import BudgetedPolicy, CompressionView, Phase, check_choice, option, register_policy


@register_policy
@dataclass
class H2O(BudgetedPolicy):
    """Accumulated attention + recent window, evicting at prefill and decode (Zhang et al., 2023)."""

    name: ClassVar[str] = "h2o"
    summary: ClassVar[str] = "heavy hitters by accumulated attention + recent window (Zhang et al., 2023)"

    decode_interval: int = option(1, "also compress while generating, every N tokens past capacity (0: prompt only)")
    recent: int = option(32, "most recent tokens that are always kept")
    gqa_reduce: str = option("sum", f"how the query heads of a KV head combine scores: {', '.join(GQA_REDUCTIONS)}")

    always_kept_option: ClassVar[str] = "recent"

    def validate(self) -> None:
        super().validate()
        check_choice(self.name, "gqa_reduce", self.gqa_reduce, GQA_REDUCTIONS)

    def reads_column_sums(self, phase: Phase) -> bool:
        return True

    def observe(self, view: CompressionView) -> None:
        sums = view.column_sums
        if sums is None:
            sums = attention_column_sums(view.query, view.keys, view.valid, view.scaling, view.softcap)
        accumulate(view.state, "h2o", reduce_groups(sums, self.gqa_reduce))

    def score(self, view: CompressionView) -> torch.Tensor:
        return keep_recent(view.state["h2o"], self.recent)
