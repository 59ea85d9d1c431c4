"""kvx: long-context KV-cache compression for Hugging Face transformers models, in one line.

    import kvx
    kvx.patch(model, "snapkv", budget=1024)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=64, return_dict_in_generate=True)
    out.past_key_values.nbytes()
    kvx.unpatch(model)
"""

from kvx import policies
from kvx.api import compress_context, is_patched, patch, patched, policy_of, prefill, unpatch
from kvx.cache import KVCache
from kvx.patches import supported_model_types
from kvx.policy import CompressionView, EvictionPolicy, Policy, list_policies, make_policy, register_policy

__version__ = "0.1.0"

__all__ = [
    "CompressionView",
    "EvictionPolicy",
    "KVCache",
    "Policy",
    "compress_context",
    "is_patched",
    "list_policies",
    "make_policy",
    "patch",
    "patched",
    "policies",
    "policy_of",
    "prefill",
    "register_policy",
    "supported_model_types",
    "unpatch",
]
