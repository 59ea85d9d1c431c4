"""Quest: at each decode step, read only the pages of keys whose upper-bound score for the new query
is highest, plus the pages of the first (sink) and most recent tokens.

Paper: Tang et al., "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference" (ICML
2024). Per page of ``page_size`` real tokens (counted from each (row, KV head)'s oldest, so a padded
row pages like the row alone), the per-channel min and max of its keys are kept beside the cache
(:class:`kvx.kernels.pages.PageIndex`, extended in place as decode steps append a token, the pages
of tokens quantized out of a window refreshed from those tokens alone, rebuilt when a composed
selection evicts or beam search re-orders rows); what is read goes through the storage's
:meth:`~kvx.storage.base.Storage.decode_reader`, which reads (dequantizes) only the chosen slots;
a page's bound on the new query's logit is ``sum_d max(q_d * min_d, q_d * max_d)``. GQA: pages are
chosen per KV head, from its query heads' bounds combined by ``reduce`` (``max``: a page any of them
may need; ``sum``), and K/V are never expanded. A decode (speed) method: the prompt attends densely,
the full cache stays stored, and the page bounds add ``2 / page_size`` of the keys' bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvx.kernels.pages import attend_tokens, build_page_index, page_tokens, page_upper_bounds, top_pages
from kvx.methods.base import register_method
from kvx.methods.decode_sparse import DecodeSparseMethod, dense_step
from kvx.policy import check_positive_int, option, register_policy

SPARE_PAGES = 16
"""Empty pages allocated past the last when page bounds are built, so decode steps extend them in
place (grown by a quarter when they run out)."""


@register_method
@register_policy
@dataclass
class Quest(DecodeSparseMethod):
    """Decode: top pages by the query's upper bound on their keys' logits, plus sink and recent pages
    (Quest, Tang et al., 2024)."""

    name: ClassVar[str] = "quest"
    summary: ClassVar[str] = ("decode: the pages of keys with the highest upper bound on the query's logit, plus sink "
                              "and recent pages; the full cache stays stored (Quest, Tang et al., 2024)")

    budget: int = option(1024, "tokens each (row, KV head) reads at a decode step, in whole pages, sink and recent "
                               "pages included (> 0)")
    density: float | None = option(None, "instead of budget: the share of a (row, KV head)'s pages it reads, in (0, 1]")
    page_size: int = option(16, "tokens per page (a power of two)")
    sink: int = option(16, "the pages holding the first this many real tokens are always read (>= 0)")
    recent: int = option(16, "the pages holding the last this many real tokens are always read (>= 0)")
    dense_layers: int = option(2, "the first this many layers attend densely (Quest's choice: 2)")

    def validate(self) -> None:
        super().validate()
        check_positive_int(self.name, "page_size", self.page_size)
        if self.page_size & (self.page_size - 1):
            raise ValueError(f"{self.name}: page_size must be a power of two (1, 2, 4, ... 16, 32), got {self.page_size}")
        check_positive_int(self.name, "sink", self.sink, minimum=0)
        check_positive_int(self.name, "recent", self.recent, minimum=0)
        check_positive_int(self.name, "dense_layers", self.dense_layers, minimum=0)

    def check_model(self, num_layers: int) -> None:
        if self.dense_layers >= num_layers:
            raise ValueError(
                f"{self.name}: dense_layers ({self.dense_layers}) must be below the model's {num_layers} layers, "
                f"or no layer reads sparsely; choose 0-{num_layers - 1}"
            )

    @classmethod
    def exact(cls) -> Quest:
        """Every page of every layer: dense attention."""
        return cls(density=1.0, dense_layers=0)

    def attend_layer(self, cache, layer_idx, storage, query, key, value, mask, scaling, softcap, sinks):
        args = (storage, query, key, value, mask, scaling, softcap, sinks)
        if query.shape[-2] != 1:  # the prompt, an extension: dense
            return dense_step(*args)
        reader = None if layer_idx < self.dense_layers else storage.decode_reader(mask)
        if reader is None:
            return dense_step(*args)
        index = self.page_index(storage, reader)
        have = -(-index.real // self.page_size)  # [B, Hkv] pages
        forced = self.forced_pages(index.real, index.num_pages)  # [B, Hkv, N]
        count = torch.minimum(have, torch.maximum(self.read_count(index.real, self.page_size), forced.sum(-1)))
        if bool((count >= have).all()):  # every page: dense attention (the exact setting)
            return dense_step(*args, real=index.real)
        scores = page_upper_bounds(query, index, self.reduce).masked_fill(forced, math.inf)
        pages, chosen = top_pages(scores, count)
        slots, read = page_tokens(index, pages, chosen)
        out = attend_tokens(query, reader, slots, read, scaling, softcap, sinks)  # only these K * P slots are read
        groups = query.shape[1] // index.real.shape[1]
        storage.count_decode_keys(int(read.sum()) * groups, int(index.real.sum()) * groups)
        return out.to(query.dtype)

    def forced_pages(self, real: torch.Tensor, pages: int) -> torch.Tensor:
        """``[B, Hkv, N]`` bool: pages holding one of the first ``sink`` or last ``recent`` real tokens."""
        page = torch.arange(pages, device=real.device)
        sink = page < -(-self.sink // self.page_size)
        have = -(-real // self.page_size)
        start = torch.div((real - self.recent).clamp(min=0), self.page_size, rounding_mode="floor")
        recent = (page >= start[..., None]) if self.recent else torch.zeros_like(sink)
        return (sink | recent) & (page < have[..., None])

    def page_index(self, storage, reader):
        """The page bounds of what ``reader`` (:meth:`kvx.storage.base.Storage.decode_reader`) reads:
        kept beside the storage where the reader is persistent, extended by the step's token where only
        that token was appended since (refreshed by the storage as it re-holds tokens); else rebuilt
        from every key (on a transient view, every step)."""
        index = (storage.method_state or {}).get(self.name) if reader.persistent else None
        if (index is not None and index.page_size == self.page_size and index.stored + 1 == reader.stored
                and reader.appended_real()):
            index.extend(reader.new_key())
            return index
        index = build_page_index(reader.keys(), reader.valid, self.page_size,
                                 spare=SPARE_PAGES if reader.persistent else 0)
        if reader.persistent:
            storage.method_state = {**(storage.method_state or {}), self.name: index}
        return index
