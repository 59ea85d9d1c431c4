"""Every touch point between kvx and transformers internals, for every supported release.

Nothing else in kvx imports from ``transformers`` submodules or reads a field whose name moved
between releases: it imports from here. What differs, release by release (``MIN_VERSION`` up to
the newest tested, see ``docs/compat.md``):

- **5.24** renamed the cache argument of every model's ``forward`` (and of ``generate``) from
  ``past_key_values`` to ``cache``; the old name is still accepted with a warning, but ignored
  when both are given. Output fields moved the same way (``.cache``; ``.past_key_values`` is a
  deprecated alias that logs a warning). :func:`cache_argument_name` reads the name from the
  forward's signature, :func:`cache_of` reads the field an output really has, and
  :func:`cache_kwargs` builds the keyword for ``model(...)`` / ``generate(...)``.
- **5.24** passes ``kwargs=...`` to ``Cache.update`` and turned ``is_croppable`` into a
  property on some layers; kvx's layers accept any extra arguments and declare ``is_croppable``
  as a plain class attribute, which reads the same either way.
- **5.21** made ``generate()``'s chunked prefill (``prefill_chunk_size``, which ``kvx.patch`` sets)
  start from the tokens a given cache already holds; before, it fed the whole prompt again on top
  of them. :data:`CHUNKED_PREFILL_RESUMES_CACHE` says which; kvx's forward hook refuses the
  inconsistent call with a clear error instead of attending over every token twice.
- **5.19** made ``get_layer_types_and_kwargs`` return one kwargs dict per layer (before: one dict
  for all layers; before 5.14 the function did not exist). kvx never calls it: it asks
  transformers for the cache layers it would build itself (:func:`default_cache_layers`), which
  every release can do, and replaces the ones it compresses.
- **5.10** renamed the layers' ``get_max_cache_shape`` to ``get_max_length``: kvx's layers have both.
- **5.9** gave hybrid models' linear-attention / Mamba / convolution states cache layers of their
  own in transformers' cache; before, those models built cache classes of their own, and
  ``kvx.patches`` refuses them there.
- **5.4** passes a layer's ``get_mask_sizes`` the number of new tokens (before: their
  ``cache_position`` tensor): :func:`mask_query_length` reads either.
- Before **5.3** sliding-window layers and chunked prompts differ: not supported (:data:`MIN_VERSION`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from packaging.version import Version
from transformers import AttentionInterface, PretrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

MIN_VERSION = Version("5.3.0")
"""The oldest transformers release kvx supports (``pyproject.toml`` declares the same)."""

TRANSFORMERS_VERSION = Version(transformers.__version__)

CHUNKED_PREFILL_RESUMES_CACHE = TRANSFORMERS_VERSION >= Version("5.21.0")
"""Whether ``generate()`` with ``prefill_chunk_size`` continues a cache that already holds tokens."""

CACHE_ARGUMENT_NAMES = ("cache", "past_key_values")
"""Names a model's forward has taken its cache under: the current one first (5.24 onward)."""

__all__ = [
    "CACHE_ARGUMENT_NAMES",
    "CHUNKED_PREFILL_RESUMES_CACHE",
    "Cache",
    "CacheLayerMixin",
    "DynamicCache",
    "DynamicLayer",
    "DynamicSlidingWindowLayer",
    "MIN_VERSION",
    "PretrainedConfig",
    "Rope",
    "TRANSFORMERS_VERSION",
    "attention_function",
    "cache_argument_name",
    "cache_kwargs",
    "calls_attention_interface",
    "causal_lm_class",
    "causal_lm_model_types",
    "check_version",
    "config_field",
    "decoder_config",
    "default_cache_layers",
    "find_rope",
    "is_dense_layer",
    "is_pretrained_model",
    "is_sliding_layer",
    "mask_query_length",
    "cache_of",
    "register_attention",
    "transformers_log_level",
]


def check_version() -> None:
    """Raise an ``ImportError`` naming the installed and the supported releases when too old."""
    if TRANSFORMERS_VERSION < MIN_VERSION:
        raise ImportError(
            f"kvx needs transformers>={MIN_VERSION}, but {transformers.__version__} is installed: "
            f"pip install -U 'transformers>={MIN_VERSION}'"
        )


# --- the cache argument and output field -------------------------------------------------------


def cache_argument_name(forward: Callable) -> str | None:
    """The name under which ``forward`` takes its cache (``cache`` from 5.24, ``past_key_values``
    before), or None when it takes none."""
    params = inspect.signature(forward).parameters
    return next((name for name in CACHE_ARGUMENT_NAMES if name in params), None)


@functools.cache
def _renamed() -> bool:
    """Whether this release calls the cache ``cache`` (5.24 on), read from its output classes."""
    from transformers.modeling_outputs import BaseModelOutputWithPast

    return "cache" in BaseModelOutputWithPast.__dataclass_fields__


def cache_kwargs(cache: Cache | None) -> dict[str, Any]:
    """The keyword that hands ``cache`` to ``model(...)`` or ``model.generate(...)`` on this
    release, without a deprecation warning: ``{"cache": c}`` from 5.24, ``{"past_key_values": c}``
    before."""
    return {"cache" if _renamed() else "past_key_values": cache}


def cache_of(output: Any) -> Cache | None:
    """The cache of a model or ``generate()`` output (``output.cache`` from 5.24,
    ``output.past_key_values`` before), read without a deprecation warning."""
    fields = getattr(type(output), "__dataclass_fields__", {})
    for name in CACHE_ARGUMENT_NAMES:
        if name in fields:
            return getattr(output, name)
    return None


# --- configs, cache layers, registries ---------------------------------------------------------


def decoder_config(config: PretrainedConfig) -> PretrainedConfig:
    """The config of the text decoder (the model itself for a plain causal LM)."""
    return config.get_text_config(decoder=True)


def config_field(config: PretrainedConfig, name: str) -> Any:
    """``config.<name>``, or the first value set in its per-layer configs where the release keeps
    the field per layer (5.24's heterogeneous configs raise on the global read); None if unset."""
    try:
        return getattr(config, name, None)
    except Exception:  # noqa: BLE001 - 5.24: AmbiguousGlobalPerLayerAttributeError
        layers = getattr(config, "per_layer_config", None) or []
        return next((getattr(layer, name) for layer in layers if getattr(layer, name, None) is not None), None)


def default_cache_layers(config: PretrainedConfig) -> list[CacheLayerMixin]:
    """The layers transformers' own ``DynamicCache(config=...)`` would hold for this model, one per
    decoder layer: ``DynamicLayer`` for full attention, ``DynamicSlidingWindowLayer`` for sliding
    and chunked attention, and the model's own kinds for the rest (linear attention, convolution,
    hybrid, indexed, shared-KV 'dummy' layers...)."""
    return list(DynamicCache(config=config).layers)


def mask_query_length(query: int | torch.Tensor) -> int:
    """The new tokens' count a cache layer's ``get_mask_sizes`` is asked about: an int from 5.4
    on, the new tokens' ``cache_position`` tensor before."""
    return query if isinstance(query, int) else int(query.shape[0])


def register_attention(name: str, fn: Callable) -> None:
    """Register an attention function and sdpa's boolean mask function under ``name``. Without the
    mask registration transformers hands the function no mask at all (padding is lost)."""
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, causal_or_sdpa_mask)


_SDPA_MASK_SIGNATURE = inspect.signature(sdpa_mask)  # read once: the mask is built at every forward


def causal_or_sdpa_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """transformers' ``sdpa_mask``, except that a plainly causal mask over tokens with no padding is
    None: kvx's attention is then causal, bottom-right aligned, by itself. (``sdpa_mask`` skips it
    only when the queries are all the keys or one token, so every chunk of a chunked prefill would
    otherwise build a ``chunk x (stored + chunk)`` mask.) Padding anywhere, a sliding or chunked
    window, or a composed mask function: ``sdpa_mask``'s mask, unchanged."""
    given = _SDPA_MASK_SIGNATURE.bind(*args, **kwargs).arguments
    padding = given.get("attention_mask")
    plainly_causal = (given.get("mask_function", causal_mask_function) is causal_mask_function
                      and given.get("local_size") is None and given.get("allow_is_causal_skip", True))
    if plainly_causal and (padding is None or bool(padding.all())):
        return None
    return sdpa_mask(*args, **kwargs)


def attention_function(name: str) -> Callable:
    """A registered attention function (``"sdpa"``, ``"flash_attention_2"``, ...)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[name]


@functools.cache
def calls_attention_interface(cls: type) -> bool:
    """Whether a module class computes attention through transformers' attention registry (its
    ``forward`` looks up ``ALL_ATTENTION_FUNCTIONS``), so a registered function replaces it."""
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in source


def causal_lm_class(model_type: str) -> type:
    """The causal-LM class transformers' auto mapping gives ``model_type``."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])


@contextlib.contextmanager
def transformers_log_level(level: str) -> Iterator[None]:
    """Set transformers' logging verbosity (``"error"``, ``"warning"``...) inside the block."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity(getattr(hf_logging, level.upper()))
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def causal_lm_model_types() -> list[str]:
    """Every ``model_type`` in transformers' causal-LM auto mapping."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def is_pretrained_model(module: torch.nn.Module) -> bool:
    """A transformers model (a causal LM, its base model, or a decoder such as OPT's), not a layer."""
    from transformers import PreTrainedModel

    return isinstance(module, PreTrainedModel)


def is_dense_layer(layer: CacheLayerMixin) -> bool:
    """A plain full-attention layer (the kind kvx compresses)."""
    return type(layer) is DynamicLayer


def is_sliding_layer(layer: CacheLayerMixin) -> bool:
    """A plain sliding- or chunked-window layer (the model bounds it; kvx leaves it)."""
    return type(layer) is DynamicSlidingWindowLayer



# --- the model's own rotary position embedding (pre-RoPE key storage) --------------------------

DYNAMIC_ROPE_TYPES = ("dynamic", "longrope")
"""RoPE types whose frequencies change with the sequence length: a key rotated and stored at one
length cannot be rotated back the same way later."""


@dataclass
class Rope:
    """A model's own rotary position embedding, to move stored keys between their rotated form and
    the pre-RoPE form (KVQuant stores keys before RoPE). kvx never re-implements RoPE: ``rotary`` is
    the model's rotary module (``cos, sin = rotary(x, position_ids[, layer_type])``) and ``apply`` its
    modeling file's ``apply_rotary_pos_emb(q, k, cos, sin)``; ``layer_type`` is passed to rotary
    modules that take one (Gemma 3: local and global RoPE)."""

    rotary: torch.nn.Module
    apply: Callable
    layer_type: str | None = None

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions [N, n]`` long -> ``cos, sin [N, n, Drot]`` float32, as the model computes them."""
        probe = torch.empty(0, dtype=torch.float32, device=positions.device)  # gives the dtype and device
        extra = () if self.layer_type is None else (self.layer_type,)
        cos, sin = self.rotary(probe, positions, *extra)
        return cos.float(), sin.float()

    def rotate(self, x: torch.Tensor, positions: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """Keys ``x [B, Hkv, n, D]`` at ``positions [B, Hkv, n]`` rotated as the model rotates them
        (``inverse``: rotated back to their pre-RoPE form), in float32. The inverse divides by ``cos^2 +
        sin^2``, so RoPE variants that scale both (YaRN's attention factor) invert exactly too."""
        batch, heads, tokens, dim = x.shape
        cos, sin = self.cos_sin(positions.reshape(batch * heads, tokens).long())  # [B*Hkv, n, Drot]
        if inverse:
            norm = cos * cos + sin * sin
            cos, sin = cos / norm, -sin / norm
        flat = x.float().reshape(batch * heads, 1, tokens, dim)  # one head per "row": cos unsqueezes at dim 1
        _, rotated = self.apply(flat, flat, cos, sin)
        return rotated.reshape(batch, heads, tokens, dim)


def find_rope(owner: torch.nn.Module, module: torch.nn.Module, layer_types: list[str] | None) -> Rope:
    """The RoPE of attention ``module`` in the model whose forward is ``owner`` (it computes the
    position embeddings once per forward), or a ValueError saying why it cannot be reused."""
    name = type(module).__name__
    rotaries = [child for child_name, child in owner.named_children() if child_name.endswith("rotary_emb")]
    if len(rotaries) != 1:
        found = "no rotary embedding module" if not rotaries else f"{len(rotaries)} rotary embedding modules"
        raise ValueError(f"{type(owner).__name__} has {found} (a child named *rotary_emb), so the RoPE of its {name} "
                         "cannot be reused")
    rotary = rotaries[0]
    apply = getattr(sys.modules.get(type(module).__module__), "apply_rotary_pos_emb", None)
    if apply is None or list(inspect.signature(apply).parameters)[:4] != ["q", "k", "cos", "sin"]:
        raise ValueError(f"{name}'s modeling file has no apply_rotary_pos_emb(q, k, cos, sin), so its RoPE cannot be "
                         "applied to stored keys")
    rope_types = {str(value) for attr, value in vars(rotary).items() if attr.endswith("rope_type")}
    dynamic = sorted(t for t in rope_types if any(kind in t for kind in DYNAMIC_ROPE_TYPES))
    if dynamic:
        raise ValueError(f"{name} uses {', '.join(dynamic)} RoPE, whose frequencies change with the sequence length; "
                         "keys stored before RoPE could not be rotated back as the model rotated them")
    layer_type = None
    if "layer_type" in inspect.signature(rotary.forward).parameters:
        layer_type = (layer_types or [])[module.layer_idx] if layer_types else None
        if layer_type is None:
            raise ValueError(f"{type(rotary).__name__} takes a layer type, but the config gives none for layer "
                             f"{module.layer_idx}")
    return Rope(rotary, apply, layer_type)
