"""Attention methods (the method axis), one file each; see :mod:`kvx.methods.base`."""

from kvx.methods.a_shape import AShape
from kvx.methods.base import Method, method_class, method_names, register_method
from kvx.methods.block_topk import BlockTopK
from kvx.methods.dense import Dense
from kvx.methods.head_patterns import HeadPatterns
from kvx.methods.quest import Quest
from kvx.methods.tidal import Tidal
from kvx.methods.vertical_slash import VerticalSlash

__all__ = ["AShape", "BlockTopK", "Dense", "HeadPatterns", "Method", "Quest", "Tidal", "VerticalSlash", "method_class",
           "method_names", "register_method"]
