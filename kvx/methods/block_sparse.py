"""Block-sparse prefill: the base of the methods that compute attention only over chosen key blocks
for each block of new queries (``a_shape``, ``vertical_slash``, ``block_topk``).

One call with several new queries (prefill, a chunk of a chunked prefill, an extension):

1. the storage gives what the queries attend over (:meth:`kvx.storage.base.Storage.causal_view`);
   a storage that cannot (a mask that is not plain causal over its valid slots), a prompt shorter
   than ``min_length`` and a decode step (one query) attend densely through the storage;
2. the method builds the block lists (:mod:`kvx.kernels.block_index`): the first ``sink`` and the
   last ``local`` key blocks of every query block, plus what its own estimate picks;
3. :func:`kvx.kernels.block_sparse.block_sparse_attention` computes those blocks alone;
4. the layer counts the blocks computed and the causal ones (``cache.stats()``: ``blocks_computed``
   / ``blocks_causal``, dense calls counted as all computed), so no run claims a sparsity it did not
   compute.

Nothing stored changes: these are methods (the method axis), composable with any selection and
storage (``vertical_slash:density=0.1+snapkv:budget=1024``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvx.kernels import reference
from kvx.kernels.block_index import block_index, first_real_block
from kvx.kernels.block_sparse import block_sparse_attention, check_block_size
from kvx.kernels.reference import block_grid
from kvx.methods.base import Method
from kvx.policy import MethodPolicy, check_number, check_positive_int, option

MIN_LENGTH = 4096
"""Default ``min_length``: prompts shorter than this run dense attention. Measured on the CPU path
at 10% density, one layer, on a shared machine (docs/block-sparse.md): the methods were 0.7-1.4x
SDPA at 1K keys, 1.1-2.2x at 2K, 2.3-2.6x at 4K, and after the estimate and op speed-ups 0.8-1.3x,
2.2-2.8x and 3.3-4.1x; 4K keeps every prompt clear of the crossover, with a margin for load. Not measured on a GPU (MInference reports its kernel slower than
FlashAttention-2 below ~10-50K)."""


@dataclass
class BlockSparseMethod(MethodPolicy, Method):
    """Base of the block-sparse prefill methods (module docstring). A subclass gives
    :meth:`scores` (None: sink and local blocks alone) and, where it keeps a share of the blocks,
    a ``density`` (or ``threshold``) option."""

    summary: ClassVar[str] = "block-sparse prefill"
    serves: ClassVar[str] = "prefill"

    block_size: int = option(64, "tokens per query and key block (a power of two >= 16)")
    sink: int = option(1, "first key blocks (of a row's real tokens) every query block computes")
    local: int = option(2, "last key blocks, up to its own, every query block computes (>= 1; 2: every query "
                           "sees at least a block of tokens behind it)")
    min_length: int = option(MIN_LENGTH, "attend densely while fewer keys than this are attended (short prompts)")

    def validate(self) -> None:
        super().validate()
        check_block_size(self.block_size, self.name)
        check_positive_int(self.name, "sink", self.sink, minimum=0)
        check_positive_int(self.name, "local", self.local, minimum=1)
        check_positive_int(self.name, "min_length", self.min_length, minimum=0)
        for name in ("density", "threshold"):
            value = getattr(self, name, None)
            if value is not None:
                check_number(self.name, name, value, low=0, high=1, low_open=True)

    @classmethod
    def exact(cls) -> BlockSparseMethod:
        """Every block, from the first query on: the block-sparse path at density 1."""
        return cls(min_length=0, **cls.exact_options())

    @classmethod
    def exact_options(cls) -> dict:
        """The options (besides ``min_length=0``) under which every causal block is computed."""
        return {"density": 1.0}

    def make_method(self) -> BlockSparseMethod:
        return self

    def scores(self, query: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor | None, scaling: float,
               softcap: float | None) -> torch.Tensor | None:
        """``[B, H, Qb, Nb]`` how much each key block matters to each query block (None: no estimate)."""
        raise NotImplementedError

    def block_lists(self, storage, query: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor | None,
                    scaling: float, softcap: float | None, num_qb: int, num_kb: int,
                    first: torch.Tensor) -> torch.Tensor:
        """The block lists ``[B, H, Qb, K]`` of one call (:func:`kvx.kernels.block_index.block_index`):
        sink and local blocks plus the best of :meth:`scores` up to ``density`` (or ``threshold``).
        ``storage`` (whose ``layer_idx`` says which layer) is for a method that differs per layer."""
        threshold = getattr(self, "threshold", None)  # a threshold, where set, replaces the density
        density = None if threshold is not None else getattr(self, "density", None)
        return block_index(self.scores(query, keys, valid, scaling, softcap), num_qb, num_kb, first, self.sink,
                           self.local, density, threshold)

    def attend(self, storage, query, key, value, mask, scaling, softcap, sinks):
        view = storage.causal_view(mask) if query.shape[-2] > 1 else None  # decode: dense
        if view is None or view[0].shape[-2] < self.min_length:
            if query.shape[-2] > 1:
                keys, valid = (key, None) if view is None else (view[0], view[2])
                causal = _causal_count(query, keys, valid, self.block_size)
                storage.count_blocks(causal, causal)
            return storage.attend(query, key, value, mask, scaling, softcap, sinks)
        keys, values, valid = view
        batch, heads, q_len = query.shape[:3]
        num_qb, num_kb, _ = block_grid(q_len, keys.shape[-2], self.block_size)
        first = first_real_block(valid, batch, heads, keys.shape[-2], self.block_size, query.device)
        index = self.block_lists(storage, query, keys, valid, scaling, softcap, num_qb, num_kb, first)
        out, lse = block_sparse_attention(query, keys, values, index, valid, scaling, softcap, self.block_size)
        storage.count_blocks(int((index >= 0).sum()), _causal_count(query, keys, valid, self.block_size, first))
        if sinks is not None:
            out = reference.merge_attention([(out, lse), reference.sink_part(sinks, out)])
        return out.to(query.dtype)


def _causal_count(query: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor | None, block_size: int,
                  first: torch.Tensor | None = None) -> int:
    """Causal blocks holding a real key, summed over rows, query heads and query blocks."""
    batch, heads, q_len = query.shape[:3]
    num_qb, num_kb, _ = block_grid(q_len, keys.shape[-2], block_size)
    if first is None:
        first = first_real_block(valid, batch, heads, keys.shape[-2], block_size, query.device)
    own = num_kb - num_qb + torch.arange(num_qb, device=query.device)
    return int((own - first[..., None] + 1).clamp(min=0).sum())
