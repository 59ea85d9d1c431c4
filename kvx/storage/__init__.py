"""Storage kinds: how the kept tokens of one layer are held (one file each).

``dense``: every KV head of a row keeps the same slots; ``ragged``: each KV head its own number of
tokens, packed. A policy names the kind it needs in its ``storage`` attribute.
"""

from kvx.storage.dense import DenseLayer
from kvx.storage.ragged import RaggedLayer

STORAGE_KINDS: dict[str, type[DenseLayer]] = {"dense": DenseLayer, "ragged": RaggedLayer}

__all__ = ["STORAGE_KINDS", "DenseLayer", "RaggedLayer"]
