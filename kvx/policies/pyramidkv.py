"""PyramidKV: per-layer budgets that shrink with depth, over any scoring policy.

Paper: Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
Funneling" (2024).

Lower layers spread attention widely and keep more tokens; upper layers focus and keep fewer.
With ``schedule="pyramid"`` the budgets fall linearly from ``2 * budget - budget / beta`` at the
first layer to ``budget / beta`` at the last (never below ``window``), so the model keeps
``budget`` tokens per layer on average; ``"uniform"`` keeps ``budget`` everywhere; a list gives
one budget per layer. Tokens are ranked by ``scorer`` (SnapKV by default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvx.policies._scoring import build_scorer
from kvx.policy import (
    BudgetedPolicy,
    CompressionView,
    EvictionPolicy,
    capacity_tensor,
    check_positive_int,
    option,
    register_policy,
)

SCHEDULES = ("pyramid", "uniform")


@register_policy
@dataclass
class PyramidKV(BudgetedPolicy):
    """Layer budgets falling with depth, tokens ranked by a scorer policy (Cai et al., 2024)."""

    name: ClassVar[str] = "pyramidkv"
    summary: ClassVar[str] = "per-layer budgets shrinking with depth over any scorer (Cai et al., 2024)"

    scorer: Any = option("snapkv", "policy that ranks tokens: a name or a policy object")
    window: int = option(32, "the scorer's window (observation / recent); no layer keeps fewer")
    beta: float = option(20.0, "last layer keeps budget / beta tokens (pyramid schedule)")
    schedule: Any = option("pyramid", "pyramid, uniform, or a list with one budget per layer")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self.name, "window", self.window)
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or self.beta < 1:
            raise ValueError(f"pyramidkv: beta must be a number >= 1, got {self.beta!r}")
        if isinstance(self.schedule, (list, tuple)):
            for budget in self.schedule:
                check_positive_int(self.name, "each schedule entry", budget)
            if self.ratio is not None:
                raise ValueError("pyramidkv: a schedule list gives absolute budgets; it cannot be combined with ratio")
        elif self.schedule not in SCHEDULES:
            raise ValueError(f"pyramidkv: schedule must be one of {', '.join(SCHEDULES)} or a list; got {self.schedule!r}")
        self._scorer = self._build_scorer()

    def _build_scorer(self) -> EvictionPolicy:
        return build_scorer(self.name, self.scorer, self.window)

    def check_model(self, num_layers: int) -> None:
        if isinstance(self.schedule, (list, tuple)) and len(self.schedule) != num_layers:
            raise ValueError(
                f"pyramidkv: the schedule lists {len(self.schedule)} budgets but the model has {num_layers} layers"
            )

    def layer_budgets(self, num_layers: int, budget: int) -> list[int]:
        """Budget of every layer for an average of ``budget``."""
        if isinstance(self.schedule, (list, tuple)):
            return list(self.schedule)
        if self.schedule == "uniform" or num_layers == 1:
            return [budget] * num_layers
        low = budget / self.beta
        high = 2 * budget - low
        return [max(self.window, round(high - (high - low) * i / (num_layers - 1))) for i in range(num_layers)]

    def capacity(self, view: CompressionView) -> torch.Tensor:
        budget = self.layer_budgets(view.num_layers, self.budget)[view.layer_idx]
        if self.ratio is None or isinstance(self.schedule, (list, tuple)):
            return capacity_tensor(view, budget)
        average = super().capacity(view)  # [B], from the ratio
        return (average.double() * budget / self.budget).round().long().clamp(min=self.window)

    def observe(self, view: CompressionView) -> None:
        self._scorer.observe(view)

    def observes(self) -> bool:
        return self._scorer.observes()

    def score(self, view: CompressionView) -> torch.Tensor:
        return self._scorer.score(view)
