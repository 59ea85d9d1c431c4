"""Dense storage: every KV head of a row keeps the same slots, ``[B, Hkv, S, D]``.

Evicted tokens are really gone (the tensors are re-gathered and the old ones freed); rows or heads
that keep fewer tokens than the most get padding slots on the left, marked in ``valid``.
"""

from __future__ import annotations

from typing import Any

import torch

from kvx.compat import mask_query_length
from kvx.kernels import reference
from kvx.kernels.column_sums import attention_with_column_sums
from kvx.policy import mask_to_indices
from kvx.storage.base import ScoringInputs, Storage, TokenReader, ViewReader


class DenseLayer(Storage):
    """KV storage of one full-attention layer, compressed by a policy.

    Attributes:
        keys, values: ``[B, Hkv, S, D]`` stored tokens in temporal order.
        valid: ``[B, Hkv, S]`` bool or None (None = every slot holds a real token).
        state: per-token policy statistics, name -> ``[B, Hkv, S]``, kept aligned with storage.
        seen: tokens this layer has been given in total (the logical sequence length).
        past_stored, past_seen: stored / seen counts before the latest ``update``.
    """

    kind = "compressed"
    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, **kwargs: Any):
        super().__init__()
        self.valid: torch.Tensor | None = None
        self.state: dict[str, torch.Tensor] = {}
        self.real_seen: torch.Tensor | None = None  # [B] real tokens seen per row (CPU)
        self.seen = 0
        self.past_stored = 0
        self.past_seen = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states[..., :0, :]
        self.values = value_states[..., :0, :]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Append ``[B, Hkv, q, D]`` new keys/values; return everything stored (new tokens last)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.past_stored, self.past_seen = self.num_stored, self.seen
        self.seen += key_states.shape[-2]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        if self.valid is not None:
            new_valid = self.valid.new_ones(*self.valid.shape[:2], key_states.shape[-2])
            self.valid = torch.cat([self.valid, new_valid], dim=-1)
        for name, stat in self.state.items():
            self.state[name] = torch.cat([stat, stat.new_zeros(*stat.shape[:2], key_states.shape[-2])], dim=-1)
        return self.keys, self.values

    @property
    def num_stored(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    @property
    def has_evicted(self) -> bool:
        """Whether any token seen before the latest update is no longer stored."""
        return self.past_stored != self.past_seen

    def keep_mask(self, keep: torch.Tensor) -> None:
        """Keep only the tokens marked in ``keep [B, Hkv, S]``; free the rest. Rows or heads that
        keep fewer than the most get padding slots on the left, marked invalid."""
        indices, slot_valid = mask_to_indices(keep)
        # keys and values may differ in head dim (MLA: rope + nope key dims vs the value dim)
        self.keys = reference.take_tokens(self.keys, indices)
        self.values = reference.take_tokens(self.values, indices)
        valid = slot_valid if self.valid is None else self.valid.gather(2, indices) & slot_valid
        self.set_valid(valid)
        for name, stat in self.state.items():
            self.state[name] = stat.gather(2, indices)
        self.layout_changed()

    def count_real(self, new_valid: torch.Tensor | None, batch: int, new_tokens: int) -> None:
        """Add the real (non-padding) tokens of the latest update, ``new_valid [B, q]``, per row."""
        added = torch.full((batch,), new_tokens, dtype=torch.long) if new_valid is None else new_valid.sum(-1).cpu()
        self.real_seen = added if self.real_seen is None else self.real_seen + added

    def set_valid(self, valid: torch.Tensor | None) -> None:
        """Record which stored slots hold real tokens (None or all True: every slot)."""
        # a copy: `valid` is often a view of a much larger mask that must not stay alive
        self.valid = None if valid is None or bool(valid.all()) else valid.clone(memory_format=torch.contiguous_format)

    def valid_mask(self) -> torch.Tensor:
        """``[B, Hkv, S]`` bool over the dense slots: ``valid``, or all True when it is None."""
        if self.valid is not None:
            return self.valid
        return torch.ones(self.keys.shape[:3], dtype=torch.bool, device=self.keys.device)

    def kept_per_head(self) -> torch.Tensor:
        """``[B, Hkv]`` real tokens stored per row and KV head."""
        if self.keys is None:
            return torch.zeros(0, 0, dtype=torch.long)
        if self.valid is None:
            return torch.full(self.keys.shape[:2], self.num_stored, dtype=torch.long)
        return self.valid.sum(-1).cpu()

    # --- the read path (kvx.storage.base.Storage) ---------------------------------------------

    def check_attended(self, module: torch.nn.Module, layer_idx: int, key: torch.Tensor) -> None:
        """The keys a module attends over must be what this layer stores: a model that writes to
        another layer, or caches something else (a latent) and expands it, would be compressed wrongly."""
        if key.shape[2] != self.keys.shape[2] or key.shape[1] % self.keys.shape[1]:  # (GQA expanded after update: ok)
            raise ValueError(
                f"kvx does not support this model: {type(module).__name__} (layer {layer_idx}) attends over keys of "
                f"shape {tuple(key.shape)}, but its cache layer holds {tuple(self.keys.shape)} (the module calls its "
                "attention function more than once per cache update, or attends over keys it did not store there)"
            )

    def begin_step(self, given_mask: torch.Tensor | None, q_len: int, num_heads: int) -> torch.Tensor | None:
        mask, valid = _mask_over_storage(self, given_mask, q_len, num_heads)
        self.set_valid(valid)
        self.count_real(None if valid is None else valid[:, 0, -q_len:], self.keys.shape[0], q_len)
        return mask

    def attend(self, query, key, value, mask, scaling: float, softcap: float | None, sinks=None) -> torch.Tensor:
        q_len = query.shape[-2]
        if 1 < q_len < key.shape[-2]:  # new tokens after stored ones: the mask covers the new tokens only
            prefix_valid = None if self.valid is None else self.valid[..., :-q_len]
            return reference.prefix_then_new_attention(query, key, value, prefix_valid, mask, scaling, softcap, sinks)
        return reference.attention(query, key, value, mask, scaling, softcap, sinks)

    def attend_with_column_sums(self, query, key, value, mask, scaling: float, softcap: float | None):
        view = self.causal_view(mask)  # the scoring view's tokens, when the mask is plain causal over them
        joint = None if view is None else attention_with_column_sums(query, *view, scaling, softcap)
        if joint is None:
            return self.attend(query, key, value, mask, scaling, softcap), None
        return joint

    def mask_is_causal(self, mask: torch.Tensor | None) -> bool:
        """Whether ``mask`` (from :meth:`begin_step`: the new tokens' rows over the last slots) is plain
        causal over the valid slots, as it is with no mask at all."""
        return mask is None or reference.is_causal_over(mask, self.valid_mask()[..., -mask.shape[-1]:])

    def causal_view(self, mask: torch.Tensor | None):
        if not self.mask_is_causal(mask):
            return None
        return self.keys, self.values, self.valid

    def decode_reader(self, mask: torch.Tensor | None) -> TokenReader | None:
        """The layer's own keys and values: state built on them persists between steps."""
        view = DenseLayer.causal_view(self, mask)
        return None if view is None else ViewReader(*view, persistent=True)

    def scoring_inputs(self, query: torch.Tensor, mask: torch.Tensor | None) -> ScoringInputs:
        valid = self.valid_mask()
        return ScoringInputs(self.keys, self.values, valid, self.state, *scoring_masks(query, mask, valid))

    def apply_selection(self, keep: torch.Tensor | None, inputs: ScoringInputs) -> None:
        if keep is not None:
            self.keep_mask(keep)

    def stored_slots(self) -> int:
        return self.num_stored

    def held_tensors(self) -> list[torch.Tensor]:
        tensors = [t for t in (self.keys, self.values, self.valid) if t is not None]
        return tensors + list(self.state.values()) + self.method_tensors()

    def kv_tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.keys, self.values) if t is not None]


    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        # transformers' mask covers the new tokens alone (their causal part and padding), so it never
        # builds `q x stored`: which stored tokens are real is this layer's `valid`
        return mask_query_length(query_length), self.seen

    def get_max_length(self) -> int:
        return -1

    get_max_cache_shape = get_max_length  # its name before transformers 5.10

    def reset(self) -> None:
        self.keys = self.values = self.valid = self.real_seen = self.attention_blocks = self.decode_keys = None
        self.state = {}
        self.layout_changed()
        self.is_initialized = False
        self.seen = self.past_stored = self.past_seen = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "kvx compressed layers cannot be cropped (tokens may already be evicted); "
            "assisted/speculative decoding is not supported on a kvx-patched model yet"
        )

    def _select_batch(self, fn) -> None:
        if self.keys is not None:
            self.keys, self.values = fn(self.keys), fn(self.values)
            if self.valid is not None:
                self.valid = fn(self.valid)
            self.state = {name: fn(stat) for name, stat in self.state.items()}
            if self.real_seen is not None:
                self.real_seen = fn(self.real_seen.to(self.keys.device)).cpu()
            self.layout_changed()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_batch(lambda t: t[indices, ...])


def _mask_over_storage(
    layer: DenseLayer, given: torch.Tensor | None, q_len: int, num_heads: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Mask for the new queries over the stored keys, and which stored slots are real tokens.

    Args:
        layer: the layer after ``update`` (new tokens appended).
        given: the mask transformers built over the new tokens (``get_mask_sizes``), ``[B, 1, q, q]``
            bool or None.
    Returns:
        ``(mask, valid [B, Hkv, S] or None)``. The mask: None = plain causal attention (every valid
        stored token visible); ``[B|1, 1|H, q, S]`` for a prompt attending to itself or one new token
        (decode); for several new tokens after stored ones, ``[B|1, 1, q, q]`` over the new tokens
        only, every valid stored token before them being visible to each (no ``q x S`` mask).
    """
    batch, kv_heads, num_stored = layer.keys.shape[:3]
    if layer.past_seen == 0 or (not layer.has_evicted and layer.valid is None and given is None):
        # the prompt's first tokens, or nothing evicted and no padding: transformers' mask is right as is
        # (at prefill this is where padding is first recorded, from the mask's last query row)
        valid = None if given is None else given[:, None, 0, -1, :].expand(batch, kv_heads, num_stored)
        return given, valid

    past = layer.past_stored
    past_valid = layer.valid[..., :past] if layer.valid is not None else None
    if past_valid is None and given is None:  # no padding anywhere: causal, bottom-right (no q x S mask)
        return None, None
    if given is None:
        new_cols = reference.causal_mask(q_len, q_len, layer.keys.device)  # [1, 1, q, q]
        new_valid = torch.ones(batch, q_len, dtype=torch.bool, device=layer.keys.device)
    else:
        new_cols = given[..., -q_len:]  # causal + padding among the new tokens
        new_valid = given[:, 0, -1, -q_len:]

    if q_len > 1:  # chunked prefill / extend: the new tokens' own mask; `valid` says which stored ones are real
        valid = new_valid[:, None, :].expand(batch, kv_heads, q_len)
        valid = torch.cat([past_valid if past_valid is not None else valid.new_ones(batch, kv_heads, past), valid], -1)
        return None if given is None else new_cols, valid
    if past_valid is None:  # every stored token is real: one mask serves all heads
        mask = torch.cat([new_cols.new_ones(new_cols.shape[0], 1, q_len, past), new_cols], dim=-1)
        valid = torch.cat([new_valid.new_ones(batch, past), new_valid], dim=-1)
        return mask, valid[:, None, :].expand(batch, kv_heads, num_stored)

    valid = torch.cat([past_valid, new_valid[:, None, :].expand(batch, kv_heads, q_len)], dim=-1)
    if _heads_share_padding(past_valid):  # one mask serves all heads: [B, 1, q, S], not [B, H, q, S]
        past_cols = past_valid[:, :1, None, :].expand(batch, 1, q_len, past)
        return torch.cat([past_cols, new_cols.expand(batch, 1, q_len, q_len)], dim=-1), valid
    groups = num_heads // kv_heads
    past_cols = reference.expand_kv_heads(past_valid, groups)[:, :, None, :].expand(batch, num_heads, q_len, past)
    mask = torch.cat([past_cols, new_cols.expand(batch, num_heads, q_len, q_len)], dim=-1)
    return mask, valid


def scoring_masks(query: torch.Tensor, mask: torch.Tensor | None, valid: torch.Tensor):
    """``(attention_mask, mask_rows)`` of :class:`~kvx.storage.base.ScoringInputs` for ``query [B, H,
    q, D]`` over keys whose padding is ``valid [B, Hkv, S]``, ``mask`` being what ``begin_step``
    returned. A mask over the last keys only (the new tokens, or a prefix + tail kind's tail), or no
    mask where padding was stored, becomes ``mask_rows``: every real key before the ones it covers
    visible, the rows a policy reads built on demand (the mask over every key would be ``q x S``)."""
    q_len, num_keys = query.shape[-2], valid.shape[-1]
    if mask is not None and mask.shape[-1] == num_keys:
        return mask, None
    if mask is None and bool(valid.all()):
        return None, None
    covered = q_len if mask is None else mask.shape[-1]
    return None, lambda last: view_mask(valid, covered, mask, query.shape, q_len - last, q_len)


def view_mask(valid, tail_len: int, tail_mask, query_shape, start: int, stop: int) -> torch.Tensor:
    """Mask ``[B, H, stop - start, P + T]`` of new queries ``start:stop`` over a layer's dense view:
    every real prefix token of the query's KV head, then the tail under ``tail_mask`` (``[B|1,
    1|H, q, T]``, or None for causal)."""
    batch, heads, q_len = query_shape[:3]
    kv_heads, num_keys = valid.shape[1:]
    rows = stop - start
    prefix_cols = reference.expand_kv_heads(valid[..., : num_keys - tail_len], heads // kv_heads)[:, :, None, :]
    prefix_cols = prefix_cols.expand(batch, heads, rows, num_keys - tail_len)
    if tail_mask is None:  # causal, bottom-right: the rows start:stop alone
        tail_cols = reference.causal_mask(q_len, tail_len, valid.device, rows=(start, stop))
    else:
        tail_cols = tail_mask[..., start:stop, :]
    return torch.cat([prefix_cols, tail_cols.expand(batch, heads, rows, -1)], dim=-1)


def _heads_share_padding(valid: torch.Tensor) -> bool:
    """Whether every KV head of a row holds its padding in the same slots: the usual case, since
    heads keep equal counts, right-aligned (``valid [B, Hkv, S]``)."""
    return bool((valid == valid[:, :1]).all())
