"""A-shape: every query block computes the first key blocks (attention sinks) and the last ones
(a local window), nothing in between; the static pattern of MInference's A-shape heads.

Paper: Jiang et al., "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via Dynamic
Sparse Attention" (NeurIPS 2024), after StreamingLLM's sinks + window (Xiao et al., ICLR 2024).
A prefill method: decode steps attend densely, and what is stored never changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvx.methods.base import register_method
from kvx.methods.block_sparse import BlockSparseMethod
from kvx.policy import option, register_policy

EVERY_BLOCK = 2**31 - 1
"""A local window this wide covers every block: the exact setting."""


@register_method
@register_policy
@dataclass
class AShape(BlockSparseMethod):
    """Sink blocks + local blocks per query block (MInference's A-shape; Jiang et al., 2024)."""

    name: ClassVar[str] = "a_shape"
    summary: ClassVar[str] = "prefill: sink + local key blocks per query block (MInference A-shape, Jiang et al., 2024)"

    local: int = option(8, "last key blocks, up to its own, every query block computes (>= 1)")

    @classmethod
    def exact_options(cls) -> dict:
        return {"local": EVERY_BLOCK}

    def scores(self, query, keys, valid, scaling, softcap):
        return None
