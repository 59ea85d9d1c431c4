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


# the option of each scorer that plays the role of a wrapper's ``window``
SCORER_WINDOW_OPTION = {"snapkv": "window", "h2o": "recent", "keyformer": "recent", "knorm": "recent"}


def build_scorer(owner: str, scorer, window: int, budget: int | None = None):
    """The scoring policy a wrapper (PyramidKV, HeadBudget) ranks tokens with: a registered name
    (built with the wrapper's ``window``) or a policy object. Raises unless its scores rank
    tokens by importance, and (given the wrapper's ``budget``) unless what it always keeps fits."""
    from kvx.policy import EvictionPolicy, make_policy, policy_class

    if isinstance(scorer, str):
        cls = policy_class(scorer)
        window_option = SCORER_WINDOW_OPTION.get(cls.name)
        if issubclass(cls, EvictionPolicy) and cls.scores_rank_tokens:
            scorer = make_policy(cls.name, budget=window, **({window_option: window} if window_option else {}))
    if not isinstance(scorer, EvictionPolicy) or not scorer.scores_rank_tokens:
        raise TypeError(f"{owner}: scorer {scorer!r} does not rank tokens by importance; "
                        "use e.g. snapkv, h2o, tova, keyformer, knorm")
    kept = scorer.always_kept()
    if budget is not None and kept > budget:
        raise ValueError(f"{owner}: scorer {scorer.name} always keeps {kept} tokens, more than budget ({budget}); "
                         "give it a smaller window, or a larger budget")
    return scorer


class RankedByScorer:
    """Mixin for a policy that ranks tokens by another policy's scores (``self._scorer``, from
    :func:`build_scorer`: PyramidKV, HeadBudget, MiKV). The scorer's running statistics and column
    sums are the policy's (:meth:`observes`, :meth:`reads_column_sums`), and its ``select_mask``,
    its own or the library's, acts on the library's triggers (its phases, every ``decode_interval``
    decode steps), so kvx builds the view only then (``EvictionPolicy.wants_view``)."""

    def observes(self) -> bool:
        return self._scorer.observes()

    def reads_column_sums(self, phase) -> bool:
        return self._scorer.reads_column_sums(phase)

    def _decides_like_the_library(self) -> bool:
        return True
