"""Per-architecture adapters, keyed by ``config.model_type``.

kvx never re-implements a model's attention: the model computes q, k, v, its norms and RoPE, then
calls the cache and the registered attention function. An adapter is therefore data: which module
class is the attention of this architecture, and what is worth knowing about it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Adapter:
    """How kvx finds the attention modules of one architecture."""

    model_type: str
    attention_class: str
    notes: str = ""

    def attention_modules(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """The attention modules of ``model`` in layer order; each has a ``layer_idx``."""
        found = [m for m in model.modules() if type(m).__name__ == self.attention_class]
        missing = [type(m).__name__ for m in found if not isinstance(getattr(m, "layer_idx", None), int)]
        if not found or missing:
            raise RuntimeError(
                f"kvx adapter for {self.model_type!r} expected {self.attention_class} modules with a layer_idx "
                f"in {type(model).__name__}; found {len(found)} (without layer_idx: {len(missing)})"
            )
        return sorted(found, key=lambda m: m.layer_idx)


ADAPTERS: dict[str, Adapter] = {
    adapter.model_type: adapter
    for adapter in [
        Adapter("llama", "LlamaAttention"),
        Adapter("mistral", "MistralAttention", "with config.sliding_window set, every layer is a sliding layer"),
        Adapter("qwen2", "Qwen2Attention", "layer_types may mark sliding layers"),
        Adapter("qwen3", "Qwen3Attention", "q_norm/k_norm are applied by the model before kvx sees the keys"),
        Adapter("gemma2", "Gemma2Attention", "alternating sliding/full layers; attention logit soft-capping"),
        Adapter("gemma3_text", "Gemma3Attention", "mostly sliding layers; q/k norms"),
        Adapter("phi3", "Phi3Attention", "fused qkv_proj"),
    ]
}


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


def adapter_for(model: torch.nn.Module) -> Adapter:
    """The adapter of ``model``'s architecture, or a ``ValueError`` listing the supported ones."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"kvx does not support model_type {model_type!r} ({type(model).__name__}); "
            f"supported: {', '.join(supported_model_types())}"
        )
    return ADAPTERS[model_type]
