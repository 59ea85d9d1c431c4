"""Block top-k: per head, mean-pooled query blocks estimate which key blocks matter to each query
block; each keeps the best up to a density, or the fewest whose estimated attention sums to a
threshold, with sink and local blocks. The final query block, the one whose last query produces
the next token, is scored from its last queries' own attention instead (``last_queries``).

Papers: Gao et al., "SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs" (2024), here
without its trained gate: mean-pooled query blocks scored against every key, summed per key block
(``estimate=keys``, :func:`kvx.kernels.block_index.pooled_query_scores`, the default: on kvx's
needle model, pooling the keys too, ``estimate=pooled``, averages a needle away with its block).
The blocks holding the last ``last_queries`` queries are scored from those queries, each one's
own attention summed per key block and averaged over the block
(:func:`kvx.kernels.block_index.final_block_scores`, ``last_queries x S`` per head, as
MInference's estimate reads the last 64 queries; exact for the final block when it holds no more
queries): on kvx's needle model the mean query of a question's final block neither asks for the
needle (the last layer's retrieval heads) nor attends as broadly as the last query (the first
layer's heads), and 5 of 120 answers were wrong with it (docs/block-sparse.md); the threshold is FlexPrefill's adaptive budget (Lai et al., "FlexPrefill: A Context-Aware Sparse
Attention Mechanism for Efficient Long-Sequence Inference", ICLR 2025). A prefill method: decode
steps attend densely, and what is stored never changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvx.kernels.block_index import final_block_scores, pooled_block_scores, pooled_query_scores
from kvx.methods.base import register_method
from kvx.methods.block_sparse import BlockSparseMethod
from kvx.policy import check_choice, check_positive_int, option, register_policy

ESTIMATES = ("keys", "pooled")


@register_method
@register_policy
@dataclass
class BlockTopK(BlockSparseMethod):
    """Pooled block scores, top blocks per query block by density or cumulative threshold (SeerAttention
    without a gate, Gao et al., 2024; FlexPrefill's threshold, Lai et al., 2025)."""

    name: ClassVar[str] = "block_topk"
    summary: ClassVar[str] = ("prefill: top key blocks per query block by mean-pooled scores, by density or "
                              "cumulative threshold (SeerAttention / FlexPrefill)")

    density: float = option(0.1, "share of the causal key blocks each query block computes, in (0, 1]")
    threshold: float | None = option(None, "instead of density: keep the fewest blocks whose pooled scores "
                                           "sum to this share, in (0, 1]")
    estimate: str = option("keys", "block scores: keys (mean-pooled query blocks over every key, summed per key "
                                   "block) or pooled (mean-pooled query and key blocks)")
    last_queries: int = option(16, "last queries whose own attention scores the query blocks they fall in "
                                    "(the final one, exactly up to its size) instead of a pooled estimate; 0: none")

    def validate(self) -> None:
        super().validate()
        check_choice(self.name, "estimate", self.estimate, ESTIMATES)
        check_positive_int(self.name, "last_queries", self.last_queries, minimum=0)

    @classmethod
    def exact_options(cls) -> dict:
        return {"density": 1.0, "threshold": None}

    def scores(self, query, keys, valid, scaling, softcap):
        if self.estimate == "keys":
            return pooled_query_scores(query, keys, valid, scaling, self.block_size, softcap,
                                       last_queries=self.last_queries)
        scores = pooled_block_scores(query, keys, valid, scaling, self.block_size, softcap)
        if self.last_queries:
            final = final_block_scores(query, keys, valid, scaling, self.block_size, self.last_queries, softcap)
            scores[:, :, scores.shape[2] - final.shape[2]:] = final
        return scores
