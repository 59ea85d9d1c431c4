"""Tiny random-weight models for every model type in transformers' causal-LM auto mapping.

``tiny_model(model_type)`` starts from the type's default config (``AutoConfig.for_model``), shrinks it and builds
``AutoModelForCausalLM.from_config`` with the model's own weight init, in fp32 on the CPU. Nothing is downloaded.

Shrinking works on the config's ``to_dict()`` form, one config dict at a time (the text config and every sub-config
such as a vision or audio tower):

* sizes are capped (``SIZE_CAPS``: hidden 64, 4 query / 2 KV heads, head dim 16, vocab 256, ...), never enlarged;
* the layers kept are a few of the default model's layers chosen so that every distinct value of every per-layer
  list (``layer_types``, ``mlp_layer_types``, ...) is still present: a hybrid model keeps an attention layer and a
  non-attention layer, a sliding-window model a sliding and a full layer;
* a few sizes keep their default ratio to another (``LINKED_FIELDS``), e.g. an MLA model's head_dim to its RoPE
  width, and a few fields the model needs but the default leaves None are filled (``FILL_NONE``);
* special token ids outside the small vocabulary are moved inside it;
* ``OVERRIDES`` then applies the type-specific repairs that some default configs need to build tiny (each with the
  reason in a comment), ``CONFIG_KWARGS`` those needed for the default config to validate at all.

Types that cannot be built here, or build but cannot generate because of transformers itself (``KNOWN_BROKEN``), raise
``CannotBuildTiny`` from ``tiny_model`` with the reason. ``layer_kinds`` reports a built model's per-layer kinds.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig

from kvx.compat import causal_lm_class, transformers_log_level

HIDDEN = 64
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 16
INTERMEDIATE = 128
VOCAB = 256
POSITIONS = 512
WINDOW = 16
EXPERTS = 4
TOP_K = 2
MIN_LAYERS = 2
MAX_LAYERS = 4


class CannotBuildTiny(Exception):
    """The model type cannot be built tiny here; str(exc) says why (e.g. needs the timm package, default config
    invalid, transformers' own generate fails)."""


def _caps(value: int, *keys: str) -> dict[str, int]:
    return dict.fromkeys(keys, value)


# Integer config fields and the largest value each may keep (a smaller default is kept as it is; None, strings and
# booleans are left alone). A field only matters where a config has it.
SIZE_CAPS: dict[str, int] = {
    **_caps(HIDDEN, "hidden_size", "n_embd", "d_model", "emb_dim", "embedding_dim", "word_embed_proj_dim",
            "input_embedding_size", "output_embedding_size", "embedding_size", "lru_width", "attention_hidden_size",
            "router_hidden_size", "ple_embed_dim", "prompt_mid_dim", "pronunciation_embed_dim", "shape_embed_dim"),
    **_caps(HEADS, "num_attention_heads", "n_head", "n_heads", "num_heads", "encoder_attention_heads",
            "decoder_attention_heads", "attention_heads", "num_decoder_attention_heads", "num_encoder_attention_heads",
            "swa_num_attention_heads", "index_n_heads", "indexer_n_heads", "linear_num_heads",
            "linear_num_value_heads", "heads_per_ngram"),
    **_caps(KV_HEADS, "num_key_value_heads", "num_kv_heads", "swa_num_key_value_heads", "linear_num_key_heads",
            "num_query_groups", "indexer_kv_heads"),
    **_caps(HEAD_DIM, "head_dim", "d_head", "dim_head", "kv_channels", "attention_head_size", "attention_head_dim",
            "swa_head_dim", "index_head_dim", "indexer_head_dim", "linear_head_dim", "linear_key_head_dim",
            "linear_value_head_dim", "mamba_head_dim", "mamba_headdim", "mamba_d_head", "qk_nope_head_dim",
            "v_head_dim", "hidden_size_per_layer_input", "laurel_rank", "adapter_rank", "loop_gate_rank",
            "hc_lowrank"),
    # multi-head latent attention (DeepSeek-style)
    "qk_rope_head_dim": 8,
    "qk_head_dim": 24,  # qk_nope_head_dim + qk_rope_head_dim
    "rotary_dim": 8,  # partial rotary (GPT-J style)
    **_caps(32, "kv_lora_rank", "q_lora_rank", "o_lora_rank"),
    **_caps(INTERMEDIATE, "intermediate_size", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "n_inner", "dff",
            "d_inner", "dim_ff", "ffn_hidden_size", "feed_forward_size", "moe_intermediate_size",
            "shared_expert_intermediate_size", "expert_ffn_hidden_size", "intermediate_size_mlp",
            "dense_intermediate_size", "moe_shared_expert_intermediate_size", "shared_experts_intermediate_size",
            "prefix_dense_intermediate_size", "shared_intermediate_size", "mamba_d_ssm", "mlp_dim", "d_ff"),
    # vision towers: fewer patches and channels (the text-only prompts never run them, but they are built)
    "image_size": 224,
    "output_channels": HIDDEN,
    **_caps(VOCAB, "vocab_size", "decoder_vocab_size", "vocab_size_per_layer_input", "unpadded_vocab_size",
            "audio_vocab_size", "encoder_hash_byte_group_vocab", "output_vocab_size", "pronunciation_vocab_size",
            "shape_vocab_size"),
    **_caps(POSITIONS, "max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "context_length",
            "max_target_positions", "model_max_length", "original_max_position_embeddings"),
    # windows smaller than a short prompt, so that sliding / chunked / sparse paths really drop tokens
    **_caps(WINDOW, "sliding_window", "attention_chunk_size", "window_size", "attention_window_size",
            "local_attention", "sliding_window_size", "local_attention_window_len", "keep_window_size",
            "index_topk", "index_block_size"),
    "index_topk_blocks": 2,
    # chunked prefill of state-space / recurrent mixers and Reformer attention: several chunks in a short prompt
    **_caps(WINDOW, "chunk_size", "mamba_chunk_size", "local_attn_chunk_length", "lsh_attn_chunk_length"),
    # mixture of experts
    **_caps(EXPERTS, "num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"),
    **_caps(TOP_K, "num_experts_per_tok", "moe_topk", "moe_k", "num_experts_per_token", "top_k_experts",
            "zero_expert_num"),
    **_caps(1, "n_shared_experts", "num_shared_experts", "moe_num_shared_experts", "n_group", "num_expert_group",
            "topk_group", "first_k_dense_replace", "num_dense_layers"),
    # state-space / recurrent mixers: intermediate = expand * hidden = 128 = 8 heads of 16
    **_caps(16, "mamba_d_state", "state_size", "ssm_state_size"),
    **_caps(8, "mamba_n_heads", "mamba_num_heads"),
    **_caps(1, "n_groups", "mamba_n_groups", "mamba_ngroups"),
    **_caps(4, "time_step_rank", "mamba_dt_rank"),
}

# Fields whose default ratio to another field is kept: MLA models use head_dim as the RoPE width (= or a multiple
# of qk_rope_head_dim); Zamba / RWKV size their attention from hidden_size, vision adapters their input, the Phi-4
# audio encoder its convolutions.
LINKED_FIELDS: dict[str, str] = {"head_dim": "qk_rope_head_dim", "attention_hidden_size": "hidden_size",
                                 "adapter_in_dim": "hidden_size", "adapter_input_size": "hidden_size",
                                 "ext_pw_out_channel": "hidden_size", "depthwise_separable_out_channel": "hidden_size",
                                 "nemo_conv_channels": "hidden_size"}
# Fields some default configs leave None although the model needs a number.
FILL_NONE: dict[str, int] = {"head_dim": HEAD_DIM, "num_key_value_heads": KV_HEADS}
# Fields that give the number of decoder layers (all those present are set).
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers", "num_decoder_layers",
                    "num_blocks")
# Fields of encoder-decoder configs whose encoder is not part of the causal LM but is still sized by the config.
OTHER_LAYER_COUNT_KEYS = ("encoder_layers", "num_encoder_layers")
# Lists of layer indices (rather than one value per layer).
LAYER_INDEX_LIST_KEYS = ("cross_attention_layers", "full_attn_idxs", "moe_layers", "mlp_only_layers",
                         "hybrid_layer_ids", "attn_layer_indices", "local_layer_ids", "ple_layer_ids")
# Dicts keyed by layer index (heterogeneous configs: per-layer field overrides).
LAYER_INDEX_DICT_KEYS = ("per_layer_config",)
# Per-layer fields reported as the model's layer types, first found wins.
LAYER_KIND_KEYS = ("layer_types", "layers_block_type", "block_types", "attention_layers", "attn_layers")
# Special token ids moved inside the vocabulary when the default one lies outside it.
TOKEN_ID_FALLBACKS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 2,
                      "forced_eos_token_id": 2, "forced_bos_token_id": 1, "sep_token_id": 3, "cls_token_id": 4,
                      "mask_token_id": 5, "unk_token_id": 6, "eod_token_id": 2, "start_token_id": 1}
# Lists of token ids (generation settings) from which ids outside the vocabulary are dropped.
TOKEN_ID_LIST_KEYS = ("suppress_tokens", "begin_suppress_tokens")

# Keyword arguments for AutoConfig.for_model where the default config itself does not validate.
CONFIG_KWARGS: dict[str, dict[str, Any]] = {
    # the assistant's validator wants per-layer inputs off, but its default text config has them on
    "gemma4_assistant": {"text_config": {"model_type": "gemma4_text", "hidden_size_per_layer_input": 0,
                                         "vocab_size_per_layer_input": 0}},
}

_GEMMA3N = {
    # layers 0-19 compute KV, 20-34 reuse it: keep a sliding and a full layer of each kind
    "keep_layers": [3, 4, 20, 24], "num_kv_shared_layers": 2,
}
_QWEN4_EXP = {
    # the default leaves the QSA indexer unset, but indexed_attention layers build it unconditionally
    "indexer_n_heads": HEADS, "indexer_kv_heads": 1, "indexer_head_dim": HEAD_DIM, "indexer_budget": WINDOW,
    "indexer_compress_ratio": 4,
}
_MUSICGEN = {
    # input ids are (batch * num_codebooks, length): with one codebook a (1, n) prompt works
    "num_codebooks": 1,
    # generate starts each codebook from decoder_start_token_id, which only the composite config's generation
    # config sets; the start / pad row of the codebook embeddings is vocab_size
    "decoder_start_token_id": VOCAB,
}
_ASSISTANT = {"num_kv_shared_layers": MIN_LAYERS}  # assistants reuse the target's KV in every layer

# Type-specific repairs, applied to the shrunk text config dict (the config itself, or its decoder text sub-config;
# a key starting with "/" is relative to the whole config instead). "a.b" reaches into sub-config dict "a". The
# special key "keep_layers" lists the default model's layers to keep, where the automatic choice cannot see the layer
# roles.
OVERRIDES: dict[str, dict[str, Any]] = {
    "bamba": {"attn_layer_indices": [1]},  # default has no attention layer at all
    "cohere_compass_text": {  # default rope_parameters is {} but the rotary embedding reads one entry per layer type
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    "dbrx": {  # DbrxAttention reads attn_config.rope_theta, which the default lacks; with the default clip_qkv=None
        # it calls clamp(min=None, max=None), which torch rejects
        "attn_config.rope_theta": 10000.0, "attn_config.clip_qkv": 8.0},
    "deepseek_v2": {"num_experts_per_tok": TOP_K},  # default None, which the router passes to topk
    "dory": {  # layer_types alternates attention / mlp blocks: keep 3 decoder layers (input, recurrent, output)
        "keep_layers": [0, 1, 6, 7, 8, 9], "n_input_layers": 2, "n_recurrent_layers": 2, "n_output_layers": 2},
    "dots1": {  # default leaves the MoE sizes None
        "n_routed_experts": EXPERTS, "num_experts_per_tok": TOP_K, "n_shared_experts": 1},
    "dots3_note": {  # the vision and audio adapters project to the text hidden size
        "/vision_config.adapter_out_dim": HIDDEN, "/audio_config.adapter_out_dim": HIDDEN},
    "falcon_h1": {"mamba_d_head": HEAD_DIM},  # mamba_n_heads * mamba_d_head must equal mamba_d_ssm
    "gemma3n": _GEMMA3N,
    "gemma3n_text": _GEMMA3N,
    "gemma4_assistant": _ASSISTANT,
    "gemma4_unified_assistant": _ASSISTANT,
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},  # default: Mamba layers only
    "hrm_text": {  # num_hidden_layers counts cache slots: layers per stack * H_cycles * (L_cycles + 1)
        "num_layers_per_stack": MIN_LAYERS, "num_hidden_layers": MIN_LAYERS * 2 * 4},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1},  # default period 8 puts no attention in 2 layers
    "lfm2": {"layer_types": ["conv", "full_attention"], "full_attn_idxs": [1]},  # default: attention layers only
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},  # default layer_types is None, which the model indexes
    "mamba2": {"num_heads": 8},  # num_heads * head_dim must equal expand * hidden_size
    "musicgen": _MUSICGEN,
    "musicgen_melody": _MUSICGEN,
    "qwen4_exp": _QWEN4_EXP,
    "qwen4_exp_text": _QWEN4_EXP,
    "recurrent_gemma": {"num_hidden_layers": 3},  # block pattern (recurrent, recurrent, attention)
    "reformer": {  # the LM head needs a decoder; axial position shape must multiply to max_position_embeddings
        # and the axial embedding dims must add up to hidden_size
        "is_decoder": True, "axial_pos_shape": [16, 32], "axial_pos_embds_dim": [16, 48]},
    "xlstm": {"hidden_size": 128, "embedding_dim": 128},  # the cache rounds qk_dim up to a multiple of 64
    "xmod": {"default_language": "en_XX"},  # without a language the adapters cannot be chosen
    "zamba": {  # two hybrid layers (they share one block, which a single one cannot tie), attention_head_dim
        # derived again from the shrunk sizes
        "keep_layers": [0, 2, 7], "attention_head_dim": None},
}

# Types that build tiny but cannot generate, because of transformers itself: tiny_model raises CannotBuildTiny.
KNOWN_BROKEN: dict[str, str] = {
    "blt": "transformers' own generate fails: BltModel builds DynamicCache(config=BltConfig), which has no "
           "num_hidden_layers (AttributeError)",
    "musicgen": "transformers' own generate fails: MusicgenForCausalLM.generate skips _prepare_generation_config, so "
                "it passes num_return_sequences=None to _expand_inputs_for_generation (TypeError)",
    "gemma4_assistant": "draft model: every layer reuses the target model's KV cache, so it cannot generate alone",
    "gemma4_unified_assistant": "draft model: every layer reuses the target model's KV cache, so it cannot generate "
                                "alone",
}


def _is_config_dict(value: Any) -> bool:
    return isinstance(value, dict) and "model_type" in value


def _is_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _layer_count(cfg: dict[str, Any]) -> int | None:
    counts = [cfg[key] for key in LAYER_COUNT_KEYS if _is_size(cfg.get(key))]
    return counts[0] if counts else None


def _per_layer_keys(cfg: dict[str, Any], n_layers: int) -> list[str]:
    """Fields holding one value per layer: lists of scalars whose length is the layer count."""
    return [key for key, value in cfg.items()
            if isinstance(value, list) and len(value) == n_layers and key not in LAYER_INDEX_LIST_KEYS
            and all(isinstance(v, (str, int, float, bool)) or v is None for v in value)]


def _layer_columns(cfg: dict[str, Any], n_layers: int) -> list[list]:
    """One list per per-layer property (value per layer, index-list membership, per-layer override), for choosing
    layers that cover every property value."""
    columns = [cfg[key] for key in _per_layer_keys(cfg, n_layers)]
    columns += [[i in cfg[key] for i in range(n_layers)] for key in LAYER_INDEX_LIST_KEYS
                if isinstance(cfg.get(key), list)]
    for key in LAYER_INDEX_DICT_KEYS:
        if isinstance(cfg.get(key), dict):
            by_index = {int(k): repr(sorted(v.items())) for k, v in cfg[key].items()}
            columns.append([by_index.get(i) for i in range(n_layers)])
    return columns


def _choose_layers(cfg: dict[str, Any], n_layers: int) -> list[int]:
    """Indices of the default model's layers to keep: the first layer, then each layer showing a per-layer property
    value not seen yet; padded with the next layers to MIN_LAYERS, cut at MAX_LAYERS."""
    columns = _layer_columns(cfg, n_layers)
    seen: list[set] = [set() for _ in columns]
    chosen = []
    for i in range(n_layers):
        if i == 0 or any(column[i] not in seen[j] for j, column in enumerate(columns)):
            chosen.append(i)
            for j, column in enumerate(columns):
                seen[j].add(column[i])
    chosen += [i for i in range(n_layers) if i not in chosen][: max(0, MIN_LAYERS - len(chosen))]
    return sorted(chosen)[:MAX_LAYERS]


def _keep_layers(cfg: dict[str, Any], keep: list[int]) -> None:
    """Keep the default model's layers ``keep``: set the layer counts, slice per-layer lists, remap index lists and
    index-keyed dicts."""
    n_layers = _layer_count(cfg)
    for name in _per_layer_keys(cfg, n_layers):
        cfg[name] = [cfg[name][i] for i in keep]
    for name in LAYER_INDEX_LIST_KEYS:
        if isinstance(cfg.get(name), list):
            cfg[name] = [j for j, i in enumerate(keep) if i in cfg[name]]
    for name in LAYER_INDEX_DICT_KEYS:
        if isinstance(cfg.get(name), dict):
            width = max((len(k) for k in cfg[name]), default=1)
            by_index = {int(k): v for k, v in cfg[name].items()}
            cfg[name] = {str(j).zfill(width): by_index[i] for j, i in enumerate(keep) if i in by_index}
    for key in LAYER_COUNT_KEYS:
        if cfg.get(key) == n_layers:
            cfg[key] = len(keep)
    for key in OTHER_LAYER_COUNT_KEYS:
        if _is_size(cfg.get(key)):
            cfg[key] = min(cfg[key], MIN_LAYERS)


def _shrink_sizes(cfg: dict[str, Any], default: dict[str, Any]) -> None:
    """Cap sizes (SIZE_CAPS), fill needed Nones (FILL_NONE), then restore default ratios (LINKED_FIELDS)."""
    for key, cap in SIZE_CAPS.items():
        if _is_size(cfg.get(key)):
            cfg[key] = min(cfg[key], cap)
        elif isinstance(cfg.get(key), list) and all(_is_size(v) for v in cfg[key]):  # one size per layer
            cfg[key] = [min(v, cap) for v in cfg[key]]
    for key, value in FILL_NONE.items():
        if key in cfg and cfg[key] is None:
            cfg[key] = value
    if cfg.get("kv_lora_rank") is not None and _is_size(cfg.get("num_key_value_heads")):
        cfg["num_key_value_heads"] = cfg["num_attention_heads"]  # MLA decompresses keys for every query head
    for key, base in LINKED_FIELDS.items():
        if _is_size(default.get(key)) and _is_size(default.get(base)) and default[key] % default[base] == 0:
            cfg[key] = cfg[base] * (default[key] // default[base])


def _shrink_layer_overrides(cfg: dict[str, Any], default: dict[str, Any]) -> None:
    """Per-layer field overrides keep their default ratio to the global value (a layer with twice the head dim keeps
    twice the shrunk head dim); other sizes are capped."""
    for name in LAYER_INDEX_DICT_KEYS:
        for overrides in (cfg.get(name) or {}).values():
            for key, value in overrides.items():
                if _is_size(value) and _is_size(default.get(key)) and _is_size(cfg.get(key)):
                    overrides[key] = max(1, cfg[key] * value // default[key])
                elif _is_size(value) and key in SIZE_CAPS:
                    overrides[key] = min(value, SIZE_CAPS[key])


def _fix_token_ids(cfg: dict[str, Any]) -> None:
    vocab = cfg.get("vocab_size")
    if not _is_size(vocab):
        return
    for key, fallback in TOKEN_ID_FALLBACKS.items():
        value = cfg.get(key)
        if _is_size(value) and value >= vocab:
            cfg[key] = fallback
        elif isinstance(value, list):
            cfg[key] = [v if not _is_size(v) or v < vocab else fallback for v in value]
    for key in TOKEN_ID_LIST_KEYS:
        if isinstance(cfg.get(key), list):
            cfg[key] = [v for v in cfg[key] if not _is_size(v) or v < vocab]


def _shrink_dict(default: dict[str, Any], keep_layers: list[int] | None = None) -> dict[str, Any]:
    """A shrunk copy of one config dict, its sub-config dicts shrunk too (recursively)."""
    cfg = copy.deepcopy(default)
    for key, value in default.items():
        if _is_config_dict(value):
            cfg[key] = _shrink_dict(value)
    n_layers = _layer_count(cfg)
    if n_layers is not None:
        _keep_layers(cfg, keep_layers if keep_layers is not None else _choose_layers(cfg, n_layers))
    _shrink_sizes(cfg, default)
    _shrink_layer_overrides(cfg, default)
    _fix_token_ids(cfg)
    return cfg


def _text_path(config: PretrainedConfig) -> str | None:
    """Name of the sub-config holding the decoder text config, None when it is the config itself."""
    text = config.get_text_config(decoder=True)
    return next((key for key, value in vars(config).items() if value is text), None)


def _apply_overrides(cfg: dict[str, Any], overrides: dict[str, Any], text_path: str | None) -> None:
    for path, value in overrides.items():
        if path.startswith("/"):
            path = path[1:]
        elif text_path is not None:
            path = f"{text_path}.{path}"
        *parents, leaf = path.split(".")
        target = cfg
        for parent in parents:
            target = target[parent]
        target[leaf] = copy.deepcopy(value)


def _reason(what: str, exc: Exception) -> str:
    """One line: what failed, and the original error."""
    return " ".join(f"{what}: {type(exc).__name__}: {exc}".split())


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence transformers' warnings and Python warnings about the (unshrunk) default configs, e.g. special token ids
    outside the vocabulary, which the shrinking then fixes."""
    with transformers_log_level("error"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def tiny_config(model_type: str, windows: bool = True) -> PretrainedConfig:
    """The default config of ``model_type``, shrunk (see the module docstring); ``windows=False``: with its
    sliding windows removed (sliding layer types made full, or ``sliding_window=None``), the form of checkpoints
    that attend over everything. Raises CannotBuildTiny when the default or the shrunk config does not validate."""
    try:
        with _quiet():
            default = AutoConfig.for_model(model_type, **CONFIG_KWARGS.get(model_type, {}))
    except Exception as exc:  # any failure here means the default config is unusable
        raise CannotBuildTiny(_reason("default config invalid", exc)) from exc
    overrides = dict(OVERRIDES.get(model_type, {}))
    keep_layers = overrides.pop("keep_layers", None)
    text_path = _text_path(default)
    cfg = default.to_dict()
    if text_path is None:
        cfg = _shrink_dict(cfg, keep_layers)
    else:
        text = _shrink_dict(cfg.pop(text_path), keep_layers)
        cfg = {**_shrink_dict(cfg), text_path: text}
    if cfg.get("is_decoder") is False and not cfg.get("is_encoder_decoder"):
        cfg["is_decoder"] = True  # BERT-style models are causal LMs (and cache their keys) only as decoders
    _apply_overrides(cfg, overrides, text_path)
    if not windows:
        _remove_windows(cfg if text_path is None else cfg[text_path])
    try:
        with _quiet():
            config = type(default).from_dict(cfg)
    except Exception as exc:
        raise CannotBuildTiny(_reason("shrunk config invalid", exc)) from exc
    return config


def _remove_windows(cfg: dict[str, Any]) -> None:
    """Every attention layer of ``cfg`` attends over everything: sliding layer types made full (the window
    size stays, some models read it), or, without layer types, no sliding window."""
    if isinstance(cfg.get("layer_types"), list):
        cfg["layer_types"] = ["full_attention" if kind == "sliding_attention" else kind for kind in cfg["layer_types"]]
    elif "sliding_window" in cfg:
        cfg["sliding_window"] = None


def _model_config(config: PretrainedConfig, model_class: type) -> PretrainedConfig:
    """The (sub-)config ``model_class`` is built from: like AutoModelForCausalLM.from_config, which takes the text
    config of a composite config where the class wants it, and also the ``decoder`` of MusicGen-style configs."""
    wanted = getattr(model_class, "config_class", None)
    if wanted is None or isinstance(config, wanted):
        return config
    return next((value for value in vars(config).values() if isinstance(value, wanted)), config)


def tiny_model(model_type: str, seed: int = 0, windows: bool = True) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_config(tiny_config(model_type, windows))`` in fp32, eval mode, on the CPU, with
    weights from the model's own init after ``torch.manual_seed(seed)``. Raises CannotBuildTiny when it cannot be
    built (or, for KNOWN_BROKEN types, cannot generate)."""
    if model_type in KNOWN_BROKEN:
        raise CannotBuildTiny(KNOWN_BROKEN[model_type])
    config = tiny_config(model_type, windows)
    torch.manual_seed(seed)
    try:
        with _quiet():
            model_class = causal_lm_class(model_type)
            model = model_class._from_config(_model_config(config, model_class), dtype=torch.float32)
    except ImportError as exc:
        raise CannotBuildTiny(_reason("missing dependency", exc)) from exc
    except Exception as exc:
        raise CannotBuildTiny(_reason("build failed", exc)) from exc
    return model.eval()


def layer_kinds(config: PretrainedConfig) -> list | None:
    """The per-layer kinds of a (tiny) config's decoder, e.g. ``config.layer_types``; None when it has none."""
    text = config.get_text_config(decoder=True)
    for key in LAYER_KIND_KEYS:
        value = getattr(text, key, None)
        if isinstance(value, (list, tuple)):
            return list(value)
    return None
