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

from kvx.compat import (
    TRANSFORMERS_VERSION,
    cache_argument_name,
    calls_attention_interface,
    config_field,
    decoder_config,
    default_cache_layers,
    is_dense_layer,
    is_pretrained_model,
    is_sliding_layer,
)

REFUSED_MODEL_TYPES: dict[str, str] = {
    "minimax": "MiniMax keeps its lightning-attention state in a cache class of its own, which rejects any other cache",
    "hrm_text": "one attention module serves several layers (layer_idx is not the cache index)",
    "zamba": "one shared attention block serves several layers (layer_idx is not the cache index)",
    "zamba2": "one shared attention block serves several layers (layer_idx is not the cache index)",
    "doge": "attention takes a per-head additive float mask (dynamic mask attention), which kvx does not rebuild",
    "diffllama": "differential attention calls the attention function twice per layer on one cache update, and "
                 "kvx compresses the layer after the first call",
    "dory": "looped layers write to cache layer layer_idx + an offset given at call time (layer_idx is not the "
            "cache index)",
}
"""Model types kvx refuses, and why (checked before any feature)."""

NO_CHUNKED_PREFILL: dict[str, str] = {
    "musicgen_melody_decoder": "its own generate() builds no cache before the prefill, which transformers' chunked "
                               "prefill needs",
    "recurrent_gemma": "its forward returns no cache, which transformers' chunked prefill reads after each chunk",
}
"""Model types whose ``generate()`` cannot prefill in chunks (``kvx.patch``'s ``chunk_size``), and why."""

REFUSED_CONFIG_FIELDS: dict[str, str] = {
    "kv_lora_rank": "multi-head latent attention (MLA) caches one shared latent and one RoPE key per token, not "
                    "per-head keys and values; per-token eviction over the latent is not built yet",
}
"""Config fields (set, not None) that make a model refused, and why."""

_INDEXER = "DeepSeek-style sparse attention picks keys with an indexer whose own cache kvx would not evict in step"
_SELF_COMPRESSED = "the model compresses its KV itself (DeepSeek-V4 compressed attention)"
REFUSED_LAYER_TYPES: dict[str, str] = {
    "indexed_attention": _INDEXER,
    "deepseek_sparse_attention": _INDEXER,  # its name before 5.14
    "compressed_sparse_attention": _SELF_COMPRESSED,
    "heavily_compressed_attention": _SELF_COMPRESSED,
}
"""Layer types (config ``layer_types``) that make a model refused, and why."""


NOT_ATTENTION_LAYER_TYPES = ("linear_attention", "mamba", "conv", "hybrid", "hybrid_sliding")
"""Layer types that hold a recurrent or convolution state: transformers' own cache layers keep them."""


@dataclass(frozen=True)
class Attention:
    """What kvx found in one model: its attention modules in layer order, and the module whose
    forward receives the cache (where the patch's forward hooks go)."""

    model_type: str
    modules: list[torch.nn.Module]
    cache_owner: torch.nn.Module
    unmanaged: list[torch.nn.Module]  # bidirectional attention (vision / audio towers...): left to the model


def find_attention(model: torch.nn.Module) -> Attention:
    """The attention modules of ``model`` and the module that receives its cache, or a
    ``ValueError`` that names why this model cannot be patched."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if config is None:
        raise ValueError(f"kvx patches transformers models; {type(model).__name__} has no config")
    _check_refused(model_type, config)
    _check_compressible(model_type, config)
    modules, unindexed, bidirectional = _attention_modules(model, model_type)
    owner = _cache_owner(model, modules, model_type)
    # causal attention without a layer index: refused inside the module that owns the cache, left
    # alone outside it (a vision or audio tower is not cached)
    inside = {id(m) for m in owner.modules()}
    stray = [m for m in unindexed if id(m) in inside]
    if stray:
        raise ValueError(f"kvx does not support model_type {model_type!r}: {_no_layer_index(stray[0])}")
    unmanaged = bidirectional + [m for m in unindexed if id(m) not in inside]
    return Attention(model_type, modules, owner, unmanaged)


def _check_refused(model_type: str, config) -> None:
    if model_type in REFUSED_MODEL_TYPES:
        raise ValueError(f"kvx does not support model_type {model_type!r}: {REFUSED_MODEL_TYPES[model_type]}")
    text = decoder_config(config)
    for name, reason in REFUSED_CONFIG_FIELDS.items():
        if config_field(text, name) is not None:
            raise ValueError(f"kvx does not support model_type {model_type!r}: {reason}")
    layer_types = config_field(text, "layer_types") or []
    for layer_type in dict.fromkeys(layer_types):
        if layer_type in REFUSED_LAYER_TYPES:
            raise ValueError(
                f"kvx does not support model_type {model_type!r}: it has {layer_type!r} layers, and "
                f"{REFUSED_LAYER_TYPES[layer_type]}"
            )


def _check_compressible(model_type: str, config) -> None:
    """Refuse a model none of whose cache layers kvx compresses or the model bounds by a window:
    patching it would change nothing while claiming compression."""
    text = decoder_config(config)
    layers = default_cache_layers(text)
    for layer_type, layer in zip(config_field(text, "layer_types") or [], layers):
        if layer_type in NOT_ATTENTION_LAYER_TYPES and (is_dense_layer(layer) or is_sliding_layer(layer)):
            raise ValueError(
                f"kvx does not support model_type {model_type!r} on transformers {TRANSFORMERS_VERSION}: this release "
                f"has no cache layer for its {layer_type!r} layers (the model keeps them in a cache class of its own); "
                "a newer transformers does"
            )
    if not any(is_dense_layer(layer) or is_sliding_layer(layer) for layer in layers):
        kinds = ", ".join(dict.fromkeys(type(layer).__name__ for layer in layers))
        raise ValueError(
            f"kvx does not support model_type {model_type!r}: none of its cache layers ({kinds}) holds plain "
            "attention keys and values that kvx could compress (hybrid layers share theirs with a recurrent state)"
        )


def _attention_modules(model: torch.nn.Module, model_type: str) -> tuple[list, list, list]:
    """Modules that go through transformers' attention registry: causal self-attention with a layer
    index (one per layer), causal ones without an index, and bidirectional ones (vision and audio
    towers, cross-attention over an encoder), which are not cached token by token."""
    by_layer: dict[int, list[torch.nn.Module]] = {}
    unindexed, bidirectional = [], []
    for module in model.modules():
        if not calls_attention_interface(type(module)):
            continue
        layer_idx = getattr(module, "layer_idx", None)
        if not _is_causal_self_attention(module) or not hasattr(module, "layer_idx"):
            bidirectional.append(module)  # (without a layer_idx a module cannot address a cache layer either)
        elif not isinstance(layer_idx, int) or isinstance(layer_idx, bool):
            unindexed.append(module)
        else:
            by_layer.setdefault(layer_idx, []).append(module)
    if not by_layer:
        raise ValueError(f"kvx does not support model_type {model_type!r} ({type(model).__name__}): "
                         + _why_nothing_found(model, unindexed, bidirectional))
    shared = sorted(idx for idx, found in by_layer.items() if len(found) > 1)
    if shared:
        raise ValueError(
            f"kvx does not support model_type {model_type!r}: several attention modules share layer_idx {shared}"
        )
    return [by_layer[idx][0] for idx in sorted(by_layer)], unindexed, bidirectional


def _no_layer_index(module: torch.nn.Module) -> str:
    return (f"attention module {type(module).__name__} has layer_idx={module.layer_idx!r}, so its cache layer is "
            "not known when it is built")


def _why_nothing_found(model: torch.nn.Module, unindexed: list, bidirectional: list) -> str:
    if unindexed:
        return _no_layer_index(unindexed[0])
    if bidirectional:
        hint = "; BERT-style models generate causally with config.is_decoder=True" if getattr(
            model.config, "is_decoder", None) is False else ""
        return (f"the only attention modules that go through transformers' attention interface are bidirectional "
                f"({type(bidirectional[0]).__name__}.is_causal is False), and nothing of theirs is cached token by "
                f"token{hint}")
    return ("no attention module goes through transformers' attention interface (legacy attention code, or no "
            "attention at all)")


def _is_causal_self_attention(module: torch.nn.Module) -> bool:
    """Not cross-attention over an encoder's states, and not bidirectional (``is_causal`` False):
    decoders' self-attention modules say ``is_causal = True`` or nothing at all."""
    return not getattr(module, "is_cross_attention", False) and getattr(module, "is_causal", True) is not False


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
