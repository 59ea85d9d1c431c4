"""Policy base classes, the view a policy decides on, and the registry of named policies.

A policy decides which stored tokens a layer keeps. kvx calls it from its attention function
right after attention for the new tokens has been computed (so the tokens being processed
always see the full context they are entitled to), and then frees every token it dropped.

Adding a policy: one file in ``kvx/policies/``, a dataclass deriving from
:class:`EvictionPolicy`, decorated with :func:`register_policy`. A policy that overrides
``select_mask`` may also override ``wants_view`` to let kvx skip phases where it never acts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

Phase = Literal["prefill", "decode", "extend"]
"""``prefill``: the first forward into an empty layer; ``decode``: one new token;
``extend``: several new tokens appended to a non-empty layer."""

_REGISTRY: dict[str, type[Policy]] = {}


@dataclass
class CompressionView:
    """What a policy sees when it decides which tokens of one layer to keep.

    Shapes: ``B`` batch, ``H`` query heads, ``Hkv`` KV heads, ``q`` new tokens, ``S`` stored
    tokens including the new ones, ``D`` head dim.

    Attributes:
        query: ``[B, H, q, D]`` queries of the new tokens, RoPE (and any q-norm) applied.
        keys: ``[B, Hkv, S, D]`` stored keys in temporal order, new tokens last.
        values: ``[B, Hkv, S, D]`` stored values.
        valid: ``[B, Hkv, S]`` bool, False where a slot holds padding rather than a token.
        attention_mask: ``[B, 1|H, q, S]`` bool (True = may attend) used for the new queries,
            or None for plain causal attention with nothing masked.
        phase: see :data:`Phase`.
        layer_idx: index of the decoder layer.
        scaling: the softmax scale the model used.
        softcap: attention logit soft-capping of the model (Gemma 2), or None.
        num_seen: tokens this layer has been given in total (stored or evicted), padding included.
        seen_per_row: ``[B]`` real tokens each row has given this layer (None: ``num_seen`` each).
        mask_rows: builds the mask of the last ``n`` new queries on demand, where a full
            ``attention_mask`` would be large (ragged storage); :meth:`query_mask` uses it.
        column_sums: ``[B, Hkv, G, S]`` float32 attention each stored token received from the new
            queries in this step's attention (``G`` query heads per KV head), when the attention
            pass computed it for a policy that :meth:`Policy.reads_column_sums`; None otherwise
            (the policy computes it with :func:`kvx.kernels.column_sums.attention_column_sums`).
        num_layers: decoder layers of the model.
        state: per-token policy state of this layer, name -> ``[B, Hkv, S]`` tensor; the cache
            keeps it aligned with the stored tokens (zeros for new ones, gathered on eviction).
    """

    query: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor
    attention_mask: torch.Tensor | None
    phase: Phase
    layer_idx: int
    scaling: float
    softcap: float | None = None
    num_seen: int = 0
    num_layers: int = 1
    state: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    seen_per_row: torch.Tensor | None = None
    mask_rows: Callable[[int], torch.Tensor] | None = None
    column_sums: torch.Tensor | None = None

    def real_seen(self) -> torch.Tensor:
        """``[B]`` real (non-padding) tokens each row has given this layer, evicted ones included."""
        if self.seen_per_row is not None:
            return self.seen_per_row
        return torch.full((self.keys.shape[0],), self.num_seen, dtype=torch.long, device=self.keys.device)

    @property
    def num_stored(self) -> int:
        return self.keys.shape[-2]

    def query_mask(self, last: int) -> torch.Tensor:
        """Bool mask ``[B|1, 1|H, last, S]`` of the keys each of the last ``last`` new queries may see."""
        if self.mask_rows is not None:
            return self.mask_rows(last)
        if self.attention_mask is not None:
            return self.attention_mask[..., -last:, :]
        num_stored, device = self.num_stored, self.keys.device
        # query i (of the last ones) sits at stored position num_stored - last + i
        query_pos = torch.arange(num_stored - last, num_stored, device=device)[:, None]
        return (torch.arange(num_stored, device=device)[None, :] <= query_pos)[None, None]


def option(default: Any, help: str) -> Any:
    """A dataclass field that carries a one-line description for ``kvx policies``."""
    return dataclasses.field(default=default, metadata={"help": help})


class Policy:
    """Base of every policy. Subclasses are dataclasses whose fields are the options.

    Options are checked where they are set: :meth:`validate` runs at construction and again on
    every assignment to an option (``policy.budget = 0`` raises and leaves the old value), so a
    policy object, patched or not, never holds options that break its promises.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    axis: ClassVar[str] = "selection"
    """Which question the policy answers (``kvx.compose`` joins one per axis): ``selection`` (which
    tokens each head keeps), ``storage`` (how they are held) or ``method`` (which query-key pairs
    attention computes)."""
    storage: ClassVar[str] = "dense"
    """On a selection, the storage kind it needs: ``dense`` where every KV head keeps the same number
    of tokens, ``ragged`` where heads keep their own (``kvx.compose``, and so ``kvx.patch``, adds
    that storage policy when none is given). On a storage policy, the kind it provides."""

    def validate(self) -> None:
        """Raise a ``ValueError`` / ``TypeError`` naming the option, its value and the valid choices
        unless the options are consistent. Subclasses extend it (calling ``super().validate()``)."""

    def __post_init__(self) -> None:
        self._validate_quietly()
        object.__setattr__(self, "_kvx_validated", True)

    def _validate_quietly(self) -> None:
        """Run :meth:`validate`; what it assigns (a normalised option, a derived attribute) is stored
        as is, without validating again."""
        object.__setattr__(self, "_kvx_validating", True)
        try:
            self.validate()
        finally:
            object.__setattr__(self, "_kvx_validating", False)

    def __setattr__(self, name: str, value: Any) -> None:
        """Assigning an option re-validates the policy; an invalid value raises and is not kept. A
        name that is not an option (``policy.bugdet = 8``) raises rather than being ignored.
        Inside :meth:`validate`, assignments are stored as they are."""
        if name.startswith("_") or not self.__dict__.get("_kvx_validated") or self.__dict__.get("_kvx_validating"):
            object.__setattr__(self, name, value)
            return
        options = [f.name for f in dataclasses.fields(self)]  # type: ignore[arg-type]
        if name not in options:
            raise AttributeError(f"{self.name} has no option {name!r}; its options: {', '.join(options)}")
        previous = getattr(self, name)
        object.__setattr__(self, name, value)
        try:
            self._validate_quietly()
        except Exception:
            object.__setattr__(self, name, previous)
            self._validate_quietly()  # rebuild what validate derives (a scorer) from the restored options
            raise

    def select_mask(self, view: CompressionView) -> torch.Tensor | None:
        """``keep [B, Hkv, S]`` bool over the stored tokens, or None to keep everything.

        Decisions are per row (a row compresses when *its* real tokens exceed *its* capacity),
        so a row gets the same result alone as in a padded batch.
        """
        raise NotImplementedError

    def wants_view(self, phase: Phase) -> bool:
        """Whether :meth:`select_mask` reads the view in ``phase``. False is a promise that it would
        return None without looking (no statistics to update, nothing to evict), so kvx skips
        building the view: for ragged storage that is a copy of the whole layer per forward."""
        return True

    def wants_view_at(self, phase: Phase, seen: int) -> bool:
        """:meth:`wants_view` for a layer that has now seen ``seen`` tokens (new ones included): a
        policy that acts only every N tokens answers False in between, so kvx builds no view then."""
        return self.wants_view(phase)

    def reads_column_sums(self, phase: Phase) -> bool:
        """Whether :meth:`select_mask` reads the attention's column sums in ``phase`` (H2O): the
        attention pass then computes them with its output, in one pass over the logits where that
        is faster (CPU), and hands them over as ``view.column_sums``."""
        return False

    def select(self, view: CompressionView) -> torch.Tensor | None:
        """Indices ``[B, Hkv, K]`` (ascending) of the tokens to keep, where every row and head keeps
        the same number (a convenience over :meth:`select_mask`)."""
        keep = self.select_mask(view)
        if keep is None:
            return None
        indices, slot_valid = mask_to_indices(keep)
        if not bool(slot_valid.all()):
            raise ValueError("rows or heads keep different numbers of tokens: use select_mask")
        return indices

    @classmethod
    def options(cls) -> list[dict[str, Any]]:
        """The options of this policy: name, default and help of each dataclass field."""
        return [
            {"name": f.name, "default": f.default, "help": f.metadata.get("help", "")}
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        ]

    def attention_method(self) -> Any:
        """The ``kvx.methods.Method`` this policy computes attention with, or None for dense."""
        return None

    def check_model(self, num_layers: int) -> None:
        """Raise if the policy cannot serve a model of ``num_layers`` layers (called by ``patch``)."""

    def prepare(self, model: Any) -> None:
        """Called by ``patch`` with the model before patching it: raise if the policy cannot serve this
        model (a head pattern profiled on another one), or reset what it learned on another model."""

    def describe(self) -> str:
        opts = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))  # type: ignore[arg-type]
        return f"{self.name}({opts})"


class StoragePolicy(Policy):
    """A policy that only chooses how kept tokens are stored (a storage kind of ``kvx.storage``),
    keeping everything by itself; compose it with a selection: ``kvx.compose(snapkv, ragged)``."""

    axis: ClassVar[str] = "storage"

    def select_mask(self, view: CompressionView) -> torch.Tensor | None:
        return None

    def wants_view(self, phase: Phase) -> bool:
        return False


class MethodPolicy(Policy):
    """A policy that only chooses which (query, key) pairs attention computes (a method of
    ``kvx.methods``), storing and keeping everything by itself; compose it with a selection."""

    axis: ClassVar[str] = "method"

    def make_method(self) -> Any:
        """A new ``kvx.methods.Method`` configured by this policy's options."""
        raise NotImplementedError

    def attention_method(self) -> Any:
        return self.make_method()

    def select_mask(self, view: CompressionView) -> torch.Tensor | None:
        return None

    def wants_view(self, phase: Phase) -> bool:
        return False


class EvictionPolicy(Policy):
    """A policy that keeps the ``capacity`` best-scored tokens of a layer.

    Subclasses give :meth:`score` and :meth:`capacity`, say in :attr:`phases` when they compress,
    and may keep running statistics in :meth:`observe`. Padding slots are never kept as content:
    their score is forced to ``-inf``, so they are the first to go.
    """

    phases: ClassVar[tuple[Phase, ...]] = ("prefill", "extend")
    scores_rank_tokens: ClassVar[bool] = True
    """False where scores are a positional rule rather than an importance (StreamingLLM): such a
    policy cannot drive a head-budget allocation."""

    def capacity(self, view: CompressionView) -> torch.Tensor:
        """``[B]`` tokens each row keeps (per KV head) when it compresses."""
        raise NotImplementedError

    def always_kept(self) -> int:
        """Tokens every (row, KV head) keeps whatever the scores (a window): no capacity goes below it."""
        return 0

    def observe(self, view: CompressionView) -> None:
        """Called at every forward, before any eviction: update running statistics in ``view.state``."""

    def observes(self) -> bool:
        """Whether :meth:`observe` keeps running statistics (then every forward needs the view)."""
        return type(self).observe is not EvictionPolicy.observe

    def wants_view(self, phase: Phase) -> bool:
        if not self._decides_like_the_library():
            return True  # a subclass with its own triggered / select_mask may act in any phase
        return self.observes() or phase in self.phases

    def _decides_like_the_library(self) -> bool:
        cls = type(self)
        return cls.select_mask is EvictionPolicy.select_mask and cls.triggered in (
            EvictionPolicy.triggered, BudgetedPolicy.triggered)

    def score(self, view: CompressionView) -> torch.Tensor:
        """``[B, Hkv, S]`` float importance of each stored token (``+inf`` = must keep)."""
        raise NotImplementedError

    def triggered(self, view: CompressionView, real: torch.Tensor, capacity: torch.Tensor) -> torch.Tensor:
        """Which ``[B, Hkv]`` (row, head) compress now, given their real token counts and capacities."""
        if view.phase not in self.phases:
            return torch.zeros_like(real, dtype=torch.bool)
        return past_capacity(real, capacity)

    def select_mask(self, view: CompressionView) -> torch.Tensor | None:
        self.observe(view)
        real = view.valid.sum(-1)  # [B, Hkv]
        capacity = self.capacity(view).to(real.device)[:, None].expand_as(real)
        compress = self.triggered(view, real, capacity)
        if not bool(compress.any()):
            return None
        scores = self.score(view).float().masked_fill(~view.valid, -math.inf)
        count = torch.where(compress, capacity, real)  # rows that do not compress keep all they have
        return (token_ranks(scores) < count[..., None]) & view.valid


def capacity_tensor(view: CompressionView, budget: int) -> torch.Tensor:
    return torch.full((view.keys.shape[0],), budget, dtype=torch.long, device=view.keys.device)


def past_capacity(real: torch.Tensor, capacity: torch.Tensor | int, interval: int = 1) -> torch.Tensor:
    """Where ``real`` token counts call for compressing back to ``capacity``: ``interval`` or more
    tokens past it (1: as soon as they exceed it). Compressing by this rule, a row never holds more
    than ``capacity + interval - 1`` tokens after a step (``decode_interval``'s promise)."""
    return real >= capacity + interval


@dataclass
class BudgetedPolicy(EvictionPolicy):
    """Budget mechanics every scoring policy shares.

    - ``budget``: tokens kept per layer and KV head; a budget at or above what a layer holds is a
      no-op (nothing is scored or evicted);
    - ``ratio``: when set, replaces ``budget`` with ``ceil((1 - ratio) * tokens seen)`` per row,
      kvpress's "compression ratio" (0.75 keeps a quarter);
    - ``decode_interval``: 0 compresses prompts only; N > 0 also compresses while generating,
      whenever a row has grown N tokens past its capacity, so it never holds more than
      ``capacity + N - 1`` tokens after a step.
    """

    budget: int = option(1024, "tokens kept per layer and KV head (a budget above the length keeps all)")
    ratio: float | None = option(None, "fraction of tokens to evict, in [0, 1); replaces budget when set "
                                       "(never below the tokens the policy always keeps)")
    decode_interval: int = option(0, "also compress while generating, every N tokens past capacity (0: prompt only)")

    always_kept_option: ClassVar[str | None] = None
    """The option that counts tokens every head always keeps (a window, recent tokens), or None: it
    must fit in the budget, and a ratio never keeps fewer."""
    always_kept_minimum: ClassVar[int] = 0
    """The smallest value the always-kept option takes (0: none need be kept)."""

    def validate(self) -> None:
        super().validate()
        check_positive_int(self.name, "budget", self.budget)
        if self.ratio is not None:
            check_number(self.name, "ratio", self.ratio, low=0, high=1, high_open=True)
        check_positive_int(self.name, "decode_interval", self.decode_interval, minimum=0)
        if self.always_kept_option is not None:
            self.check_always_kept(self.always_kept_option, minimum=self.always_kept_minimum)

    def always_kept(self) -> int:
        return getattr(self, self.always_kept_option) if self.always_kept_option is not None else 0

    def capacity(self, view: CompressionView) -> torch.Tensor:
        if self.ratio is None:
            return capacity_tensor(view, self.budget)
        return torch.ceil((1 - self.ratio) * view.real_seen().double()).long().clamp(min=max(1, self.always_kept()))

    def wants_view(self, phase: Phase) -> bool:
        return super().wants_view(phase) or (phase == "decode" and self.decode_interval > 0)

    def check_always_kept(self, option_name: str, minimum: int = 0) -> None:
        """Raise unless option ``option_name`` (tokens every head always keeps: a window, recent
        tokens) is an int >= ``minimum`` that fits in the budget."""
        value = getattr(self, option_name)
        check_positive_int(self.name, option_name, value, minimum=minimum)
        if self.ratio is None and value > self.budget:
            raise ValueError(
                f"{self.name}: {option_name} ({value}) must not exceed budget ({self.budget}): "
                f"the {option_name} tokens are always kept, so they have to fit in the budget"
            )

    def triggered(self, view: CompressionView, real: torch.Tensor, capacity: torch.Tensor) -> torch.Tensor:
        if view.phase == "decode":
            if self.decode_interval <= 0:
                return torch.zeros_like(real, dtype=torch.bool)
            return past_capacity(real, capacity, self.decode_interval)
        return super().triggered(view, real, capacity)


def token_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Rank of every token within its (row, head), best first ``[B, Hkv, S]``.

    Ties go to the more recent token, so ranks depend only on positions counted from the newest
    token: a row ranks its tokens the same alone as in a left-padded batch.
    """
    order = scores.flip(-1).sort(dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return ranks.flip(-1)


def mask_to_indices(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``keep [B, Hkv, S]`` -> ``(indices [B, Hkv, W], slot_valid [B, Hkv, W])``, ``W`` the largest
    count; kept tokens in ascending order, right-aligned (left-padded with invalid slots) like a
    left-padded batch. Padding slots point at token 0.

    Linear in ``S`` (a running count places each kept token in its slot; no sort), since eviction
    at every decode step calls it on the whole layer."""
    counts = keep.sum(-1, keepdim=True)  # [B, Hkv, 1]
    width = int(counts.max()) if keep.numel() else 0
    slot = keep.long().cumsum(-1) - 1 + (width - counts)  # where each kept token lands
    slot = torch.where(keep, slot, width)  # dropped tokens go to a spill slot past the end
    positions = torch.arange(keep.shape[-1], device=keep.device).expand_as(slot)
    indices = torch.zeros(*keep.shape[:-1], width + 1, dtype=torch.long, device=keep.device)
    indices.scatter_(-1, slot, positions)
    slot_valid = torch.arange(width, device=keep.device) >= (width - counts)
    return indices[..., :width], slot_valid


def check_positive_int(policy: str, name: str, value: Any, minimum: int = 1) -> None:
    """Raise a clear error unless ``value`` is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{policy}: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{policy}: {name} must be >= {minimum}, got {value}")


def check_number(policy: str, name: str, value: Any, low: float | None = None, high: float | None = None,
                 high_open: bool = False, low_open: bool = False) -> None:
    """Raise a clear error unless ``value`` is a real number within the given bounds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise TypeError(f"{policy}: {name} must be a number, got {type(value).__name__} {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        interval = (("(" if low_open else "[") + ("-inf" if low is None else f"{low:g}") + ", "
                    + ("inf" if high is None else f"{high:g}") + (")" if high_open or high is None else "]"))
        raise ValueError(f"{policy}: {name} must be a number in {interval}, got {value!r}")


def check_choice(policy: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raise a clear error unless ``value`` is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{policy}: {name} must be one of {', '.join(choices)}; got {value!r}")


def register_policy(cls: type[Policy]) -> type[Policy]:
    """Class decorator: make a policy reachable by its ``name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a policy named {cls.name!r} is already registered ({_REGISTRY[cls.name].__name__})")
    _REGISTRY[cls.name] = cls
    return cls


def policy_names() -> list[str]:
    return sorted(_REGISTRY)


def list_policies() -> list[dict[str, Any]]:
    """Every registered policy: ``{"name", "axis", "storage", "description", "options": [{"name",
    "default", "help"}]}`` (``storage``: the kind a selection needs, or a storage policy provides)."""
    return [
        {"name": name, "axis": _REGISTRY[name].axis, "storage": _REGISTRY[name].storage,
         "description": _REGISTRY[name].summary, "options": _REGISTRY[name].options()}
        for name in policy_names()
    ]


def policy_class(name: str) -> type[Policy]:
    """The registered class of a policy name (dashes and case ignored)."""
    key = name.lower().replace("-", "_")
    if key not in _REGISTRY:
        raise ValueError(f"unknown policy {name!r}; known policies: {', '.join(policy_names())}")
    return _REGISTRY[key]


def make_policy(policy: str | Policy, **options: Any) -> Policy:
    """A policy object from a registered name and options, or the given object itself."""
    if isinstance(policy, Policy):
        if options:
            raise TypeError(
                f"options {sorted(options)} were given with a policy object; set them on the object instead"
            )
        return policy
    if not isinstance(policy, str):
        raise TypeError(f"policy must be a name or a kvx Policy object, got {type(policy).__name__}")
    cls = policy_class(policy)
    key = cls.name
    valid = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"{key}: unknown option(s) {unknown}; valid options: {', '.join(valid)}")
    return cls(**options)
