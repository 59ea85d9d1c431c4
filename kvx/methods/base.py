"""The method axis: which (query, key) pairs attention computes.

A method asks a storage kind to attend over everything it holds (dense), or over a subset (block-
sparse prefill, page selection at decode); it never changes what is stored. Adding one: a file in
``kvx/methods/`` with a subclass of :class:`Method` decorated with :func:`register_method`.

A method says which calls it acts on (:attr:`Method.serves`): ``prefill`` methods (block-sparse)
act on calls with several new queries per row and attend densely at decode, ``decode`` methods
(``quest``, ``tidal``) the reverse. ``kvx.compose`` joins one of each (``vertical_slash+quest``) into
a :class:`kvx.methods.by_phase.ByPhase`.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from kvx.storage.base import Storage

_METHODS: dict[str, type[Method]] = {}

SERVES = ("prefill", "decode", "all")
"""What a method may serve: calls with several new queries per row (a prompt, a chunk of a chunked
prefill, an extension), steps with one new query per row, or both."""


class Method:
    """Base of every attention method."""

    name: ClassVar[str]
    summary: ClassVar[str]
    serves: ClassVar[str] = "all"
    """Which calls the method acts on, one of :data:`SERVES`: ``prefill`` (several new queries per
    row) or ``decode`` (one) where it attends densely in the other, ``all`` where it acts on both.
    ``kvx.compose`` joins two methods only where they serve different phases."""

    @classmethod
    def exact(cls) -> Method:
        """This method configured to compute every (query, key) pair the mask allows (a density of
        1, every block or page selected). ``tests/methods/test_method_conformance.py`` checks that it then
        gives the dense model's outputs, on every storage kind."""
        return cls()

    def for_layer(self, cache, layer_idx: int) -> Method:
        """This method as it runs on layer ``layer_idx`` of ``cache`` (the ``kvx.KVCache`` of the
        forward in progress): itself, unless it depends on the layer or keeps state across the
        layers of one forward on the cache (``tidal``)."""
        return self

    def attend(self, storage: Storage, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               mask: torch.Tensor | None, scaling: float, softcap: float | None,
               sinks: torch.Tensor | None) -> torch.Tensor:
        """Attention ``[B, H, q, Dv]`` of ``query [B, H, q, D]`` through ``storage`` (see
        :meth:`kvx.storage.base.Storage.attend` for the arguments)."""
        raise NotImplementedError

    def attend_with_column_sums(self, storage: Storage, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                mask: torch.Tensor | None, scaling: float,
                                softcap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`attend` (no attention sinks) and, where one pass gives them, the column sums of its
        attention ``[B, Hkv, G, S]`` over what the storage's scoring view holds; None otherwise.
        Only dense attention gives them: a method that skips pairs has no column sums to give."""
        return self.attend(storage, query, key, value, mask, scaling, softcap, None), None


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method reachable by its ``name``."""
    if cls.serves not in SERVES:
        raise ValueError(f"method {cls.name!r} serves {cls.serves!r}; choose one of {', '.join(SERVES)}")
    if cls.name in _METHODS and _METHODS[cls.name] is not cls:
        raise ValueError(f"a method named {cls.name!r} is already registered ({_METHODS[cls.name].__name__})")
    _METHODS[cls.name] = cls
    return cls


def method_names() -> list[str]:
    return sorted(_METHODS)


def phases(serves: str) -> tuple[str, ...]:
    """The phases (``prefill``, ``decode``) a method serving ``serves`` acts on."""
    return ("prefill", "decode") if serves == "all" else (serves,)


def methods_serving(phase: str) -> list[str]:
    """The registered methods that act on ``phase`` alone (``prefill`` or ``decode``)."""
    return [name for name in sorted(_METHODS) if _METHODS[name].serves == phase]


def method_class(name: str) -> type[Method]:
    """The registered method called ``name``, or a ValueError listing the known ones."""
    if name not in _METHODS:
        raise ValueError(f"unknown attention method {name!r}; known methods: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]
