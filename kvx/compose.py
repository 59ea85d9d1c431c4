"""``kvx.compose``: one policy per axis (selection, storage, method) joined into one policy.

    policy = kvx.compose(kvx.make_policy("snapkv", budget=1024), kvx.make_policy("ragged"))
    kvx.patch(model, policy)

The result is an ordinary policy: it has a name (``snapkv+ragged``), ``describe()``, and is
accepted wherever a policy is. Two policies on one axis, or a selection that needs another storage
than the one given, raise a ``ValueError`` that names them.
"""

from __future__ import annotations

from typing import Any

import torch

from kvx.policy import CompressionView, Phase, Policy, make_policy

AXES = ("selection", "storage", "method")


class Composed(Policy):
    """At most one policy per axis; the selection decides what is kept, the storage how."""

    summary = "one policy per axis, joined by kvx.compose"

    def __init__(self, *parts: Policy):
        by_axis: dict[str, Policy] = {}
        for part in parts:
            if part.axis in by_axis:
                raise ValueError(
                    f"kvx.compose: {by_axis[part.axis].name} and {part.name} both answer the {part.axis} axis; "
                    f"compose at most one policy per axis ({', '.join(AXES)})"
                )
            by_axis[part.axis] = part
        if not by_axis:
            raise ValueError("kvx.compose needs at least one policy")
        self.parts = tuple(by_axis[axis] for axis in AXES if axis in by_axis)
        self.selection = by_axis.get("selection")
        self._check_storage(by_axis.get("storage"))

    def _check_storage(self, storage_part: Policy | None) -> None:
        needed = self.selection.storage if self.selection is not None else "dense"
        given = storage_part.storage if storage_part is not None else needed
        if needed != "dense" and given != needed:
            raise ValueError(
                f"kvx.compose: {self.selection.name} keeps different counts per head and needs {needed} storage, "
                f"not {storage_part.name}"
            )
        self._storage = given

    @property
    def name(self) -> str:  # type: ignore[override]
        return "+".join(part.name for part in self.parts)

    @property
    def storage(self) -> str:  # type: ignore[override]
        return self._storage

    def select_mask(self, view: CompressionView) -> torch.Tensor | None:
        return None if self.selection is None else self.selection.select_mask(view)

    def wants_view(self, phase: Phase) -> bool:
        return self.selection is not None and self.selection.wants_view(phase)

    def attention_method(self) -> Any:
        return next((m for m in (part.attention_method() for part in self.parts) if m is not None), None)

    def check_model(self, num_layers: int) -> None:
        for part in self.parts:
            part.check_model(num_layers)

    def describe(self) -> str:
        return "+".join(part.describe() for part in self.parts)

    def __repr__(self) -> str:
        return f"kvx.compose({', '.join(repr(part) for part in self.parts)})"


def compose(*policies: Policy | str, **options: Any) -> Composed:
    """Join policies (objects, or registered names with no options) into one, at most one per axis."""
    if options:
        raise TypeError(f"kvx.compose takes policy objects; set options {sorted(options)} on them (kvx.make_policy)")
    return Composed(*(make_policy(policy) for policy in policies))
