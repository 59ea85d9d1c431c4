"""Built-in policies, one per file. Importing this package registers them."""

from kvx.policies.snapkv import SnapKV
from kvx.policies.streaming_llm import StreamingLLM

__all__ = ["SnapKV", "StreamingLLM"]
