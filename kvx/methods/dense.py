"""Dense attention: every new query attends over every token the storage holds (causal, padding
masked). The baseline every other method is measured against."""

from __future__ import annotations

from typing import ClassVar

from kvx.methods.base import Method, register_method


@register_method
class Dense(Method):
    """Every (query, key) pair the mask allows."""

    name: ClassVar[str] = "dense"
    summary: ClassVar[str] = "every query attends over every stored token"

    def attend(self, storage, query, key, value, mask, scaling, softcap, sinks):
        return storage.attend(query, key, value, mask, scaling, softcap, sinks)

    def attend_with_column_sums(self, storage, query, key, value, mask, scaling, softcap):
        return storage.attend_with_column_sums(query, key, value, mask, scaling, softcap)
