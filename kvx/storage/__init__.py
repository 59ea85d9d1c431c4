"""Storage kinds: how the kept tokens of one layer are held (one file each).

``dense``: every KV head of a row keeps the same slots; ``ragged``: each KV head its own number of
tokens, packed; ``quantized``: old tokens as packed low-bit codes (the ``int8`` and ``kivi``
policies); ``kvquant``: quantized with keys stored before RoPE and exact outliers (``kvquant``);
``mixed``: old tokens at two precisions chosen by a selection (``mixed``, with ``mikv``). A selection policy names the kind it needs in its ``storage`` attribute; a storage
policy (``kvx.compose(selection, storage)``) provides one and builds its layers.
"""

from typing import Any

from kvx.storage.base import Storage
from kvx.storage.dense import DenseLayer
from kvx.storage.kvquant import KvQuantLayer
from kvx.storage.mixed import MixedLayer
from kvx.storage.quantized import QuantizedLayer
from kvx.storage.ragged import RaggedLayer

STORAGE_KINDS: dict[str, type[DenseLayer]] = {
    "dense": DenseLayer, "ragged": RaggedLayer, "quantized": QuantizedLayer, "mixed": MixedLayer,
    "kvquant": KvQuantLayer,
}

from kvx.storage import int8, kivi, kvquant  # noqa: E402  (register the quantized storage policies)


def make_layer(storage_policy: Any | None) -> Storage:
    """A new cache layer for a storage policy (None: dense), built by its ``make_layer()`` when it
    has options that shape the layer, else by its kind."""
    if storage_policy is None:
        return DenseLayer()
    make = getattr(storage_policy, "make_layer", None)
    return make() if make is not None else STORAGE_KINDS[storage_policy.storage]()


__all__ = ["STORAGE_KINDS", "DenseLayer", "KvQuantLayer", "MixedLayer", "QuantizedLayer", "RaggedLayer", "int8", "kivi",
           "kvquant", "make_layer"]
