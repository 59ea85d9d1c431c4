"""TidalDecode: at each decode step, a few *selection* layers attend densely and pick the tokens the
new query attends to most; every layer after one reads only those tokens (the same positions), up
to the next selection layer.

Paper: Yang et al., "TidalDecode: Fast and Accurate LLM Decoding with Position Persistent Sparse
Attention" (2024). Its defaults: the first two layers dense, token selection at the third
(``select_layer=2``) and re-selection at a middle layer (layer 13 of Llama-3-8B's 32: here
``reselect_layer`` defaults to ``13 * layers // 32`` when that is past ``select_layer``). A
selection is the top ``budget`` (or ``density``) tokens per (row, KV head) by the selection layer's
attention probabilities, its query heads combined by ``reduce`` (the paper selects per query head
on a model whose KV heads it expands; kvx never expands them). The selection lives on the cache
for the one forward (``cache.method_state``), keyed by the step, never in a global. A decode
(speed) method: the prompt attends densely and the full cache stays stored (the paper's KV cache
correction is not built).

Positions persist across layers only where every layer stores the same tokens: composing with a
selection (eviction) is refused, and a layer whose storage holds other slots than the selection
layer's raises.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvx.kernels import reference
from kvx.kernels.pages import attend_tokens, top_pages
from kvx.methods.base import register_method
from kvx.methods.decode_sparse import DecodeSparseMethod, dense_step, real_tokens
from kvx.policy import check_positive_int, option, register_policy

PAPER_RESELECT = (13, 32)
"""TidalDecode's re-selection layer on Llama-3-8B: layer 13 of 32."""


@dataclass
class Selection:
    """The tokens a selection layer chose for the layers after it, in one decode step."""

    seen: int  # tokens the selection layer had seen (the step's key)
    stored: int  # its stored slots
    layer: int
    slots: torch.Tensor  # [B, Hkv, K] stored slots
    chosen: torch.Tensor  # [B, Hkv, K] bool
    everything: bool  # every real token chosen: the layers after it attend densely


@register_method
@register_policy
@dataclass
class Tidal(DecodeSparseMethod):
    """Decode: selection layers attend densely and choose the top tokens the next layers read
    (TidalDecode, Yang et al., 2024)."""

    name: ClassVar[str] = "tidal"
    summary: ClassVar[str] = ("decode: a few full-attention layers choose the top tokens the layers after them read "
                              "(TidalDecode, Yang et al., 2024); the full cache stays stored")

    budget: int = option(1024, "tokens each (row, KV head) of a sparse layer reads at a decode step (> 0)")
    select_layer: int = option(2, "layers before it attend densely; it attends densely and selects the tokens "
                                  "(TidalDecode: 2)")
    reselect_layer: int | None = option(None, "a later layer that selects again (none: 13/32 of the depth when past "
                                              "select_layer, TidalDecode's choice on Llama-3-8B; -1: never)")

    def validate(self) -> None:
        super().validate()
        check_positive_int(self.name, "select_layer", self.select_layer, minimum=0)
        if self.reselect_layer is not None:
            check_positive_int(self.name, "reselect_layer", self.reselect_layer, minimum=-1)
            if 0 <= self.reselect_layer <= self.select_layer:
                raise ValueError(f"{self.name}: reselect_layer ({self.reselect_layer}) must come after select_layer "
                                 f"({self.select_layer}), or be -1 (never) or none (automatic)")

    @classmethod
    def exact(cls) -> Tidal:
        """Selection at the first layer, every token selected: dense attention."""
        return cls(density=1.0, select_layer=0, reselect_layer=-1)

    def selection_layers(self, num_layers: int) -> tuple[int, ...]:
        """The layers that attend densely and select, on a model of ``num_layers`` layers."""
        reselect = self.reselect_layer
        if reselect is None:
            reselect = PAPER_RESELECT[0] * num_layers // PAPER_RESELECT[1]
            reselect = reselect if self.select_layer < reselect < num_layers else -1
        return (self.select_layer,) if reselect < 0 else (self.select_layer, reselect)

    def check_model(self, num_layers: int) -> None:
        for option_name in ("select_layer", "reselect_layer"):
            value = getattr(self, option_name)
            if value is not None and value >= num_layers:
                raise ValueError(
                    f"{self.name}: {option_name} ({value}) is not a layer of this model: it has {num_layers} layers "
                    f"(0-{num_layers - 1})"
                )

    def check_composition(self, selection: Any, storage: Any) -> None:
        """Refuse a selection: layers would keep different tokens, so positions chosen in one layer
        would name other tokens (or none) in the next."""
        if selection is not None:
            raise ValueError(
                f"kvx.compose: {self.name} cannot compose with {selection.name}: tidal reads, in every layer, the "
                "positions a selection layer chose, which needs every layer to store the same tokens, and a "
                f"selection evicts per layer; compose {self.name} with a storage policy alone (e.g. kivi, int8), "
                "or use quest with a selection"
            )

    def attend_layer(self, cache, layer_idx, storage, query, key, value, mask, scaling, softcap, sinks):
        args = (storage, query, key, value, mask, scaling, softcap, sinks)
        if query.shape[-2] != 1 or layer_idx < self.select_layer:  # the prompt; the dense first layers
            return dense_step(*args)
        reader = storage.decode_reader(mask)
        if reader is None:
            return dense_step(*args)
        real = real_tokens(reader, key)
        if layer_idx in self.selection_layers(len(cache.layers)):
            selection = self.select(storage, query, reader.keys(), reader.valid, real, layer_idx, scaling, softcap)
            cache.method_state[self.name] = selection
            return dense_step(*args, real=real)
        chosen = cache.method_state.get(self.name)
        if chosen is None or chosen.seen != storage.seen:  # no selection this step (a selection layer kvx
            return dense_step(*args, real=real)            # does not manage, e.g. a sliding window): dense
        if chosen.stored != reader.stored or chosen.slots.shape[:2] != real.shape:
            raise ValueError(
                f"{self.name}: layer {layer_idx} stores {reader.stored} slots but selection layer {chosen.layer} "
                f"stored {chosen.stored}: tidal needs every layer to store the same tokens (no eviction)"
            )
        if chosen.everything:
            return dense_step(*args, real=real)
        out = attend_tokens(query, reader, chosen.slots, chosen.chosen, scaling, softcap, sinks)
        groups = query.shape[1] // real.shape[1]
        storage.count_decode_keys(int(chosen.chosen.sum()) * groups, int(real.sum()) * groups)
        return out.to(query.dtype)

    def select(self, storage, query, keys, valid, real, layer_idx: int, scaling: float, softcap) -> Selection:
        """The top tokens per (row, KV head) by the new query's attention probabilities."""
        logits = reference.grouped_logits(query, keys, scaling, softcap)[..., 0, :]  # [B, Hkv, G, S]
        if valid is not None:
            logits = logits.masked_fill(~valid[:, :, None], -torch.inf)
        probs = torch.softmax(logits, dim=-1)
        scores = probs.amax(2) if self.reduce == "max" else probs.sum(2)  # [B, Hkv, S]
        if valid is not None:
            scores = scores.masked_fill(~valid, -1.0)
        count = self.read_count(real)
        everything = bool((count >= real).all())
        slots, chosen = top_pages(scores, count) if not everything else (scores[..., :0].long(), scores[..., :0] > 0)
        return Selection(storage.seen, keys.shape[2], layer_idx, slots, chosen, everything)
