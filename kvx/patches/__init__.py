"""Finding the attention modules of any decoder, and the architectures kvx refuses, as data.

kvx never re-implements a model's attention: the model computes q, k, v, its norms and RoPE, then
calls the cache and the attention function registered with transformers. So any decoder whose
attention modules (a ``layer_idx`` and a ``forward`` that looks up transformers' attention
registry) store their keys in the cache can be patched, and nothing is listed per architecture.
What cannot is refused, with its reason, by :data:`REFUSED_MODEL_TYPES` and by the features
:func:`find_attention` checks; ``kvx models`` prints both, and the coverage test
(``tests/patches/test_coverage.py``) checks every causal-LM type of the installed transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvx.compat import cache_argument_name, calls_attention_interface, decoder_config, is_pretrained_model

REFUSED_MODEL_TYPES: dict[str, str] = {
    "minimax": "MiniMax keeps its lightning-attention state in a cache class of its own, which rejects any other cache",
    "hrm_text": "one attention module serves several layers (layer_idx is not the cache index)",
    "zamba": "one shared attention block serves several layers (layer_idx is not the cache index)",
    "zamba2": "one shared attention block serves several layers (layer_idx is not the cache index)",
    "doge": "attention takes a per-head additive float mask (dynamic mask attention), which kvx does not rebuild",
}
"""Model types kvx refuses, and why (checked before any feature)."""

REFUSED_LAYER_TYPES: dict[str, str] = {
    "indexed_attention": "DeepSeek-style sparse attention picks keys with an indexer whose own cache kvx would not "
                         "evict in step",
    "compressed_sparse_attention": "the model compresses its KV itself (DeepSeek-V4 compressed attention)",
    "heavily_compressed_attention": "the model compresses its KV itself (DeepSeek-V4 compressed attention)",
}
"""Layer types (config ``layer_types``) that make a model refused, and why."""


@dataclass(frozen=True)
class Attention:
    """What kvx found in one model: its attention modules in layer order, and the module whose
    forward receives the cache (where the patch's forward hooks go)."""

    model_type: str
    modules: list[torch.nn.Module]
    cache_owner: torch.nn.Module


def find_attention(model: torch.nn.Module) -> Attention:
    """The attention modules of ``model`` and the module that receives its cache, or a
    ``ValueError`` that names why this model cannot be patched."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if config is None:
        raise ValueError(f"kvx patches transformers models; {type(model).__name__} has no config")
    _check_refused(model_type, config)
    modules = _attention_modules(model, model_type)
    return Attention(model_type, modules, _cache_owner(model, modules, model_type))


def _check_refused(model_type: str, config) -> None:
    if model_type in REFUSED_MODEL_TYPES:
        raise ValueError(f"kvx does not support model_type {model_type!r}: {REFUSED_MODEL_TYPES[model_type]}")
    layer_types = getattr(decoder_config(config), "layer_types", None) or []
    for layer_type in dict.fromkeys(layer_types):
        if layer_type in REFUSED_LAYER_TYPES:
            raise ValueError(
                f"kvx does not support model_type {model_type!r}: it has {layer_type!r} layers, and "
                f"{REFUSED_LAYER_TYPES[layer_type]}"
            )


def _attention_modules(model: torch.nn.Module, model_type: str) -> list[torch.nn.Module]:
    """Self-attention modules that go through transformers' attention registry, one per layer."""
    by_layer: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        if not calls_attention_interface(type(module)) or _is_cross_attention(module):
            continue
        layer_idx = getattr(module, "layer_idx", None)
        if not isinstance(layer_idx, int) or isinstance(layer_idx, bool):
            raise ValueError(
                f"kvx does not support model_type {model_type!r}: attention module {type(module).__name__} has "
                f"layer_idx={layer_idx!r}, so its cache layer is not known when it is built"
            )
        by_layer.setdefault(layer_idx, []).append(module)
    if not by_layer:
        raise ValueError(
            f"kvx does not support model_type {model_type!r} ({type(model).__name__}): no attention module goes "
            "through transformers' attention interface (legacy attention code, or no attention at all)"
        )
    shared = sorted(idx for idx, found in by_layer.items() if len(found) > 1)
    if shared:
        raise ValueError(
            f"kvx does not support model_type {model_type!r}: several attention modules share layer_idx {shared}"
        )
    return [by_layer[idx][0] for idx in sorted(by_layer)]


def _is_cross_attention(module: torch.nn.Module) -> bool:
    """Encoder-decoder attention (bart-family decoders): it has a layer_idx too, but attends over
    the encoder's states, which kvx does not compress."""
    return bool(getattr(module, "is_cross_attention", False)) or (
        getattr(module, "is_causal", True) is False and getattr(module, "is_decoder", False)
    )


def _cache_owner(model: torch.nn.Module, modules: list[torch.nn.Module], model_type: str) -> torch.nn.Module:
    """The deepest module that holds every attention module and whose forward takes a cache:
    ``model.model`` for most causal LMs, ``model.model.decoder`` for OPT and the bart family
    (whose causal LM calls the decoder directly, so a hook on the base model would never run)."""
    owner = None
    wanted = {id(m) for m in modules}
    for module in model.modules():
        if not is_pretrained_model(module) or cache_argument_name(module.forward) is None:
            continue  # a decoder layer takes a cache too, but the model builds it before calling the layer
        if wanted <= {id(m) for m in module.modules()}:
            owner = module  # model.modules() goes parents first: the last match is the deepest
    if owner is None:
        raise ValueError(
            f"kvx does not support model_type {model_type!r}: no module of {type(model).__name__} takes a cache "
            "argument in its forward"
        )
    return owner
