"""Attention methods (the method axis), one file each; see :mod:`kvx.methods.base`."""

from kvx.methods.base import Method, method_class, method_names, register_method
from kvx.methods.dense import Dense

__all__ = ["Dense", "Method", "method_class", "method_names", "register_method"]
