"""kvx: long-context KV-cache compression for Hugging Face transformers models, in one line.

    import kvx
    kvx.patch(model, "snapkv", budget=1024)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=64, return_dict_in_generate=True)
    kvx.cache_of(out).nbytes()      # the compressed cache (out.cache / out.past_key_values, by release)
    kvx.unpatch(model)
"""

from kvx.compat import check_version

check_version()  # a clear ImportError on a transformers release kvx does not support

from kvx import policies  # noqa: E402
from kvx.api import compress_context, is_patched, patch, patched, policy_of, prefill, unpatch  # noqa: E402
from kvx.cache import KVCache  # noqa: E402
from kvx.compat import cache_kwargs, cache_of  # noqa: E402
from kvx.compose import compose  # noqa: E402
from kvx.policy import CompressionView, EvictionPolicy, Policy, list_policies, make_policy, register_policy  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "CompressionView",
    "EvictionPolicy",
    "KVCache",
    "cache_kwargs",
    "cache_of",
    "compose",
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
    "unpatch",
]
