"""``patch`` / ``unpatch`` / ``patched``: the one line that puts a policy under a model.

What ``patch`` does, all of it undone by ``unpatch``:

- registers kvx's attention and mask functions with transformers under the name ``"kvx"``
  (additive: no other implementation is touched) and switches the model to it with
  ``model.set_attn_implementation("kvx")``;
- attaches a small context (policy + layer index) to each attention module;
- adds forward hooks on the module that receives the cache (the base model, or the decoder of
  OPT and the bart family) that give every forward a :class:`~kvx.cache.KVCache` when it would
  otherwise build a plain ``DynamicCache``, so ``generate()``, forward loops and wrappers get
  the compressed cache without asking for it.
"""

from __future__ import annotations

import contextlib
import inspect
import types
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from kvx.attention import ATTN_IMPLEMENTATION, CONTEXT_ATTR, LayerContext, PatchState, register
from kvx.cache import KVCache
from kvx.compat import (
    CACHE_ARGUMENT_NAMES,
    CHUNKED_PREFILL_RESUMES_CACHE,
    TRANSFORMERS_VERSION,
    cache_argument_name,
    cache_kwargs,
    cache_of,
    config_field,
    decoder_config,
    find_rope,
)
from kvx.compose import as_composed
from kvx.patches import NO_CHUNKED_PREFILL, find_attention
from kvx.policy import Policy, make_policy
from kvx.storage.base import Storage

STATE_ATTR = "_kvx_state"


DEFAULT_CHUNK_SIZE = 4096


def patch(
    model: torch.nn.Module, policy: str | Policy, *, chunk_size: int | None | str = "auto", **options: Any
) -> Policy:
    """Make ``model`` store and attend through ``policy``; returns the policy object.

    Args:
        model: a transformers causal LM (or its base model) of a supported architecture.
        policy: a registered name (``kvx.list_policies()``) or a policy object.
        chunk_size: ``generate()`` feeds prompts longer than this in chunks of this many tokens,
            and the policy compresses between chunks, so peak memory follows budget + chunk rather
            than the prompt length (transformers' ``prefill_chunk_size``). None: one piece. "auto"
            (the default): ``DEFAULT_CHUNK_SIZE``, or one piece where ``generate()`` cannot prefill in
            chunks correctly: on transformers before 5.21 (which prefills a given cache from its first
            token again; an explicit chunk size still works there for prompts that start a cache) and
            for the few models in ``kvx.patches.NO_CHUNKED_PREFILL`` (asking them for a chunk size
            raises).
        **options: options of a named policy, e.g. ``budget=1024``.

    Patching a patched model replaces its policy.
    """
    found = find_attention(model)
    chunk_size = _chunk_size(chunk_size, found.model_type)
    policy = make_policy(policy, **options)
    axes = as_composed(policy)
    axes.check_model(decoder_config(model.config).num_hidden_layers)
    axes.prepare(model)
    _check_head_dims(axes, found.modules)
    _warn_if_nothing_to_compress(model, axes)
    if is_patched(model):
        unpatch(model)
    register()
    generation_config = getattr(model, "generation_config", None)
    state = PatchState(
        policy, axes, found.model_type, model.config._attn_implementation,
        original_chunk_size=getattr(generation_config, "prefill_chunk_size", None),
        chunk_size=chunk_size,
    )
    if generation_config is not None:
        generation_config.prefill_chunk_size = chunk_size
        if chunk_size is not None:
            _wrap_generate(model, state)
    state.method = axes.attention_method() or state.method  # dense unless the policy brings a method
    state.ropes = _find_ropes(axes, found, model.config)
    for module in found.modules:
        setattr(module, CONTEXT_ATTR, LayerContext(state, module.layer_idx))
    for module in found.unmanaged:
        setattr(module, CONTEXT_ATTR, LayerContext(state, None))
    owner = found.cache_owner
    state.hook_handles = [
        owner.register_forward_pre_hook(_cache_injector(owner), with_kwargs=True),
        owner.register_forward_hook(_release_cache, always_call=True),
    ]
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    setattr(model, STATE_ATTR, state)
    setattr(owner, STATE_ATTR, state)  # the hooks read it from their module (so deepcopy stays consistent)
    return policy


def _warn_if_nothing_to_compress(model: torch.nn.Module, axes) -> None:
    """A selection on a model with no layer it may compress (every layer a sliding window, or not
    attention) would run as dense without a word: say so, once per patch."""
    if axes.selection is None:
        return
    layers = KVCache(model.config, axes.storage).layers
    if not any(isinstance(layer, Storage) for layer in layers):
        warnings.warn(
            f"kvx.patch: policy {axes.name} has nothing to compress on this {model.config.model_type} model: every "
            "one of its layers is a sliding window (bounded by the model) or not attention, so the run is dense",
            UserWarning, stacklevel=3,
        )


def _wrap_generate(model: torch.nn.Module, state: PatchState) -> None:
    """Give ``model`` a ``generate`` (:func:`_generate_in_one_piece_where_needed`) that calls the one
    it had (an instance one the user set, or the class's); a bound method, so copies of the model
    call their own."""
    state.original_generate = vars(model).get("generate")
    state.wrapped_generate = types.MethodType(_generate_in_one_piece_where_needed, model)
    model.generate = state.wrapped_generate


def _generate_in_one_piece_where_needed(model: torch.nn.Module, *args: Any, **kwargs: Any):
    """``generate`` of a model patched with a chunk size: calls that cannot prefill in chunks
    (``use_cache=False``: no cache to fill; ``inputs_embeds``: transformers splits ``input_ids``)
    prefill in one piece, as they would unpatched. A ``prefill_chunk_size`` the caller gives is
    left to transformers. Everything else goes to the model's own ``generate``."""
    if "prefill_chunk_size" not in kwargs:
        config = kwargs.get("generation_config") or model.generation_config
        use_cache = kwargs.get("use_cache", getattr(config, "use_cache", True))
        if use_cache is False or kwargs.get("inputs_embeds") is not None:
            kwargs["prefill_chunk_size"] = None
    original = getattr(getattr(model, STATE_ATTR, None), "original_generate", None)
    if original is not None:
        return original(*args, **kwargs)
    return type(model).generate(model, *args, **kwargs)


def _unwrap_generate(model: torch.nn.Module, state: PatchState) -> None:
    """Undo :func:`_wrap_generate`, unless the user replaced ``generate`` since (theirs stays)."""
    if state.wrapped_generate is None or vars(model).get("generate") is not state.wrapped_generate:
        return
    if state.original_generate is None:
        del model.generate
    else:
        model.generate = state.original_generate


def _check_head_dims(axes, modules: list[torch.nn.Module]) -> None:
    """A storage whose layout depends on the head dim (quantized groups) checks it at patch, not at
    the first forward; the dim is the attention modules' own ``head_dim`` where they have one."""
    check = getattr(axes.storage_part, "check_head_dim", None)
    if check is None:
        return
    for dim in sorted({getattr(module, "head_dim", None) for module in modules} - {None}):
        check(dim)


def _find_ropes(axes, found, config) -> dict[int, Any]:
    """The model's RoPE per layer, for a storage that keeps keys before RoPE (``kvquant``); a model
    whose RoPE kvx cannot reuse is refused at patch."""
    if not getattr(axes.storage_part, "needs_rope", False):
        return {}
    layer_types = config_field(decoder_config(config), "layer_types")
    try:
        return {module.layer_idx: find_rope(found.cache_owner, module, layer_types) for module in found.modules}
    except ValueError as err:
        raise ValueError(f"{axes.storage_part.name} stores keys before RoPE, which this {found.model_type} model does "
                         f"not allow: {err}") from None


def _chunk_size(chunk_size: int | None | str, model_type: str) -> int | None:
    """Validate ``patch``'s ``chunk_size`` and resolve "auto" for this architecture."""
    if chunk_size == "auto":
        return DEFAULT_CHUNK_SIZE if CHUNKED_PREFILL_RESUMES_CACHE and model_type not in NO_CHUNKED_PREFILL else None
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int, None or 'auto', got {chunk_size!r}")
    if chunk_size is not None and model_type in NO_CHUNKED_PREFILL:
        raise ValueError(
            f"chunk_size={chunk_size}: {model_type} cannot prefill in chunks ({NO_CHUNKED_PREFILL[model_type]}); "
            "pass chunk_size=None"
        )
    return chunk_size


def unpatch(model: torch.nn.Module) -> None:
    """Undo :func:`patch`: the model computes exactly what it did before patching."""
    state: PatchState | None = getattr(model, STATE_ATTR, None)
    if state is None:
        raise ValueError(f"{type(model).__name__} is not patched by kvx")
    for handle in state.hook_handles:
        handle.remove()
    for module in model.modules():
        if hasattr(module, CONTEXT_ATTR):
            delattr(module, CONTEXT_ATTR)
    model.set_attn_implementation(state.original_attn_implementation)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.prefill_chunk_size = state.original_chunk_size
    _unwrap_generate(model, state)
    state.active_cache = None
    for module in model.modules():
        if hasattr(module, STATE_ATTR):
            delattr(module, STATE_ATTR)


def is_patched(model: torch.nn.Module) -> bool:
    return getattr(model, STATE_ATTR, None) is not None


def policy_of(model: torch.nn.Module) -> Policy | None:
    """The policy ``model`` is patched with, or None."""
    state = getattr(model, STATE_ATTR, None)
    return None if state is None else state.policy


@contextlib.contextmanager
def patched(model: torch.nn.Module, policy: str | Policy, **options: Any) -> Iterator[Policy]:
    """``with kvx.patched(model, "snapkv", budget=512) as policy: ...``; on exit the model is as it was
    (unpatched, or patched with its previous policy)."""
    previous = getattr(model, STATE_ATTR, None)
    try:
        yield patch(model, policy, **options)
    finally:
        if is_patched(model):
            unpatch(model)
        if previous is not None:
            patch(model, previous.policy, chunk_size=previous.chunk_size)


def prefill(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    cache: KVCache | None = None,
):
    """Run a prompt through a patched model in chunks, compressing between them; returns the
    output of the last chunk (``kvx.cache_of(output)`` is the compressed cache).

    What ``generate()`` does by itself when patched with ``chunk_size``, for forward loops and
    wrappers that call the model directly. ``attention_mask`` covers the whole prompt (left padding).
    """
    state = _state(model)
    _check_prompt(input_ids, attention_mask, chunk_size)
    cache = cache if cache is not None else KVCache(model.config, state.axes.storage)
    step = chunk_size or input_ids.shape[1]
    out = None
    with torch.inference_mode():
        for start in range(0, input_ids.shape[1], step):
            stop = min(start + step, input_ids.shape[1])
            mask = None if attention_mask is None else attention_mask[:, :stop]
            position_ids = None if attention_mask is None else _positions(attention_mask)[:, start:stop]
            out = model(input_ids[:, start:stop], attention_mask=mask, position_ids=position_ids,
                        logits_to_keep=1, **cache_kwargs(cache))
    cache.end_prompt()  # storage that keeps the prompt exact until it ends (quantized) stores it now
    return out


def compress_context(
    model: torch.nn.Module,
    context_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> KVCache:
    """Query-aware evaluation's first half: compress the context alone, then freeze the cache so
    that what comes next (the question, the answer) is appended uncompressed::

        cache = kvx.compress_context(model, context_ids)
        out = model.generate(torch.cat([context_ids, question_ids], 1), **kvx.cache_kwargs(cache), ...)
    """
    cache = cache_of(prefill(model, context_ids, attention_mask, chunk_size))
    cache.frozen = True
    return cache


def _check_prompt(input_ids: Any, attention_mask: Any, chunk_size: Any) -> None:
    """Raise, naming the argument and what it must be, unless ``prefill`` can run this prompt."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
        got = f"a {input_ids.dim()}-D {input_ids.dtype} tensor" if isinstance(input_ids, torch.Tensor) else (
            type(input_ids).__name__)
        raise ValueError(f"input_ids must be a 2-D integer tensor [batch, tokens], got {got}")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids holds no tokens (shape [batch, 0]); give at least one")
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                       or attention_mask.shape != input_ids.shape):
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {got}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Logical positions under left padding, as ``generate()`` computes them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _state(model: torch.nn.Module) -> PatchState:
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        raise ValueError(f"{type(model).__name__} is not patched by kvx: call kvx.patch(model, policy) first")
    return state


def _given_cache(name: str, position: int, args: tuple, kwargs: dict) -> tuple[str | int, Any]:
    """Where a forward call carries its cache: ``(keyword or position, cache or None)``; the forward
    takes it as ``name`` at ``position``. A caller may use the deprecated name (``past_key_values``
    on 5.24): it is read, and written back, there."""
    for keyword in CACHE_ARGUMENT_NAMES:
        if kwargs.get(keyword) is not None:
            return keyword, kwargs[keyword]
    if position < len(args):
        return position, args[position]
    return name, None


def _cache_injector(owner: torch.nn.Module):
    """Forward pre-hook: make sure the forward runs on a kvx cache, and publish it to the layers.

    The state is read from the hooked module at call time, never captured, so a deep copy of a
    patched model drives its own copy of the state.
    """
    name = cache_argument_name(owner.forward)  # find_attention chose an owner that takes one
    position = list(inspect.signature(owner.forward).parameters).index(name)

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        state: PatchState = getattr(module, STATE_ATTR)
        _refuse_attention_maps(module, kwargs)
        where, cache = _given_cache(name, position, args, kwargs)
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(module.config, "use_cache", True)
        if cache is None and not use_cache:
            state.active_cache = None
            return args, kwargs
        storage = state.axes.storage
        if cache is None:
            cache = KVCache(module.config, storage)
            if isinstance(where, int):
                args = args[:where] + (cache,) + args[where + 1 :]
            else:
                kwargs[where] = cache
        elif not isinstance(cache, KVCache):
            _refuse_offloading(cache)
            KVCache.convert_in_place(cache, module.config, storage)
        elif cache.storage != storage:
            raise ValueError(
                f"this kvx cache has {cache.storage} storage but policy {state.policy.name} needs {storage}: "
                f"pass kvx.KVCache(model.config, storage={storage!r}), or none"
            )
        else:
            _check_continues(cache, args, kwargs)
        if state.ropes:
            cache.bind_ropes(state.ropes)
        state.active_cache = cache
        return args, kwargs

    return hook


def _refuse_attention_maps(module: torch.nn.Module, kwargs: dict) -> None:
    """``output_attentions=True`` would come back empty: kvx's attention returns no weights."""
    if kwargs.get("output_attentions", getattr(module.config, "output_attentions", False)):
        raise ValueError(
            "output_attentions=True: a kvx-patched model returns no attention maps (its attention reads the "
            "compressed cache, and evicted tokens have no weights); run kvx.unpatch(model) to get them"
        )


def _refuse_offloading(cache: Any) -> None:
    """An offloaded ``DynamicCache`` (``cache_implementation="offloaded"``) would lose its offloading
    when it becomes a kvx cache: refuse it rather than keep every layer on the device silently."""
    if getattr(cache, "offloading", False):
        raise ValueError(
            "cache_implementation='offloaded': a kvx cache keeps its layers on the model's device and does not "
            "offload them (compression is what bounds its memory); drop cache_implementation, or kvx.unpatch(model)"
        )


def _check_continues(cache: KVCache, args: tuple, kwargs: dict) -> None:
    """A call that continues a cache places its new tokens after the ones the cache has seen: a
    row whose first new position is 0 while the cache holds real tokens of it would attend over
    tokens twice. transformers before 5.21 makes exactly that call when ``generate()`` prefills in
    chunks on top of a cache that holds tokens."""
    positions = kwargs.get("position_ids")
    real_seen = cache.real_tokens_seen()
    if not isinstance(positions, torch.Tensor) or positions.dim() != 2 or real_seen is None:
        return
    restarted = (positions[:, 0].cpu() == 0) & (real_seen > 0)
    if bool(restarted.any()):
        hint = "" if CHUNKED_PREFILL_RESUMES_CACHE else (
            f"; transformers {TRANSFORMERS_VERSION}'s generate() prefills a given cache from its first token again "
            "when prefill_chunk_size is set (fixed in 5.21): patch with kvx.patch(model, policy, chunk_size=None) "
            "before generating on top of a cache that holds tokens"
        )
        raise ValueError(
            f"this forward gives position 0 to its first new token, but the kvx cache already holds "
            f"{int(real_seen.max())} tokens of that row{hint}"
        )


def _release_cache(module: torch.nn.Module, args: tuple, output: Any) -> None:
    state = getattr(module, STATE_ATTR, None)
    if state is not None:
        state.active_cache = None
