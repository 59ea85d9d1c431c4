"""MiKV: a scorer's ranking decides precision instead of eviction.

Paper: Yang et al., "No Token Left Behind: Reliable KV Cache Compression via Importance-Aware
Mixed Precision Quantization" (2024). Where an eviction policy would drop a token, MiKV keeps it
at low precision: per KV head, the ``budget`` tokens the scorer ranks highest (plus its window)
are marked important and stored at high precision, the rest at low precision, and nothing is
dropped. Works with any scorer that ranks tokens (snapkv, h2o, tova, keyformer, knorm). Needs
mixed storage (:mod:`kvx.storage.mixed`), which ``kvx.compose`` adds with its defaults.

The marks are made where the scorer would compress (the prompt, and while decoding every
``decode_interval`` tokens when set); a token keeps the precision it had when it left the
full-precision window. Tokens no decision has covered (generated ones, by default) count as
important.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvx.policies._scoring import RankedByScorer, build_scorer
from kvx.policy import BudgetedPolicy, CompressionView, option, register_policy, token_ranks
from kvx.storage.quantized import QuantizedLayer


@register_policy
@dataclass
class MiKV(RankedByScorer, BudgetedPolicy):
    """Important tokens at high precision, the rest at low precision, none dropped (Yang et al., 2024)."""

    name: ClassVar[str] = "mikv"
    summary: ClassVar[str] = ("important tokens by any scorer at high precision, the rest at low, none dropped; "
                              "mixed storage (MiKV, Yang et al., 2024)")
    storage: ClassVar[str] = "mixed"  # needed: kvx.compose (and so kvx.patch) adds the mixed storage policy

    budget: int = option(1024, "tokens per layer and KV head kept at high precision (the others go to low precision)")
    scorer: Any = option("snapkv", "policy whose scores rank tokens (snapkv, h2o, tova, keyformer, knorm), or an object")
    window: int = option(32, "the scorer's window (observation or recent tokens), always important")

    always_kept_option: ClassVar[str] = "window"
    always_kept_minimum: ClassVar[int] = 1

    def validate(self) -> None:
        super().validate()
        self._scorer = build_scorer(self.name, self.scorer, self.window, self.budget if self.ratio is None else None)

    def select_mask(self, view: CompressionView) -> torch.Tensor | None:
        """Marks each token's precision in ``view.state`` (the storage reads it when the token leaves
        the window); returns None: nothing is evicted."""
        self._scorer.observe(view)
        real = view.valid.sum(-1)  # [B, Hkv]
        capacity = self.capacity(view).to(real.device)[:, None].expand_as(real)
        decide = self.triggered(view, real, capacity)
        if bool(decide.any()):
            scores = self._scorer.score(view).float().masked_fill(~view.valid, -math.inf)
            count = torch.where(decide, capacity, real)
            important = (token_ranks(scores) < count[..., None]) & view.valid
            view.state[QuantizedLayer.LOW_PRECISION] = (view.valid & ~important).float()
        return None
