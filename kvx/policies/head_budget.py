"""Head-wise budgets (AdaKV): one budget per layer, shared among its KV heads by score.

Paper: Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for
Efficient LLM Inference" (2024).

A layer keeps ``n_kv_heads x budget`` tokens in total, chosen by the scores of ``scorer`` across
all its heads at once, so focused heads give their share to heads that spread their attention.
Each head keeps at least ``floor x budget`` of its best tokens (AdaKV's safeguard), plus what the
scorer forces (its window). Heads end up with different token counts, so storage is ragged: each
head holds exactly its own tokens, packed, with no padding and no masking of stored keys, and
decode attention reads that storage directly (``kvx.kernels.ragged_decode``). The ragged storage is
the storage axis's ``ragged`` policy, which ``kvx.compose`` adds when it is not given: the same
mechanism that puts any other selection on ragged storage (``snapkv+ragged``).

Scorers that keep running statistics (h2o, keyformer) work too: their per-token statistics are
packed with the keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvx.policies._scoring import RankedByScorer, build_scorer
from kvx.policy import (
    BudgetedPolicy,
    CompressionView,
    check_number,
    option,
    past_capacity,
    register_policy,
    token_ranks,
)


@register_policy
@dataclass
class HeadBudget(RankedByScorer, BudgetedPolicy):
    """A layer's budget shared among its KV heads by score, ragged storage (Feng et al., 2024)."""

    name: ClassVar[str] = "head_budget"
    summary: ClassVar[str] = "one budget per layer shared among KV heads by score; ragged storage (AdaKV, Feng et al., 2024)"
    storage: ClassVar[str] = "ragged"  # needed: kvx.compose (and so kvx.patch) adds the ragged storage policy

    scorer: Any = option("snapkv", "policy whose scores rank tokens (snapkv, h2o, tova, keyformer, knorm), or an object")
    window: int = option(32, "the scorer's window (observation or recent tokens), kept by every head")
    floor: float = option(0.2, "each KV head keeps at least floor x budget of its best tokens, in [0, 1]")

    always_kept_option: ClassVar[str] = "window"
    always_kept_minimum: ClassVar[int] = 1

    def validate(self) -> None:
        super().validate()
        check_number(self.name, "floor", self.floor, low=0, high=1)
        self._scorer = build_scorer(self.name, self.scorer, self.window, self.budget if self.ratio is None else None)

    def select_mask(self, view: CompressionView) -> torch.Tensor | None:
        """``keep [B, Hkv, S]``, head counts differing; a row compresses when its tokens, over all its
        heads, exceed ``Hkv x capacity``; None when no row does."""
        self._scorer.observe(view)  # running statistics (h2o, keyformer) see every forward
        real = view.valid.sum(-1).sum(-1)  # [B] over all heads
        kv_heads = view.valid.shape[1]
        capacity = self.capacity(view).to(real.device)
        total = kv_heads * capacity
        if view.phase == "decode":
            if self.decode_interval <= 0:
                return None
            compress = past_capacity(real, total, kv_heads * self.decode_interval)
        elif view.phase in self.phases:
            compress = past_capacity(real, total)
        else:
            return None
        if not bool(compress.any()):
            return None
        scores = self._scorer.score(view).float().masked_fill(~view.valid, -math.inf)
        keep = allocate_head_budgets(scores, capacity, self.floor)
        return torch.where(compress[:, None, None], keep, view.valid)


def allocate_head_budgets(scores: torch.Tensor, capacity: torch.Tensor, floor: float) -> torch.Tensor:
    """Keep-mask ``[B, Hkv, S]``: per row ``b``, ``Hkv x capacity[b]`` tokens (fewer if fewer are
    real), each head at least its ``floor x capacity[b]`` best, the rest the best scores of the
    whole layer. Ties go to the more recent token."""
    batch, kv_heads, length = scores.shape
    real = scores > -math.inf
    guaranteed = (token_ranks(scores) < (floor * capacity).long()[:, None, None]) & real
    # rank every other token across the whole layer (newest first on ties), per row
    rest = scores.masked_fill(guaranteed, -math.inf).flip(-1).reshape(batch, kv_heads * length)
    order = rest.sort(dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    remaining = kv_heads * capacity - guaranteed.reshape(batch, -1).sum(-1)  # [B]
    picked = (ranks < remaining[:, None]) & (rest > -math.inf)
    return guaranteed | picked.reshape(batch, kv_heads, length).flip(-1)
