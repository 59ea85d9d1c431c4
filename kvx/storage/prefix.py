"""A storage kind in two parts: a *prefix* in the kind's own layout (packed per head, quantized...)
and a dense *tail* of the tokens appended since the prefix was last rebuilt (``keys/values [B,
Hkv, T, D]``, inherited from :class:`~kvx.storage.dense.DenseLayer`).

The read path is shared: one new query (decode) attends over the prefix in its own layout (the
subclass's kernels) and over the tail, merged by log-sum-exp; several new queries (chunked
prefill, extend) attend over a transient dense view of both, which a selection policy then scores
on. A subclass gives the prefix's layout: :meth:`dense_view`, :meth:`dense_state`,
:meth:`prefix_decode_parts`, :meth:`store_selection` and :meth:`store_state`.
"""

from __future__ import annotations

from typing import Any

import torch

from kvx.kernels import reference
from kvx.storage.base import ScoringInputs, Storage, TokenReader
from kvx.storage.dense import DenseLayer, scoring_masks

View = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # keys, values [B, Hkv, P + T, D], valid [B, Hkv, P + T]


class PrefixTailLayer(DenseLayer):
    """Base of storage kinds with a prefix in their own layout and a dense tail (module docstring)."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._step_view: View | None = None  # this call's dense view

    # --- what a subclass gives --------------------------------------------------------------

    @property
    def has_prefix(self) -> bool:
        raise NotImplementedError

    def dense_view(self) -> View:
        """Everything stored, prefix then tail, as dense ``(keys, values, valid)`` (transient)."""
        raise NotImplementedError

    def dense_state(self) -> dict[str, torch.Tensor]:
        """The per-token statistics aligned with :meth:`dense_view`: name -> ``[B, Hkv, P + T]``."""
        raise NotImplementedError

    def prefix_decode_parts(self, query: torch.Tensor, scaling: float,
                            softcap: float | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Attention of one new query per head ``[B, H, 1, D]`` over the prefix, as ``(out, lse)``
        parts for :func:`kvx.kernels.reference.merge_attention`."""
        raise NotImplementedError

    def store_selection(self, keep: torch.Tensor, state: dict[str, torch.Tensor], view: View) -> None:
        """Keep the tokens marked in ``keep [B, Hkv, P + T]`` (a mask over ``view``, the current
        :meth:`dense_view`) with their statistics ``state``; free the rest."""
        raise NotImplementedError

    def store_state(self, dense: dict[str, torch.Tensor]) -> None:
        """Write statistics given over :meth:`dense_view` back into the prefix and the tail."""
        raise NotImplementedError

    # --- the read path (kvx.storage.base.Storage) ---------------------------------------------

    def attend(self, query, key, value, mask, scaling: float, softcap: float | None, sinks=None) -> torch.Tensor:
        if not self.has_prefix:
            return super().attend(query, key, value, mask, scaling, softcap, sinks)
        if query.shape[-2] == 1:  # decode: the prefix in its own layout, merged with the tail
            tail = reference.attention_with_lse(query, key, value, mask, scaling, softcap)
            parts = [*self.prefix_decode_parts(query, scaling, softcap), tail]
            if sinks is not None:
                parts.append(reference.sink_part(sinks, tail[0]))
            return reference.merge_attention(parts).to(query.dtype)
        # several queries: one pass over the dense view, which the policy then scores on
        self._step_view = self.dense_view()
        return attend_over_view(query, self._step_view, mask, scaling, softcap, sinks)

    def causal_view(self, mask: torch.Tensor | None):
        if not self.has_prefix:
            return super().causal_view(mask)
        # the mask covers the last tokens of the tail; every real token before them is visible (see view_mask)
        if not self.mask_is_causal(mask):
            return None
        self._step_view = self.dense_view()  # what the selection then scores on
        return self._step_view

    def decode_reader(self, mask: torch.Tensor | None) -> TokenReader | None:
        """The tail's own tensors while there is no prefix; then the transient dense view (a subclass
        reads its prefix in its layout instead)."""
        if not self.has_prefix:
            return super().decode_reader(mask)
        return Storage.decode_reader(self, mask)

    def scoring_inputs(self, query: torch.Tensor, mask: torch.Tensor | None) -> ScoringInputs:
        if self._step_view is None:
            self._step_view = self.dense_view()
        keys, values, valid = self._step_view
        return ScoringInputs(keys, values, valid, self.dense_state(), *scoring_masks(query, mask, valid))

    def apply_selection(self, keep: torch.Tensor | None, inputs: ScoringInputs) -> None:
        # the statistics were unpacked for the view: store them back
        if keep is not None:
            self.store_selection(keep, inputs.state, self._step_view)
        else:
            self.store_state(inputs.state)

    def end_step(self) -> None:
        self._step_view = None


def attend_over_view(query, view: View, tail_mask, scaling: float, softcap: float | None,
                     sinks: torch.Tensor | None = None):
    """Several new queries ``[B, H, q, D]`` over a layer's dense view ``(keys, values [B, Hkv, P + T,
    D], valid [B, Hkv, P + T])``, the new tokens last: every real token before them is visible to
    each, the new ones causal (or under ``tail_mask``'s columns over them, ``[B|1, 1|H, q, T]``:
    padding among them). Through :func:`kvx.kernels.reference.prefix_then_new_attention`, so no
    ``q x (P + T)`` mask or score matrix is built."""
    keys, values, valid = view
    q_len = query.shape[-2]
    new_mask = None if tail_mask is None else tail_mask[..., -q_len:]
    return reference.prefix_then_new_attention(query, keys, values, valid[..., :-q_len], new_mask, scaling, softcap,
                                               sinks)
