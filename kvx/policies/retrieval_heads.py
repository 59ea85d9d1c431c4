"""Retrieval heads keep every token; streaming heads keep attention sinks and recent tokens.

Papers: Xiao et al., "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and
Streaming Heads" (2024); Tang et al., "RazorAttention: Efficient KV Cache Compression Through
Retrieval Heads" (2024); the retrieval score of Wu et al., "Retrieval Head Mechanistically
Explains Long-Context Factuality" (2024).

Which (layer, KV head) is a retrieval head comes from a scores file (``pattern``, written by
``kvx profile-heads``): the top ``ratio`` of all KV heads of the model by score, or those scoring at
least ``threshold``. The others are *streaming* heads: they keep their first ``sink`` and last
``recent`` tokens, at prefill, between prefill chunks and every ``decode_interval`` decoded tokens,
so a streaming head never holds more than ``sink + recent + decode_interval - 1`` tokens whatever
the context length. Heads keep different numbers of tokens, so storage is ragged (each head packed,
no padding, no masking of stored keys): ``kvx.compose`` adds the ``ragged`` storage policy.

Without a pattern the policy profiles on the fly, layer by layer, at the first prompt longer than
``sink + recent``: each KV head's score is the attention mass that the last 32 prompt queries put on
the tokens a streaming head would drop (the most of its query heads), and the top ``ratio`` of each
layer's KV heads (or those at ``threshold``) become retrieval heads, for this and every later prompt
of the patch. Cost: one ``32 x S`` attention-probability pass per layer at that prefill, nothing
afterwards. This sees one prompt, not a retrieval task, and splits each layer alike: a profile from
``kvx profile-heads`` is the better choice (see docs/retrieval-heads.md).

``compensation=True`` adds RazorAttention's compensation token: each streaming head keeps one extra
token whose key and value are the means of those of every token it dropped so far (updated at each
eviction; how many it stands for is kept as per-token state). Unlike the paper, the token enters
attention as one ordinary token: kvx storage has no per-token logit bias for the paper's
``log(count)`` weight.

A prompt no longer than ``sink + recent`` is kept whole by every head (nothing to drop).

``budget=N`` evicts on the retrieval heads too: they keep the ``N`` prompt tokens SnapKV scores
highest (its observation window, sinks of its own choosing), so the policy composes retrieval-head
splits with query-aware eviction in one selection; tokens decoded afterwards are all kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvx.kernels.reference import window_attention_probs
from kvx.policies._head_scores import HeadScores, load_scores
from kvx.policy import (
    CompressionView,
    Phase,
    Policy,
    check_number,
    check_positive_int,
    make_policy,
    option,
    register_policy,
)

PROFILE_WINDOW = 32
"""Last prompt queries whose attention scores the heads when profiling on the fly."""
COMPENSATION_STATE = "retrieval_heads_compensation"
"""Per-token state: how many dropped tokens a compensation slot stands for (0 on ordinary tokens)."""


class DecodeInterval(Policy):
    """Acts at prefill and extend, and while decoding every ``decode_interval`` tokens counted from
    the end of the latest prompt piece: the same steps in every row of a batch, so a left-padded row
    is compressed at the steps it would be alone. Subclasses call :meth:`note_phase` in ``select_mask``."""

    decode_interval: int

    def note_phase(self, view: CompressionView) -> None:
        if view.phase != "decode":
            self._prompt_seen = view.num_seen

    def wants_view_at(self, phase: Phase, seen: int) -> bool:
        decoded = seen - getattr(self, "_prompt_seen", 0)
        return self.wants_view(phase) and (phase != "decode" or decoded % self.decode_interval == 0)


@register_policy
@dataclass
class RetrievalHeads(DecodeInterval):
    """Retrieval heads keep all tokens, streaming heads sinks + recent (DuoAttention, RazorAttention)."""

    name: ClassVar[str] = "retrieval_heads"
    summary: ClassVar[str] = ("retrieval heads keep every token, streaming heads sinks + recent tokens; ragged storage "
                              "(DuoAttention, Xiao et al. 2024; RazorAttention, Tang et al. 2024)")
    storage: ClassVar[str] = "ragged"  # heads keep different counts: kvx.compose adds the ragged storage policy

    pattern: str | None = option(None, "scores file from `kvx profile-heads` (.safetensors); none: profile on the fly "
                                       "at the first prompt longer than sink + recent")
    ratio: float = option(0.5, "share of KV heads that are retrieval heads, in (0, 1] (model-wide with a pattern, "
                               "per layer on the fly)")
    threshold: float | None = option(None, "heads scoring at least this are retrieval heads; replaces ratio when set")
    sink: int = option(64, "first tokens every streaming head keeps (attention sinks)")
    recent: int = option(256, "most recent tokens every streaming head keeps")
    compensation: bool = option(False, "RazorAttention's compensation token: streaming heads keep the mean of what "
                                       "they dropped as one extra token")
    decode_interval: int = option(16, "streaming heads evict every N decoded tokens (they hold at most "
                                      "sink + recent + N - 1 tokens)")
    budget: int | None = option(None, "retrieval heads keep at most this many prompt tokens, chosen by SnapKV's "
                                      "scores (its observation window: the last min(32, budget) queries); none: all")

    def validate(self) -> None:
        super().validate()
        check_number(self.name, "ratio", self.ratio, low=0, high=1, low_open=True)
        if self.threshold is not None:
            check_number(self.name, "threshold", self.threshold)
        check_positive_int(self.name, "sink", self.sink, minimum=0)
        check_positive_int(self.name, "recent", self.recent, minimum=1)
        check_positive_int(self.name, "decode_interval", self.decode_interval)
        if not isinstance(self.compensation, bool):
            raise TypeError(f"{self.name}: compensation must be true or false, got {self.compensation!r}")
        if self.pattern is not None and not isinstance(self.pattern, str):
            raise TypeError(f"{self.name}: pattern must be a path to a scores file, got {type(self.pattern).__name__}")
        self._scores: HeadScores | None = None if self.pattern is None else load_scores(self.pattern)
        self._table = None if self._scores is None else choose_heads(self._scores.scores, self.ratio, self.threshold)
        self._evictor = None  # SnapKV over the retrieval heads, with a budget
        if self.budget is not None:
            check_positive_int(self.name, "budget", self.budget)
            self._evictor = make_policy("snapkv", budget=self.budget, window=min(32, self.budget))
        self._learned: dict[int, torch.Tensor] = {}  # layer -> [Hkv] bool, profiled on the fly
        self._learned_scores: dict[int, torch.Tensor] = {}  # layer -> [Hkv] float, the on-the-fly scores

    # --- which heads retrieve -------------------------------------------------------------------

    def prepare(self, model: Any) -> None:
        """A pattern must come from this model (its head shape); an on-the-fly profile starts anew."""
        if self._scores is not None:
            self._scores.check_model(model, self.pattern)
        self._learned, self._learned_scores = {}, {}

    def retrieval_heads(self) -> torch.Tensor | None:
        """``[L, Hkv]`` bool, True for retrieval heads (from the pattern), or None without a pattern."""
        return None if self._table is None else self._table.clone()

    def on_the_fly_scores(self) -> dict[int, torch.Tensor]:
        """Layer -> ``[Hkv]`` scores of the on-the-fly profile so far (empty with a pattern)."""
        return dict(self._learned_scores)

    def _everything_retrieves(self) -> bool:
        if self._table is not None:
            return bool(self._table[~self._scores.scores.isnan()].all())
        return self.threshold is None and self.ratio >= 1

    def _layer_heads(self, view: CompressionView) -> torch.Tensor | None:
        """``[Hkv]`` bool of this layer's retrieval heads; None while unknown (keep everything)."""
        if self._table is not None:
            return layer_row(self._table, view, f"{self.name}: pattern {self.pattern}")
        heads = self._learned.get(view.layer_idx)
        if heads is None and view.phase != "decode":
            scores = streaming_loss(view, self.sink, self.recent)
            if scores is not None:
                self._learned_scores[view.layer_idx] = scores.cpu()
                heads = self._learned[view.layer_idx] = choose_heads(scores[None].cpu(), self.ratio, self.threshold)[0]
        return None if heads is None else heads.to(view.keys.device)

    # --- what each head keeps -------------------------------------------------------------------

    def wants_view(self, phase: Phase) -> bool:
        evicts = self._evictor is not None and self._evictor.wants_view(phase)
        return evicts or not self._everything_retrieves()

    def select_mask(self, view: CompressionView) -> torch.Tensor | None:
        self.note_phase(view)
        heads = self._layer_heads(view)
        retrieval_keep = None if self._evictor is None else self._evictor.select_mask(view)  # None: every token
        if heads is None or bool(heads.all()):
            return retrieval_keep
        compensated = view.state.get(COMPENSATION_STATE) if self.compensation else None
        keep = streaming_keep(view.valid, self.sink, self.recent, compensated)
        dropped = view.valid & ~keep & ~heads[None, :, None]
        if not bool(dropped.any()) and retrieval_keep is None:
            return None
        keep = torch.where(heads[None, :, None], view.valid if retrieval_keep is None else retrieval_keep, keep)
        if self.compensation:
            keep = compensate(view, keep, dropped)
        return keep


def layer_row(table: torch.Tensor, view: CompressionView, source: str) -> torch.Tensor:
    """Row ``view.layer_idx`` of a per-head ``table [L, Hkv]``, on the view's device; raises (naming
    ``source``) when the table does not fit the layer's KV heads."""
    kv_heads = view.keys.shape[1]
    if view.layer_idx >= table.shape[0] or table.shape[1] != kv_heads:
        raise ValueError(f"{source} has {table.shape[0]} layers x {table.shape[1]} KV heads, but layer "
                         f"{view.layer_idx} has {kv_heads} KV heads")
    return table[view.layer_idx].to(view.keys.device)


def choose_heads(scores: torch.Tensor, ratio: float, threshold: float | None) -> torch.Tensor:
    """``[L, Hkv]`` bool retrieval heads from scores ``[L, Hkv]``: those at ``threshold`` or more, else
    the ``ceil(ratio x n)`` best of the ``n`` scored heads (ties: lower layer, then lower head). NaN
    scores (layers no policy compresses) are never chosen and do not count in ``n``."""
    scored = ~scores.isnan()
    if threshold is not None:
        return scored & (scores >= threshold)
    count = math.ceil(ratio * int(scored.sum()) - 1e-9)
    flat = scores.masked_fill(~scored, -math.inf).flatten()
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    chosen[flat.sort(descending=True, stable=True).indices[:count]] = True
    return chosen.view(scores.shape) & scored


def streaming_keep(valid: torch.Tensor, sink: int, recent: int | torch.Tensor,
                   compensated: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, Hkv, S]`` bool: the first ``sink`` and last ``recent`` (an int, or ``[Hkv]`` per head) real
    tokens of each (row, head), and a compensation slot (``compensated > 0``) where there is one; ranks
    count real tokens only, so a left-padded row keeps what it would alone."""
    slot = compensated > 0 if compensated is not None else torch.zeros_like(valid)
    real = valid & ~slot
    rank = real.long().cumsum(-1) - 1
    count = real.sum(-1, keepdim=True)
    if isinstance(recent, torch.Tensor):
        recent = recent.to(valid.device)[None, :, None]  # [1, Hkv, 1]
    return (real & ((rank < sink) | (rank >= count - recent))) | (slot & valid)


def streaming_loss(view: CompressionView, sink: int, recent: int) -> torch.Tensor | None:
    """``[Hkv]`` on-the-fly score of each KV head: the attention probability the last
    :data:`PROFILE_WINDOW` queries put on tokens outside ``sink + recent`` (what the head would lose as
    a streaming head), the most of its query heads, averaged over queries and rows; None when no row
    has a token outside."""
    outside = view.valid & ~streaming_keep(view.valid, sink, recent)  # [B, Hkv, S]
    if not bool(outside.any()):
        return None
    window = min(PROFILE_WINDOW, view.query.shape[-2])
    probs = window_attention_probs(view.query[..., -window:, :], view.keys, view.query_mask(window),
                                   view.scaling, view.softcap)  # [B, Hkv, G, w, S]
    lost = (probs * outside[:, :, None, None, :]).sum(-1)  # [B, Hkv, G, w]
    return lost.mean(-1).amax(-1).mean(0)


def compensate(view: CompressionView, keep: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """RazorAttention's compensation token: for each (row, head) that drops tokens, fold their keys
    and values into its compensation slot (``count``-weighted running mean), placed in the first
    dropped slot when it has none yet. Writes the slot's key, value (``view.keys/values [B, Hkv, S,
    D]``, which the storage packs next) and count (``view.state``); returns ``keep`` with the slot."""
    counts = view.state.get(COMPENSATION_STATE)
    if counts is None:
        counts = torch.zeros(view.valid.shape, dtype=torch.float32, device=view.valid.device)
    has_slot = (counts > 0).any(-1)  # [B, Hkv]
    slot = torch.where(has_slot, (counts > 0).float().argmax(-1), dropped.float().argmax(-1))  # [B, Hkv]
    folding = dropped.any(-1)  # [B, Hkv]: heads with something to fold in
    weights = dropped.float() + counts  # each dropped token once, the old slot by its count
    total = weights.sum(-1)  # [B, Hkv]
    index = slot[..., None, None]
    for tensor in (view.keys, view.values):
        mean = torch.einsum("bhs,bhsd->bhd", weights, tensor.float()) / total.clamp(min=1)[..., None]
        current = tensor.gather(2, index.expand(-1, -1, 1, tensor.shape[-1]))[:, :, 0]
        tensor.scatter_(2, index.expand(-1, -1, 1, tensor.shape[-1]),
                        torch.where(folding[..., None], mean.to(tensor.dtype), current)[:, :, None])
    counts = counts.masked_fill(dropped, 0).scatter(2, slot[..., None], torch.where(folding, total, counts.gather(
        2, slot[..., None])[..., 0])[..., None])
    view.state[COMPENSATION_STATE] = counts
    return keep | (folding[..., None] & (torch.arange(keep.shape[-1], device=keep.device) == slot[..., None]))
