"""PyramidKV: per-layer budgets that shrink with depth, over any scoring policy.

Paper: Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
Funneling" (2024).

Lower layers spread attention widely and keep more tokens; upper layers focus and keep fewer.
With ``schedule="pyramid"`` the budgets fall linearly from ``2 * budget - low`` at the first layer
to ``low = max(budget / beta, window)`` at the last, so no layer keeps fewer than its ``window``
and the model keeps ``budget`` tokens per layer on average; ``"uniform"`` keeps ``budget`` everywhere; a list gives
one budget per layer. Tokens are ranked by ``scorer`` (SnapKV by default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvx.policies._scoring import RankedByScorer, build_scorer
from kvx.policy import (
    BudgetedPolicy,
    CompressionView,
    capacity_tensor,
    check_number,
    check_positive_int,
    option,
    register_policy,
)

SCHEDULES = ("pyramid", "uniform")


@register_policy
@dataclass
class PyramidKV(RankedByScorer, BudgetedPolicy):
    """Layer budgets falling with depth, tokens ranked by a scorer policy (Cai et al., 2024)."""

    name: ClassVar[str] = "pyramidkv"
    summary: ClassVar[str] = "per-layer budgets shrinking with depth over any scorer (Cai et al., 2024)"

    scorer: Any = option("snapkv", "policy that ranks tokens: a name or a policy object")
    window: int = option(32, "the scorer's window (observation / recent), always kept: no layer keeps fewer")
    beta: float = option(20.0, "last layer keeps max(budget / beta, window) tokens (pyramid schedule)")
    schedule: Any = option("pyramid", "pyramid, uniform, or a list with one budget per layer (each >= window)")

    always_kept_option: ClassVar[str] = "window"
    always_kept_minimum: ClassVar[int] = 1

    def validate(self) -> None:
        super().validate()
        check_number(self.name, "beta", self.beta, low=1)
        self._scorer = build_scorer(self.name, self.scorer, self.window, self.budget if self.ratio is None else None)
        if isinstance(self.schedule, (list, tuple)):
            self._check_schedule_list()
        elif not isinstance(self.schedule, str) or self.schedule not in SCHEDULES:
            raise ValueError(f"pyramidkv: schedule must be one of {', '.join(SCHEDULES)} or a list of budgets; "
                             f"got {self.schedule!r}")

    def always_kept(self) -> int:
        """The window, or more where a scorer object keeps more (its own window)."""
        scorer = self.__dict__.get("_scorer")
        return max(self.window, scorer.always_kept() if scorer is not None else 0)

    def _check_schedule_list(self) -> None:
        """Every entry of a schedule list is a budget that holds the window; no ratio with it."""
        if not self.schedule:
            raise ValueError("pyramidkv: the schedule list is empty; give one budget per layer")
        for layer, budget in enumerate(self.schedule):
            check_positive_int(self.name, f"schedule[{layer}]", budget)
            if budget < self.always_kept():
                raise ValueError(f"pyramidkv: schedule[{layer}] ({budget}) is below window ({self.always_kept()}): "
                                 "the window tokens (the scorer's, if larger) are always kept, so no layer's budget "
                                 "may be smaller")
        if self.ratio is not None:
            raise ValueError("pyramidkv: a schedule list gives absolute budgets; it cannot be combined with ratio")

    def check_model(self, num_layers: int) -> None:
        if isinstance(self.schedule, (list, tuple)) and len(self.schedule) != num_layers:
            raise ValueError(
                f"pyramidkv: the schedule lists {len(self.schedule)} budgets but the model has {num_layers} layers"
            )

    def layer_budgets(self, num_layers: int, budget: int) -> list[int]:
        """Budget of every layer for an average of ``budget``."""
        if isinstance(self.schedule, (list, tuple)):
            self.check_model(num_layers)  # (a list assigned after patching is checked here)
            return list(self.schedule)
        if self.schedule == "uniform" or num_layers == 1:
            return [budget] * num_layers
        kept = self.always_kept()
        low = max(budget / self.beta, kept)  # the floor: the window is always kept
        high = 2 * budget - low  # the average stays the budget
        return [max(kept, round(high - (high - low) * i / (num_layers - 1))) for i in range(num_layers)]

    def capacity(self, view: CompressionView) -> torch.Tensor:
        budget = self.layer_budgets(view.num_layers, self.budget)[view.layer_idx]
        if self.ratio is None or isinstance(self.schedule, (list, tuple)):
            return capacity_tensor(view, budget)
        average = super().capacity(view)  # [B], from the ratio
        return (average.double() * budget / self.budget).round().long().clamp(min=self.always_kept())

    def observe(self, view: CompressionView) -> None:
        self._scorer.observe(view)

    def score(self, view: CompressionView) -> torch.Tensor:
        return self._scorer.score(view)
