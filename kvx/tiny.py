"""Small random-weight models built from configs: for tests, the demo and speed benchmarks
(speed and memory need shapes, not trained weights). Nothing is downloaded."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

# Per-architecture settings that exercise what is special about each adapter.
ARCH_OVERRIDES: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {"sliding_window": None},  # Mistral v0.3-style: full attention everywhere
    "qwen2": {},
    "qwen3": {},  # q_norm / k_norm
    "gemma2": {"sliding_window": 16},  # alternating sliding/full layers, logit soft-capping
    "gemma3_text": {"sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"]},
    "phi3": {},  # fused qkv_proj
}


def tiny_config(model_type: str = "llama", **overrides: Any) -> PretrainedConfig:
    """A config with 2 layers, 4 query / 2 KV heads, head dim 16 unless overridden."""
    settings: dict[str, Any] = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=65536,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    settings.update(ARCH_OVERRIDES.get(model_type, {}))
    settings.update(overrides)
    layers = settings["num_hidden_layers"]
    if "layer_types" in settings and len(settings["layer_types"]) != layers:
        pattern = settings["layer_types"]
        settings["layer_types"] = [pattern[i % len(pattern)] for i in range(layers)]
    return AutoConfig.for_model(model_type, **settings)


def tiny_model(model_type: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any):
    """A random-weight causal LM in eval mode, reproducible from ``seed``."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=dtype)
    return model.eval()
