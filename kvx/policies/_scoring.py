"""Small scoring helpers shared by several policies."""

from __future__ import annotations

import math

import torch

GQA_REDUCTIONS = ("mean", "max", "sum")


def reduce_groups(scores: torch.Tensor, how: str) -> torch.Tensor:
    """``[B, Hkv, G, S] -> [B, Hkv, S]``: combine the query heads that share a KV head."""
    if how == "mean":
        return scores.mean(dim=2)
    if how == "max":
        return scores.amax(dim=2)
    return scores.sum(dim=2)


def keep_recent(scores: torch.Tensor, recent: int) -> torch.Tensor:
    """Force the last ``recent`` stored tokens to be kept (score ``+inf``)."""
    if recent > 0:
        scores = scores.clone()
        scores[..., -recent:] = math.inf
    return scores


def accumulate(state: dict[str, torch.Tensor], name: str, scores: torch.Tensor) -> torch.Tensor:
    """Add ``scores [B, Hkv, S]`` to the running per-token statistic ``name`` of a layer."""
    total = state.get(name)
    state[name] = scores if total is None else total + scores
    return state[name]
