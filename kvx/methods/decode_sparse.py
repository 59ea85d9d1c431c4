"""Decode-sparse methods: at each decode step (one new query per row), read only chosen stored
tokens (``quest``: pages by an upper bound of their keys' logits; ``tidal``: the tokens a few
full-attention layers found most attended). Prompts and extensions (several new queries) attend
densely; what is stored never changes (a speed method: the full cache stays in memory).

What is read goes through the storage. ``quest`` asks :meth:`kvx.storage.base.Storage.decode_reader`
for a :class:`~kvx.storage.base.TokenReader`: dense storage gives its own tensors, quantized storage
its segments (only the chosen slots dequantized), ragged storage its packed prefix and tail (only the
chosen slots read); a kind without a reader of its own (ragged quantized segments) gives the
transient dense view, which is correct but reads every token to build, so no faster than dense
there. ``tidal`` reads through the same reader: its selection layers read every key (they attend
densely), the layers after them only the chosen slots. Each decode step counts, per layer, the
real keys read of those stored (``cache.stats()``: ``decode_keys_read`` / ``decode_keys_total``,
dense steps counted as all read), so no run claims a sparsity it did not compute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvx.kernels.pages import REDUCES
from kvx.methods.base import Method
from kvx.policy import MethodPolicy, check_choice, check_number, check_positive_int, option


@dataclass
class DecodeSparseMethod(MethodPolicy, Method):
    """Base of the decode-sparse methods (module docstring): a token ``budget`` or a ``density`` per
    (row, KV head) and how a KV head's query heads combine (``reduce``)."""

    summary: ClassVar[str] = "decode-sparse attention"
    serves: ClassVar[str] = "decode"

    budget: int = option(1024, "tokens each (row, KV head) reads at a decode step (> 0)")
    density: float | None = option(None, "instead of budget: the share of a (row, KV head)'s stored tokens it reads, "
                                         "in (0, 1]")
    reduce: str = option("max", "how the query heads of a KV head (GQA) combine their scores: max or sum")

    def validate(self) -> None:
        super().validate()
        check_positive_int(self.name, "budget", self.budget)
        if self.density is not None:
            check_number(self.name, "density", self.density, low=0, high=1, low_open=True)
        check_choice(self.name, "reduce", self.reduce, REDUCES)

    def make_method(self) -> DecodeSparseMethod:
        return self

    def for_layer(self, cache: Any, layer_idx: int) -> Method:
        return _OnLayer(self, cache, layer_idx)

    def attend(self, storage, query, key, value, mask, scaling, softcap, sinks):
        raise RuntimeError(f"{self.name} attends through for_layer(cache, layer_idx) (kvx's attention function does)")

    def attend_layer(self, cache: Any, layer_idx: int, storage, query, key, value, mask, scaling, softcap, sinks):
        raise NotImplementedError

    def read_count(self, real: torch.Tensor, unit: int = 1) -> torch.Tensor:
        """``[B, Hkv]`` units (tokens, or pages of ``unit`` tokens) to read of ``real [B, Hkv]`` real tokens."""
        have = -(-real // unit)
        if self.density is not None:
            want = torch.ceil(self.density * have.double()).long()
        else:
            want = torch.full_like(have, math.ceil(self.budget / unit))
        return torch.minimum(want, have)


def dense_step(storage, query, key, value, mask, scaling, softcap, sinks, real: torch.Tensor | None = None):
    """Dense attention through the storage, counted as every real key read at decode."""
    if query.shape[-2] == 1:
        total = int(real.sum()) if real is not None else int(storage.kept_per_head().sum())
        groups = query.shape[1] // key.shape[1]
        storage.count_decode_keys(total * groups, total * groups)
    return storage.attend(query, key, value, mask, scaling, softcap, sinks)


def real_tokens(reader, key: torch.Tensor) -> torch.Tensor:
    """``[B, Hkv]`` real tokens a :class:`~kvx.storage.base.TokenReader` holds (``key [B, Hkv, 1, D]``:
    the step's new key, for the shape when every slot is real)."""
    if reader.valid is None:
        return torch.full(key.shape[:2], reader.stored, dtype=torch.long, device=key.device)
    return reader.valid.sum(-1)


class _OnLayer(Method):
    """A decode-sparse method bound to one layer of one forward's cache."""

    name: ClassVar[str] = "decode_sparse_layer"
    summary: ClassVar[str] = "a decode-sparse method on one layer"

    def __init__(self, method: DecodeSparseMethod, cache: Any, layer_idx: int):
        self.method, self.cache, self.layer_idx = method, cache, layer_idx

    def attend(self, storage, query, key, value, mask, scaling, softcap, sinks):
        return self.method.attend_layer(self.cache, self.layer_idx, storage, query, key, value, mask, scaling,
                                        softcap, sinks)
