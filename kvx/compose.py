"""``kvx.compose``: one policy per axis (selection, storage, method) joined into one policy.

    policy = kvx.compose(kvx.make_policy("snapkv", budget=1024), kvx.make_policy("ragged"))
    kvx.patch(model, policy)

The result is an ordinary policy: it has a name (``snapkv+ragged``), ``describe()``, and is
accepted wherever a policy is. Two policies on one axis, or a selection that needs another storage
than the one given, raise a ``ValueError`` that names them. The one exception: the method axis
takes a prefill method and a decode method together (``vertical_slash+quest``: block-sparse
prefill, then page-sparse decode; :attr:`kvx.methods.base.Method.serves` says which phase a
method serves), never two methods for one phase.

``kvx.patch`` runs every policy through a :class:`Composed`: a selection alone is composed with the
storage it needs (``head_budget`` with ``ragged``, the others with dense storage), so the storage
kind of a patch always comes from its storage axis. On the command line and in configs a
composition is written ``snapkv:budget=1024+ragged`` (:func:`from_spec`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from kvx.methods.base import methods_serving, phases
from kvx.methods.by_phase import ByPhase
from kvx.policy import CompressionView, Phase, Policy, make_policy

AXES = ("selection", "storage", "method")


class Composed(Policy):
    """At most one policy per axis; the selection decides what is kept, the storage how."""

    summary = "one policy per axis, joined by kvx.compose"

    def __init__(self, *parts: Policy):
        by_axis: dict[str, list[Policy]] = {}
        for part in parts:
            given = by_axis.setdefault(part.axis, [])
            if given and part.axis != "method":
                raise ValueError(
                    f"kvx.compose: {given[0].name} and {part.name} both answer the {part.axis} axis; "
                    f"compose at most one policy per axis ({', '.join(AXES)}; the method axis takes one prefill "
                    "and one decode method)"
                )
            given.append(part)
        if not by_axis:
            raise ValueError("kvx.compose needs at least one policy")
        if "method" in by_axis:
            by_axis["method"] = _methods_by_phase(by_axis["method"])
        self.parts = tuple(part for axis in AXES for part in by_axis.get(axis, ()))
        self.implied: tuple[Policy, ...] = ()  # parts added because the selection needs them
        self.selection = by_axis.get("selection", [None])[0]
        self._check_storage(by_axis.get("storage", [None])[0])
        for part in self.parts:
            check = getattr(part, "check_composition", None)
            if check is not None:  # a method that cannot serve some selections or storage kinds (tidal)
                check(self.selection, self.storage_part)

    def _check_storage(self, storage_part: Policy | None) -> None:
        """Fill the storage axis with what the selection needs when none is given (a selection's
        ``storage`` names the kind it requires), and refuse a storage the selection cannot use."""
        needed = self.selection.storage if self.selection is not None else "dense"
        if storage_part is None and needed != "dense":
            storage_part = make_policy(needed)
            self.implied = (storage_part,)
            self.parts = tuple(sorted(self.parts + self.implied, key=lambda part: AXES.index(part.axis)))
        if needed == "ragged" and getattr(storage_part, "ragged", None) is False:  # quantized, per head unpadded
            storage_part = dataclasses.replace(storage_part, ragged=True)
            self.parts = tuple(storage_part if part.axis == "storage" else part for part in self.parts)
        given = storage_part.storage if storage_part is not None else "dense"
        if getattr(storage_part, "ragged", False) is True:
            given = "ragged"
        if needed != "dense" and given != needed:
            raise ValueError(
                f"kvx.compose: {self.selection.name} needs {needed} storage, not {storage_part.name} "
                f"({storage_part.storage}); compose it with {needed}, or with no storage policy to get {needed}'s defaults"
            )
        self.storage_part = storage_part
        check = getattr(storage_part, "check_selection", None)
        if check is not None:  # e.g. a full-precision window that holds every token the selection keeps
            check(self.selection)

    @property
    def name(self) -> str:  # type: ignore[override]
        """The parts the user gave, joined by ``+`` (storage a selection implies is not named)."""
        return "+".join(part.name for part in self.parts if not any(part is implied for implied in self.implied))

    @property
    def storage(self) -> str:  # type: ignore[override]
        """The storage of a patch with this policy: ``dense``, or the storage part's spec with every
        option (``ragged``, ``kivi:bits=4,group=32,window=128,sink=0``), which ``kvx.KVCache`` takes."""
        return "dense" if self.storage_part is None else to_spec(self.storage_part)

    def select_mask(self, view: CompressionView) -> torch.Tensor | None:
        return None if self.selection is None else self.selection.select_mask(view)

    def wants_view(self, phase: Phase) -> bool:
        return self.selection is not None and self.selection.wants_view(phase)

    def wants_view_at(self, phase: Phase, seen: int) -> bool:
        return self.selection is not None and self.selection.wants_view_at(phase, seen)

    def reads_column_sums(self, phase: Phase) -> bool:
        return self.selection is not None and self.selection.reads_column_sums(phase)

    def attention_method(self) -> Any:
        """The method of the method part; of two (a prefill and a decode one), both joined by phase."""
        methods = [method for method in (part.attention_method() for part in self.parts) if method is not None]
        if len(methods) < 2:
            return methods[0] if methods else None
        prefill, decode = methods  # ordered by _methods_by_phase
        return ByPhase(prefill, decode)

    def check_model(self, num_layers: int) -> None:
        for part in self.parts:
            part.check_model(num_layers)

    def prepare(self, model: Any) -> None:
        for part in self.parts:
            part.prepare(model)

    def describe(self) -> str:
        return "+".join(part.describe() for part in self.parts)

    def axes(self) -> dict[str, str]:
        """Which policy answers each axis (``dense`` where none is given; a prefill and a decode
        method joined by ``+``: ``vertical_slash+quest``)."""
        return {axis: "+".join(part.name for part in self.parts if part.axis == axis) or "dense" for axis in AXES}

    def __repr__(self) -> str:
        return f"kvx.compose({', '.join(repr(part) for part in self.parts)})"


def _methods_by_phase(methods: list[Policy]) -> list[Policy]:
    """``methods`` (method policies) ordered prefill first, or a ``ValueError`` naming two that serve
    the same phase (:attr:`kvx.methods.base.Method.serves`) and the methods of each phase."""
    if len(methods) == 1:
        return methods
    serves = [getattr(method.attention_method(), "serves", "all") for method in methods]
    for i, first in enumerate(methods):
        for second, second_serves in zip(methods[i + 1:], serves[i + 1:]):
            shared = [phase for phase in phases(serves[i]) if phase in phases(second_serves)]
            if shared:
                raise ValueError(
                    f"kvx.compose: {first.name} and {second.name} both answer the method axis at {shared[0]} "
                    f"({first.name} serves {serves[i]}, {second.name} serves {second_serves}); compose at most one "
                    f"prefill method ({', '.join(methods_serving('prefill'))}) with one decode method "
                    f"({', '.join(methods_serving('decode'))})"
                )
    order = {"prefill": 0, "decode": 1}
    return [method for _, method in sorted(zip(serves, methods), key=lambda pair: order[pair[0]])]


def compose(*policies: Policy | str, **options: Any) -> Composed:
    """Join policies (objects, or registered names with no options) into one, at most one per axis."""
    if options:
        raise TypeError(f"kvx.compose takes policy objects; set options {sorted(options)} on them (kvx.make_policy)")
    return Composed(*(make_policy(policy) for policy in policies))


def as_composed(policy: Policy) -> Composed:
    """``policy`` itself if composed, else it alone with the storage it needs (what ``patch`` runs)."""
    return policy if isinstance(policy, Composed) else Composed(policy)


def to_spec(policy: Policy) -> str:
    """The spec :func:`from_spec` reads back into an equal policy: ``name:key=value,...``, every option."""
    options = ",".join(f"{o['name']}={_spec_value(getattr(policy, o['name']))}" for o in policy.options())
    return f"{policy.name}:{options}" if options else policy.name


def _spec_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    text = str(value)
    if any(c in text for c in ",+:="):
        raise ValueError(f"option value {value!r} cannot be written in a policy spec (it contains , + : or =)")
    return text


def from_spec(text: str) -> Policy:
    """The policy a spec names: ``snapkv:budget=1024,window=32+ragged`` (parts joined by ``+``, each
    ``name[:key=value,...]``), one part alone, or composed."""
    parts = [make_policy(name, **options) for name, options in parse_spec(text)]
    return parts[0] if len(parts) == 1 else compose(*parts)


def parse_spec(text: str) -> list[tuple[str, dict[str, Any]]]:
    """``name[:k=v,...][+name[:k=v,...]...]`` -> ``[(name, options), ...]``."""
    if not text.strip():
        raise ValueError("an empty policy spec; write name[:key=value,...][+name...], e.g. snapkv:budget=1024+ragged")
    return [parse_part(part) for part in text.split("+")]


def parse_part(text: str) -> tuple[str, dict[str, Any]]:
    """``name:k=v,...`` -> ``(name, options)``."""
    name, _, inline = text.partition(":")
    if not name.strip():
        raise ValueError(f"a policy spec part without a name: {text!r}; write name[:key=value,...]")
    return name.strip().lower().replace("-", "_"), dict(split_option(o) for o in inline.split(",") if o.strip())


def split_option(text: str) -> tuple[str, Any]:
    """``key=value`` -> ``(key, parsed value)``."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"options are written key=value, got {text!r}")
    return key.strip(), parse_value(value)


def parse_value(text: str) -> Any:
    """Option values from the command line: int, float, true/false, none, else the string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
