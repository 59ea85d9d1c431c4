"""Page selection at decode (pure torch; the CPU path and the reference of quest and tidal).

A layer's real tokens, per (row, KV head), in stored order, are cut into *pages* of ``P`` tokens
counted from the oldest real token (so a row's pages hold the same tokens alone as in a left-padded
batch). For each page, the per-channel min and max of its keys (Quest's metadata) bound the logit
any query can give a key of the page: ``sum_d max(q_d * min_d, q_d * max_d)``.

Shapes: ``B`` batch, ``H`` query heads, ``Hkv`` KV heads (``G = H // Hkv``), ``S`` stored slots,
``D`` head dim, ``N`` pages, ``K`` selected pages (or tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvx.kernels import reference

REDUCES = ("max", "sum")
"""How the bounds (or attention) of a KV head's ``G`` query heads reduce to one score per page (or
token): ``max`` (a page matters when it matters to any query head of the group) or ``sum``."""


@dataclass
class PageIndex:
    """Per-page key bounds of one layer, beside its storage.

    Attributes:
        mins, maxs: ``[B, Hkv, C, D]`` per-channel min / max of each page's keys (``C >= N``
            pages allocated; pages with no token hold ``+inf`` / ``-inf``), in the keys' dtype.
        real: ``[B, Hkv]`` real tokens covered per (row, head).
        first: ``[B, Hkv]`` slot of each (row, head)'s oldest real token, where its real tokens are
            contiguous (the last ``real`` slots: dense storage); None otherwise.
        slots: ``[B, Hkv, W]`` the stored slot of each real token by rank (oldest first), where
            real tokens are not contiguous (padding between prefix segments); None otherwise.
        stored: slots ``S`` of the keys it was built on (or last extended with).
    """

    mins: torch.Tensor
    maxs: torch.Tensor
    real: torch.Tensor
    first: torch.Tensor | None
    slots: torch.Tensor | None
    stored: int
    page_size: int

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.mins, self.maxs, self.real, self.first, self.slots) if t is not None]

    @property
    def num_pages(self) -> int:
        """Pages of the (row, head) with the most real tokens."""
        return -(-int(self.real.max()) // self.page_size) if self.real.numel() else 0

    def token_slots(self, ranks: torch.Tensor) -> torch.Tensor:
        """Stored slots ``[B, Hkv, T]`` of real tokens by rank ``ranks [B, Hkv, T]`` (ranks past a
        (row, head)'s real tokens give some valid slot; mask them)."""
        if self.first is not None:
            return (self.first[..., None] + ranks).clamp(max=self.stored - 1)
        return self.slots.gather(2, ranks.clamp(max=self.slots.shape[-1] - 1))

    def extend(self, key: torch.Tensor) -> None:
        """Append one real token per (row, head), ``key [B, Hkv, 1, D]`` at the next slot (a decode
        step on contiguous storage): its page's bounds widen in place."""
        page = torch.div(self.real, self.page_size, rounding_mode="floor")  # [B, Hkv]
        needed = int(page.max()) + 1
        if needed > self.mins.shape[2]:
            self._grow(needed + max(16, needed // 4))
        index = page[..., None, None].expand(*page.shape, 1, key.shape[-1])
        self.mins.scatter_reduce_(2, index, key.to(self.mins.dtype), "amin")
        self.maxs.scatter_reduce_(2, index, key.to(self.maxs.dtype), "amax")
        if self.slots is not None:  # the new rank's slot: the next one
            self.slots = torch.cat([self.slots, self.slots[..., -1:]], -1)
            self.slots.scatter_(2, self.real[..., None], torch.full_like(self.real[..., None], self.stored))
        self.real += 1
        self.stored += 1

    def refresh(self, reader, start: torch.Tensor, stop: torch.Tensor) -> None:
        """Real tokens of ranks ``[start, stop)`` (``[B, Hkv]`` each) now read otherwise (quantized) and
        slots moved, ranks kept: the layout is re-read from ``reader`` (a
        :class:`kvx.storage.base.TokenReader`: ``valid``, ``stored``, ``gather(slots)``) and the bounds
        of the pages holding those ranks are recomputed from their tokens alone."""
        batch, kv_heads = self.real.shape
        real, self.first, self.slots = real_layout(reader.valid, batch, kv_heads, reader.stored, self.real.device)
        if not torch.equal(real, self.real):
            raise ValueError(f"page bounds cover {self.real.tolist()} real tokens, the storage holds {real.tolist()}")
        self.stored, size = reader.stored, self.page_size
        moved = stop > start  # [B, Hkv]
        if not bool(moved.any()):
            return
        low = torch.div(start, size, rounding_mode="floor")
        high = torch.div((stop - 1).clamp(min=0), size, rounding_mode="floor")
        width = int((high - low)[moved].max()) + 1
        pages = low[..., None] + torch.arange(width, device=low.device)  # [B, Hkv, W]
        touched = moved[..., None] & (pages <= high[..., None])
        if int(pages.max()) >= self.mins.shape[2]:  # so that every page written is allocated (no clamping)
            self._grow(int(pages.max()) + 1)
        ranks = (pages[..., None] * size + torch.arange(size, device=low.device)).flatten(2)  # [B, Hkv, W * P]
        keys = reader.gather(self.token_slots(ranks))[0].reshape(batch, kv_heads, width, size, -1)
        present = (ranks < real[..., None]).reshape(batch, kv_heads, width, size, 1)
        mins = keys.masked_fill(~present, math.inf).amin(3).to(self.mins.dtype)  # [B, Hkv, W, D]
        maxs = keys.masked_fill(~present, -math.inf).amax(3).to(self.maxs.dtype)
        where = pages[..., None].expand_as(mins)
        self.mins.scatter_(2, where, torch.where(touched[..., None], mins, self.mins.gather(2, where)))
        self.maxs.scatter_(2, where, torch.where(touched[..., None], maxs, self.maxs.gather(2, where)))

    def _grow(self, pages: int) -> None:
        extra = pages - self.mins.shape[2]
        shape = (*self.mins.shape[:2], extra, self.mins.shape[-1])
        self.mins = torch.cat([self.mins, self.mins.new_full(shape, math.inf)], 2)
        self.maxs = torch.cat([self.maxs, self.maxs.new_full(shape, -math.inf)], 2)


def real_layout(valid: torch.Tensor | None, batch: int, kv_heads: int, stored: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(real [B, Hkv], first [B, Hkv] or None, slots [B, Hkv, W] or None)`` of a layer's real
    tokens (see :class:`PageIndex`), from ``valid [B, Hkv, S]`` (None: every slot real)."""
    if valid is None:
        return (torch.full((batch, kv_heads), stored, dtype=torch.long, device=device),
                torch.zeros(batch, kv_heads, dtype=torch.long, device=device), None)
    real = valid.sum(-1)
    first = stored - real
    if bool((valid == (torch.arange(stored, device=device) >= first[..., None])).all()):
        return real, first, None  # contiguous: the last `real` slots
    width = int(real.max())
    position = torch.arange(1, stored + 1, device=device)
    ordered = torch.where(valid, position, torch.zeros_like(position)).sort(dim=-1).values
    slots = ordered[..., stored - width:] - 1  # right-aligned: rank r of a (row, head) at W - real + r
    shift = (width - real)[..., None] + torch.arange(width, device=device)  # rank -> right-aligned position
    return real, None, slots.gather(2, shift.clamp(max=width - 1)).clamp(min=0)


def build_page_index(keys: torch.Tensor, valid: torch.Tensor | None, page_size: int, spare: int = 0) -> PageIndex:
    """The :class:`PageIndex` of ``keys [B, Hkv, S, D]`` with ``valid [B, Hkv, S]`` (None: all real),
    with ``spare`` empty pages allocated past the last."""
    batch, kv_heads, stored, dim = keys.shape
    real, first, slots = real_layout(valid, batch, kv_heads, stored, keys.device)
    pages = -(-int(real.max()) // page_size) if real.numel() else 0
    ranks = torch.arange(pages * page_size, device=keys.device).expand(batch, kv_heads, -1)
    index = PageIndex(keys.new_empty(0), keys.new_empty(0), real, first, slots, stored, page_size)
    present = (ranks < real[..., None])[..., None]  # [B, Hkv, N * P, 1]
    if valid is None and stored == pages * page_size:
        gathered = keys  # every slot real, whole pages: no copy
    else:
        slot = index.token_slots(ranks)
        gathered = keys.gather(2, slot[..., None].expand(-1, -1, -1, dim))
    grouped = gathered.reshape(batch, kv_heads, pages, page_size, dim)
    present = present.reshape(batch, kv_heads, pages, page_size, 1)
    index.mins = grouped.masked_fill(~present, math.inf).amin(3)
    index.maxs = grouped.masked_fill(~present, -math.inf).amax(3)
    if spare:
        index._grow(pages + spare)
    return index


def page_upper_bounds(query: torch.Tensor, index: PageIndex, reduce: str = "max") -> torch.Tensor:
    """Quest's bound ``[B, Hkv, N]`` float32 on the logit (before scaling) of one new query per head,
    ``query [B, H, 1, D]``, over each page's keys: ``sum_d max(q_d * min_d, q_d * max_d)``, reduced
    over the ``G`` query heads of each KV head; ``-inf`` on pages a (row, head) does not have."""
    batch, heads, _, dim = query.shape
    kv_heads, pages = index.real.shape[1], index.num_pages
    grouped = query.float().reshape(batch, kv_heads, heads // kv_heads, dim)  # [B, Hkv, G, D]
    mins, maxs = index.mins[:, :, :pages].float(), index.maxs[:, :, :pages].float()
    # max(q * lo, q * hi) = relu(q) * hi + min(q, 0) * lo, channel by channel
    bounds = grouped.clamp(min=0) @ maxs.transpose(-1, -2) + grouped.clamp(max=0) @ mins.transpose(-1, -2)
    bounds = bounds.amax(2) if reduce == "max" else bounds.sum(2)  # [B, Hkv, N]
    have = -(-index.real // index.page_size)  # pages per (row, head)
    return bounds.masked_fill(torch.arange(pages, device=query.device) >= have[..., None], -math.inf)


def top_pages(scores: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``count [B, Hkv]`` best of ``scores [B, Hkv, N]`` per (row, head): ``(pages [B, Hkv, K],
    chosen [B, Hkv, K])`` with ``K = count.max()``, ``chosen`` False past a (row, head)'s count.
    ``topk`` (6x faster than a stable sort on CPU): which of two exactly equal scores at the cut is
    chosen is unspecified (``+inf`` forced pages all fit in ``count``; ``-inf`` absent ones are never
    reached)."""
    width = int(count.max())
    order = scores.topk(width, dim=-1).indices
    chosen = torch.arange(width, device=scores.device) < count[..., None]
    return order, chosen


def page_tokens(index: PageIndex, pages: torch.Tensor, chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots ``[B, Hkv, K * P]`` of the tokens of pages ``[B, Hkv, K]`` and which are real and
    chosen ``[B, Hkv, K * P]``."""
    size = index.page_size
    ranks = (pages[..., None] * size + torch.arange(size, device=pages.device)).flatten(2)  # [B, Hkv, K * P]
    real = (ranks < index.real[..., None]) & chosen.repeat_interleave(size, dim=-1)
    return index.token_slots(ranks), real


def attend_tokens(query: torch.Tensor, reader, slots: torch.Tensor, real: torch.Tensor, scaling: float,
                  softcap: float | None, sinks: torch.Tensor | None) -> torch.Tensor:
    """Attention ``[B, H, 1, Dv]`` of one query per head over the tokens at ``slots [B, Hkv, T]``
    where ``real [B, Hkv, T]``, read through ``reader`` (a :class:`kvx.storage.base.TokenReader`:
    only those slots are read, dequantized where stored packed; the KV heads are never expanded)."""
    picked_k, picked_v = reader.gather(slots)  # [B, Hkv, T, D|Dv]
    return attend_gathered(query, picked_k, picked_v, real, scaling, softcap, sinks)


def attend_gathered(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, real: torch.Tensor,
                    scaling: float, softcap: float | None, sinks: torch.Tensor | None) -> torch.Tensor:
    """Attention ``[B, H, 1, Dv]`` of one query per head over gathered ``keys / values [B, Hkv, T,
    D|Dv]`` where ``real [B, Hkv, T]`` (the KV heads are never expanded)."""
    mask = None if bool(real.all()) else reference.expand_kv_heads(real, query.shape[1] // keys.shape[1])[:, :, None]
    return reference.attention(query, keys, values, mask, scaling, softcap, sinks)


def quest_reference(query: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor | None, page_size: int,
                    pages: int, reduce: str = "max") -> torch.Tensor:
    """The pages a straightforward loop picks (tests): ``[B, Hkv, N]`` bool, the ``pages`` best by
    upper bound per (row, KV head), over real tokens cut into pages from the oldest."""
    batch, heads, _, dim = query.shape
    kv_heads, stored = keys.shape[1:3]
    groups = heads // kv_heads
    result = []
    for b in range(batch):
        for h in range(kv_heads):
            mine = keys[b, h] if valid is None else keys[b, h][valid[b, h]]
            n = -(-mine.shape[0] // page_size)
            scores = []
            for p in range(n):
                page = mine[p * page_size:(p + 1) * page_size].float()
                lo, hi = page.min(0).values, page.max(0).values
                per_head = [torch.maximum(q * lo, q * hi).sum() for q in query[b, h * groups:(h + 1) * groups, 0].float()]
                scores.append(max(per_head) if reduce == "max" else sum(per_head))
            best = sorted(range(n), key=lambda p: -float(scores[p]))[:pages]
            result.append(torch.tensor([p in best for p in range(n)] + [False] * (stored - n)))
    return torch.stack(result).reshape(batch, kv_heads, stored)
