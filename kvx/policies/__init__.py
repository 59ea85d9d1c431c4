"""Built-in policies, one per file. Importing this package registers them."""

from kvx.policies.h2o import H2O
from kvx.policies.head_budget import HeadBudget
from kvx.policies.keyformer import Keyformer
from kvx.policies.knorm import KNorm
from kvx.policies.mikv import MiKV
from kvx.policies.moa import MoA
from kvx.policies.pyramidkv import PyramidKV
from kvx.policies.retrieval_heads import RetrievalHeads
from kvx.policies.snapkv import SnapKV
from kvx.policies.streaming_llm import StreamingLLM
from kvx.policies.tova import TOVA

__all__ = [
    "H2O", "HeadBudget", "KNorm", "Keyformer", "MiKV", "MoA", "PyramidKV", "RetrievalHeads", "SnapKV", "StreamingLLM",
    "TOVA",
]
