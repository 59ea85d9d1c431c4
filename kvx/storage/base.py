"""The storage protocol: what every storage kind does for kvx's attention function.

A storage kind is one transformers cache layer (``CacheLayerMixin``) that holds the tokens a policy
keeps, in a layout only it knows, and reads them for attention. One attention call goes:

1. the model calls ``update(keys, values)`` (append; return what attention reads as the model
   sees it),
2. :meth:`Storage.begin_step` records which new slots are padding and returns the mask of the new
   queries over what is stored,
3. the method asks :meth:`Storage.attend` for the output (one new query: decode; several:
   prefill, chunked prefill, extend), or, to compute a subset of the (query, key) pairs itself
   (block-sparse prefill), asks :meth:`Storage.causal_view` for what the queries attend over,
4. the selection reads :meth:`Storage.scoring_inputs` and hands back a keep mask, which
   :meth:`Storage.apply_selection` applies (freeing what is dropped),
5. :meth:`Storage.end_step` drops anything transient.

Shapes: ``B`` batch, ``H`` query heads, ``Hkv`` KV heads, ``q`` new tokens, ``S`` tokens in the
scoring view, ``D`` / ``Dv`` key / value head dims.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvx.compat import CacheLayerMixin


@dataclass
class ScoringInputs:
    """Everything stored, as a selection policy reads it (see ``kvx.policy.CompressionView``).

    Attributes:
        keys, values: ``[B, Hkv, S, D|Dv]`` in temporal order, new tokens last.
        valid: ``[B, Hkv, S]`` bool, False on padding slots.
        state: per-token policy statistics aligned with ``keys``, name -> ``[B, Hkv, S]``.
        attention_mask: ``[B|1, 1|H, q, S]`` of the new queries, or None (causal, or see ``mask_rows``).
        mask_rows: builds the mask of the last ``n`` queries on demand where the whole one is large.
    """

    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor
    state: dict[str, torch.Tensor]
    attention_mask: torch.Tensor | None
    mask_rows: Callable[[int], torch.Tensor] | None = None


class TokenReader:
    """A layer's stored keys and values as a decode-sparse method reads them at one decode step:
    ``S`` slots in stored order, ``valid [B, Hkv, S]`` bool (None: every slot real). Read whole
    only to build a method's state (page bounds), otherwise a few slots at a time (:meth:`gather`).

    ``persistent``: whether state built on it may be kept in :attr:`Storage.method_state` and
    extended by the next step's token (False on a transient view, rebuilt every step)."""

    persistent: bool = False
    stored: int
    valid: torch.Tensor | None

    def keys(self) -> torch.Tensor:
        """Every slot's key ``[B, Hkv, S, D]`` (dequantized where stored packed: a whole read)."""
        raise NotImplementedError

    def new_key(self) -> torch.Tensor:
        """The key ``[B, Hkv, 1, D]`` of the last slot (the token this step appended)."""
        return self.keys()[:, :, -1:]

    def appended_real(self) -> bool:
        """Whether the last slot holds a real token in every (row, KV head)."""
        return self.valid is None or bool(self.valid[..., -1].all())

    def gather(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[B, Hkv, T, D|Dv]`` at ``slots [B, Hkv, T]``, reading only those."""
        raise NotImplementedError


class ViewReader(TokenReader):
    """A :class:`TokenReader` over dense ``keys / values [B, Hkv, S, D]`` (the storage's own tensors,
    ``persistent``, or a transient view)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None, persistent: bool = False):
        self._keys, self._values, self.valid, self.persistent = keys, values, valid, persistent
        self.stored = keys.shape[2]

    def keys(self) -> torch.Tensor:
        return self._keys

    def gather(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from kvx.kernels.reference import take_tokens

        return take_tokens(self._keys, slots), take_tokens(self._values, slots)


class Storage(CacheLayerMixin):
    """Base of every storage kind; see the module docstring for the sequence of one call.

    Counters every kind keeps: ``seen`` (tokens given in total: the logical length), ``past_seen``
    and ``past_stored`` (before the latest update), ``real_seen`` (``[B]`` non-padding tokens per
    row, CPU).
    """

    kind: str = "storage"
    """The name ``stats()`` shows for a layer of this kind."""

    layer_idx: int | None = None
    """Which decoder layer this storage serves (set by :class:`kvx.cache.KVCache`), for a method
    whose choice differs per layer (a searched pattern file); None outside a kvx cache."""

    seen: int
    past_seen: int
    real_seen: torch.Tensor | None

    def check_attended(self, module: torch.nn.Module, layer_idx: int, key: torch.Tensor) -> None:
        """Raise a ValueError when ``key [B, H|Hkv, S, D]`` (what the module attends over) is not what
        this layer stores for it: compressing it would then be wrong."""
        raise NotImplementedError

    def begin_step(self, given_mask: torch.Tensor | None, q_len: int, num_heads: int) -> torch.Tensor | None:
        """Record padding among the ``q_len`` new tokens; return the mask ``[B|1, 1|H, q, S]`` of the new
        queries over what :meth:`attend` reads, or None for plain causal attention.
        ``given_mask``: the boolean mask transformers built, ``[B, 1, q, past + q]`` or None."""
        raise NotImplementedError

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
               scaling: float, softcap: float | None, sinks: torch.Tensor | None) -> torch.Tensor:
        """Attention ``[B, H, q, Dv]`` of ``query [B, H, q, D]`` over everything stored; ``key`` /
        ``value`` are what ``update`` returned. ``sinks``: ``[H]`` attention-sink logits or None."""
        raise NotImplementedError

    def attend_with_column_sums(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                mask: torch.Tensor | None, scaling: float,
                                softcap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`attend` without sinks, and the column sums ``[B, Hkv, G, S]`` of that attention over
        the tokens :meth:`scoring_inputs` gives, where one pass computes both; None otherwise."""
        return self.attend(query, key, value, mask, scaling, softcap, None), None

    def causal_view(self, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """What several new queries attend over, for a method that computes a subset of the pairs
        itself: ``(keys [B, Hkv, S, D], values [B, Hkv, S, Dv], valid [B, Hkv, S] bool or None)``,
        the queries being the last ``q`` slots and ``mask`` (from :meth:`begin_step`) exactly
        causal over the valid slots. None when the mask is anything else (the method then calls
        :meth:`attend`). Valid until :meth:`end_step`."""
        return None

    def decode_reader(self, mask: torch.Tensor | None) -> TokenReader | None:
        """What a decode-sparse method reads of one new query's step (``mask`` from :meth:`begin_step`):
        a :class:`TokenReader`, or None where :meth:`causal_view` gives none. By default a transient
        dense view (every token read to build it); a kind overrides it to read only chosen slots."""
        view = self.causal_view(mask)
        return None if view is None else ViewReader(*view)

    attention_blocks: tuple[int, int] | None = None
    """``(computed, causal)`` attention blocks of the new queries so far, counted by a block-sparse
    method (:meth:`count_blocks`); None where no method counted (``cache.stats()`` shows them)."""

    def count_blocks(self, computed: int, causal: int) -> None:
        """Add the attention blocks a method computed for this layer, of the ``causal`` ones."""
        done, total = self.attention_blocks or (0, 0)
        self.attention_blocks = (done + computed, total + causal)

    decode_keys: tuple[int, int] | None = None
    """``(read, total)`` real keys the decode queries (one new query per row and query head) read,
    of those stored, summed over steps, rows and query heads, counted by a decode-sparse method
    (:meth:`count_decode_keys`: ``quest``, ``tidal``); None where no method counted."""

    def count_decode_keys(self, read: int, total: int) -> None:
        """Add the keys a decode method read for this layer, of the ``total`` real keys stored."""
        done, seen = self.decode_keys or (0, 0)
        self.decode_keys = (done + read, seen + total)

    method_state: dict | None = None
    """What a method keeps beside this layer's storage between calls (quest's page bounds); cleared
    by :meth:`layout_changed` whenever stored slots are re-gathered, re-ordered or cleared, so a
    method rebuilds it then and may extend it in place while tokens are only appended."""

    def layout_changed(self) -> None:
        """Stored slots moved (eviction, quantization out of a tail, beam re-ordering, reset)."""
        self.method_state = None

    def tokens_rewritten(self, start: torch.Tensor, stop: torch.Tensor) -> None:
        """The real tokens of ranks ``[start, stop)`` (``[B, Hkv]`` each, ranked from each (row, KV
        head)'s oldest real token) are now held another way (quantized out of a full-precision
        window) and slots may have moved, with every real token's order kept. Method state that can
        follow (a ``refresh(reader, start, stop)`` method) is refreshed through a persistent
        :meth:`decode_reader`; the rest is dropped."""
        reader = self.decode_reader(None) if self.method_state else None
        kept = {}
        for name, value in (self.method_state or {}).items():
            if reader is not None and reader.persistent and hasattr(value, "refresh"):
                value.refresh(reader, start, stop)
                kept[name] = value
        self.method_state = kept or None

    def method_tensors(self) -> list[torch.Tensor]:
        """The tensors of :attr:`method_state` (counted in the layer's bytes)."""
        found = []
        for value in (self.method_state or {}).values():
            tensors = value.tensors() if hasattr(value, "tensors") else [value]
            found.extend(t for t in tensors if isinstance(t, torch.Tensor))
        return found

    def scoring_inputs(self, query: torch.Tensor, mask: torch.Tensor | None) -> ScoringInputs:
        """Everything stored as a dense view for a selection policy (may be built per call: only asked
        for when the policy wants it)."""
        raise NotImplementedError

    def apply_selection(self, keep: torch.Tensor | None, inputs: ScoringInputs) -> None:
        """Keep the tokens marked in ``keep [B, Hkv, S]`` (a mask over ``inputs``), free the rest, and
        store the statistics of ``inputs.state``; None keeps everything."""
        raise NotImplementedError

    def end_step(self) -> None:
        """Drop what this call built and no later call needs."""

    def end_prompt(self) -> None:
        """The prompt is complete (``kvx.prefill`` ends; ``generate()`` says so with its first
        decode step): store it in its final form (quantized storage quantizes it now)."""

    def kept_per_head(self) -> torch.Tensor:
        """``[B, Hkv]`` real tokens stored per row and KV head."""
        raise NotImplementedError

    def stored_slots(self) -> int:
        """Slots per (row, head) of the widest head: what ``stats()`` reports as stored."""
        raise NotImplementedError

    def held_tensors(self) -> list[torch.Tensor]:
        """Every tensor the layer holds (keys, values and bookkeeping): what its bytes are."""
        raise NotImplementedError

    def kv_tensors(self) -> list[torch.Tensor]:
        """The tensors that hold keys and values alone."""
        raise NotImplementedError
