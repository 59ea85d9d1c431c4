"""Vertical-slash: per head, the attention of the last queries shows which key columns every query
reads (vertical lines) and which distances behind the query matter (slash lines); each query block
computes the key blocks those lines cross most, with sink and local blocks.

Paper: Jiang et al., "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via Dynamic
Sparse Attention" (NeurIPS 2024). MInference keeps a fixed number of columns and diagonals per
head, searched offline per model; here each head's lines are estimated online from the last
``last_queries`` queries and scored per tile (:func:`kvx.kernels.block_index.vertical_slash_scores`),
and every query block keeps a ``density`` share of the blocks it may see, so it works on a model
nobody searched. A prefill method: decode steps attend densely, and what is stored never changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvx.kernels.block_index import vertical_slash_scores
from kvx.methods.base import register_method
from kvx.methods.block_sparse import BlockSparseMethod
from kvx.policy import check_positive_int, option, register_policy


@register_method
@register_policy
@dataclass
class VerticalSlash(BlockSparseMethod):
    """Vertical + slash lines estimated from the last queries, top blocks per query block (MInference,
    Jiang et al., 2024)."""

    name: ClassVar[str] = "vertical_slash"
    summary: ClassVar[str] = ("prefill: key blocks on the vertical and slash lines of the last queries' attention "
                              "(MInference, Jiang et al., 2024)")

    density: float = option(0.1, "share of the causal key blocks each query block computes, in (0, 1]")
    last_queries: int = option(64, "last queries whose attention estimates the lines")

    def validate(self) -> None:
        super().validate()
        check_positive_int(self.name, "last_queries", self.last_queries)

    def scores(self, query, keys, valid, scaling, softcap):
        return vertical_slash_scores(query, keys, valid, scaling, self.block_size, self.last_queries, softcap)
