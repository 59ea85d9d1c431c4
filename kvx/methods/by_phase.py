"""A prefill method and a decode method joined: calls with several new queries per row (a prompt, a
chunk of a chunked prefill, an extension) go to the prefill method, one-query decode steps to the
decode method (``kvx.compose("vertical_slash", "quest")``: block-sparse prefill, then page-sparse
decode).

Each method attends densely in the phase it does not serve (:attr:`kvx.methods.base.Method.serves`),
so the join computes exactly what each computes alone in its own phase, and ``cache.stats()``
reports both counts: ``blocks_computed`` / ``blocks_causal`` from the prefill method,
``decode_keys_read`` / ``decode_keys_total`` from the decode method.
"""

from __future__ import annotations

from typing import Any, ClassVar

from kvx.methods.base import Method


class ByPhase(Method):
    """``prefill`` serves calls with several new queries per row, ``decode`` one-query steps."""

    name: ClassVar[str] = "by_phase"
    summary: ClassVar[str] = "a prefill method and a decode method, each on its own phase (kvx.compose)"

    def __init__(self, prefill: Method, decode: Method):
        for method, phase in ((prefill, "prefill"), (decode, "decode")):
            if method.serves not in (phase, "all"):
                raise ValueError(f"ByPhase: {method.name} serves {method.serves}, so it cannot serve the {phase} phase")
        self.prefill, self.decode = prefill, decode

    def for_layer(self, cache: Any, layer_idx: int) -> Method:
        return ByPhase(self.prefill.for_layer(cache, layer_idx), self.decode.for_layer(cache, layer_idx))

    def attend(self, storage, query, key, value, mask, scaling, softcap, sinks):
        """``query [B, H, q, D]``: the decode method where ``q == 1``, else the prefill method."""
        method = self.decode if query.shape[-2] == 1 else self.prefill
        return method.attend(storage, query, key, value, mask, scaling, softcap, sinks)

    def __repr__(self) -> str:
        return f"ByPhase(prefill={self.prefill!r}, decode={self.decode!r})"
