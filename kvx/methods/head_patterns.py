"""Head patterns: every (layer, query head) computes the key blocks of its own pattern, A-shape,
vertical-slash or block top-k, at its own size, as searched offline by ``kvx search-patterns``
(:mod:`kvx.eval.search_patterns`) and read from its file (``patterns``).

Paper: Jiang et al., "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via Dynamic
Sparse Attention" (NeurIPS 2024): an offline search assigns each head the pattern and size that best
keep its attention recall on calibration prompts; the indices of the dynamic patterns (which
vertical and slash lines, which blocks) are still estimated online, per prompt, exactly as
``vertical_slash`` and ``block_topk`` estimate them. The sizes are spread over the heads under one
mean density (as MoA, Fu et al. 2024, spreads spans), so a head whose attention is local pays for a
few blocks and a head that reads far pays for more.

Why one method rather than a ``patterns`` option on ``vertical_slash`` and ``block_topk``: a search
gives heads of one layer different patterns, so a file read by ``vertical_slash`` would run block
top-k on some of its heads under the name ``vertical_slash``. Here the name says what runs: each
head's pattern from the file; without a file, every head estimates online as ``vertical_slash``
does (the method that matched dense needle accuracy at 10% density, docs/block-sparse.md).

A pattern file is tied to its model: another model's file (layer or head count, model type, shape)
or another schema version is refused by name, and the file's ``block_size``, ``sink`` and ``local``
must be the method's (the sizes are counted in blocks of that size). A prefill method: decode steps
attend densely, and what is stored never changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvx.kernels.block_index import block_index, pooled_query_scores, vertical_slash_scores
from kvx.methods._pattern_file import PATTERNS, PatternFile, load_patterns
from kvx.methods.base import register_method
from kvx.methods.block_sparse import BlockSparseMethod
from kvx.policy import check_number, check_positive_int, option, register_policy

ONLINE_DENSITY = 0.1
"""``density`` without a pattern file, when not given (``vertical_slash``'s default)."""
A_SHAPE, VERTICAL_SLASH, BLOCK_TOPK = (PATTERNS.index(name) for name in ("a_shape", "vertical_slash", "block_topk"))


@register_method
@register_policy
@dataclass
class HeadPatterns(BlockSparseMethod):
    """Per-head pattern and size from a `kvx search-patterns` file; vertical-slash online without one
    (MInference's offline pattern search, Jiang et al., 2024)."""

    name: ClassVar[str] = "head_patterns"
    summary: ClassVar[str] = ("prefill: each head its own searched pattern (a_shape, vertical_slash or block_topk) "
                              "and size from `kvx search-patterns`; without a file, vertical_slash online "
                              "(MInference, Jiang et al., 2024)")

    patterns: str | None = option(None, "pattern file from `kvx search-patterns` (.safetensors); none: every head "
                                        "estimates online as vertical_slash")
    density: float | None = option(None, f"without patterns: share of the causal key blocks each query block "
                                         f"computes, in (0, 1] (default {ONLINE_DENSITY}); with patterns each head's "
                                         f"own (search at another --density to change it)")
    last_queries: int = option(64, "last queries whose attention estimates a vertical-slash head's lines")

    def validate(self) -> None:
        super().validate()
        check_positive_int(self.name, "last_queries", self.last_queries)
        if self.patterns is not None and not isinstance(self.patterns, str):
            raise TypeError(f"{self.name}: patterns must be a path to a pattern file, got "
                            f"{type(self.patterns).__name__}")
        self._file: PatternFile | None = None if self.patterns is None else load_patterns(self.patterns)
        self._rows: dict[tuple[int, str], tuple[torch.Tensor, ...]] = {}
        if self._file is None:
            return
        if self.density is not None:
            check_number(self.name, "density", self.density, low=0, high=1, low_open=True)
            raise ValueError(f"{self.name}: density={self.density} with patterns={self.patterns}: the file sets each "
                             f"head's density (searched at a mean of {self._file.settings.get('density')}); drop "
                             f"density, or search again with `kvx search-patterns --density {self.density}`")
        for name in ("block_size", "sink", "local"):
            searched = self._file.settings.get(name)
            if searched is not None and getattr(self, name) != searched:
                raise ValueError(f"{self.name}: {name}={getattr(self, name)} but pattern file {self.patterns} was "
                                 f"searched with {name}={searched} (its sizes count blocks of that setting); give "
                                 f"{name}={searched}, or search again with --{name.replace('_', '-')} "
                                 f"{getattr(self, name)}")

    @classmethod
    def exact_options(cls) -> dict:
        return {"density": 1.0, "patterns": None}

    def pattern_file(self) -> PatternFile | None:
        """The pattern file read from ``patterns`` (None without one)."""
        return self._file

    def prepare(self, model) -> None:
        """A pattern file must come from this model (layer and head counts, identity)."""
        if self._file is not None:
            self._file.check_model(model, self.patterns)

    def scores(self, query, keys, valid, scaling, softcap):
        """Without a pattern file: vertical_slash's online estimate for every head."""
        return vertical_slash_scores(query, keys, valid, scaling, self.block_size, self.last_queries, softcap)

    def block_lists(self, storage, query, keys, valid, scaling, softcap, num_qb, num_kb, first):
        if self._file is None:
            density = ONLINE_DENSITY if self.density is None else self.density
            return block_index(self.scores(query, keys, valid, scaling, softcap), num_qb, num_kb, first, self.sink,
                               self.local, density)
        layer = getattr(storage, "layer_idx", None)
        if layer is None:
            raise ValueError(f"{self.name}: a pattern file needs the layer index of each call (a kvx.KVCache layer); "
                             f"this storage has none")
        pattern, local, density = self._layer_rows(layer, query.shape[1], query.device)
        return head_lists(pattern, local, density, query, keys, valid, scaling, softcap, self.block_size, self.sink,
                          self.last_queries, num_qb, num_kb, first)

    def _layer_rows(self, layer: int, heads: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[H]`` pattern ids, local blocks and densities of ``layer``, on ``device`` (cached)."""
        key = (layer, str(device))
        if key not in self._rows:
            self._file.check_heads(layer, heads, self.patterns)
            rows = (self._file.pattern[layer], self._file.local[layer], self._file.density[layer])
            self._rows[key] = tuple(row.to(device) for row in rows)
        return self._rows[key]


def head_lists(pattern: torch.Tensor, local: torch.Tensor, density: torch.Tensor, query: torch.Tensor,
               keys: torch.Tensor, valid: torch.Tensor | None, scaling: float, softcap: float | None,
               block_size: int, sink: int, last_queries: int, num_qb: int, num_kb: int,
               first: torch.Tensor) -> torch.Tensor:
    """Block lists ``[B, H, Qb, K]`` where query head ``h`` follows its own pattern ``pattern[h]``
    (:data:`kvx.methods._pattern_file.PATTERNS`; ``-1``, not searched: every block) with its own
    ``local[h]`` blocks and ``density[h]``: an ``a_shape`` head's list is ``a_shape``'s with that
    local, a ``vertical_slash`` / ``block_topk`` head's that method's at that density. Each online
    estimate runs over the heads that use it alone."""
    heads = query.shape[1]
    scores = query.new_zeros(query.shape[0], heads, num_qb, num_kb, dtype=torch.float32)
    for kind, estimate in ((VERTICAL_SLASH, _vertical_slash), (BLOCK_TOPK, _block_topk)):
        chosen = pattern == kind
        if bool(chosen.any()):
            scores = _on_heads(chosen, scores, estimate, query, keys, valid, scaling, softcap, block_size,
                               last_queries)
    dense = pattern < 0
    density = torch.where(pattern == A_SHAPE, 0.0, density)
    if bool(dense.any()):  # not searched: every causal block
        density = torch.where(dense, 1.0, density)
    return block_index(scores, num_qb, num_kb, first, sink, local, density)


def _vertical_slash(query, keys, valid, scaling, softcap, block_size, last_queries):
    return vertical_slash_scores(query, keys, valid, scaling, block_size, last_queries, softcap)


def _block_topk(query, keys, valid, scaling, softcap, block_size, last_queries):
    return pooled_query_scores(query, keys, valid, scaling, block_size, softcap)


def _on_heads(chosen: torch.Tensor, scores: torch.Tensor, estimate, query, keys, valid, *args) -> torch.Tensor:
    """``scores [B, H, Qb, Nb]`` with the query heads in ``chosen [H]`` set by ``estimate``, run on
    those heads alone (their KV heads gathered, one per query head, when not every head is chosen)."""
    if bool(chosen.all()):
        return estimate(query, keys, valid, *args)
    heads = chosen.nonzero()[:, 0]  # [h]
    kv_heads = heads // (query.shape[1] // keys.shape[1])  # [h] the KV head of each
    sub_valid = None if valid is None else valid[:, kv_heads]
    scores[:, heads] = estimate(query[:, heads], keys[:, kv_heads], sub_valid, *args)  # [B, h, Qb, Nb]
    return scores
