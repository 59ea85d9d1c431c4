"""The grid of a sweep: cells (one policy on one benchmark at one length), the policies a ratio and
the grid's options make of each listed one, and the shards the cells split into."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any

from kvx.eval.needle import DENSE, PolicyRun, safe_filename
from kvx.policy import policy_class


@dataclass(frozen=True)
class Cell:
    """One policy on one benchmark at one length; ``line`` is the policy without its ratio (one line
    per policy in the plots), ``ratio`` the compression ratio it was given (None: not applicable),
    ``settings`` a digest of the benchmark's settings (a changed setting makes new cells, never
    reuses rows measured with the old one)."""

    benchmark: str
    length: int
    policy: str
    line: str
    ratio: float | None = None
    settings: str = ""

    @property
    def key(self) -> tuple[str, int, str, str]:
        return (self.benchmark, self.length, self.policy, self.settings)

    @property
    def slug(self) -> str:
        return safe_filename(f"{self.benchmark}-{self.length}-{self.policy}-{self.settings}")


def row_key(row: dict[str, Any]) -> tuple[str, int, str, str]:
    """The :attr:`Cell.key` of a results row."""
    return (row["benchmark"], row["length"], row["policy"], row.get("settings", ""))


def _option_names(name: str) -> dict[str, Any]:
    """A registered policy's options and their defaults."""
    return {o["name"]: o["default"] for o in policy_class(name).options()}


def with_options(run: PolicyRun, options: dict[str, Any]) -> PolicyRun:
    """``run`` with each option given to every part that has it and does not set it itself."""

    def one(part: PolicyRun) -> PolicyRun:
        if part.name == DENSE:
            return part
        known = _option_names(part.name)
        extra = {k: v for k, v in options.items() if k in known and k not in part.options}
        return dataclasses.replace(part, options={**part.options, **extra},
                                   composed=tuple(one(p) for p in part.composed))

    return one(run)


def with_ratio(run: PolicyRun, ratio: float, length: int) -> PolicyRun | None:
    """``run`` compressed by ``ratio`` at ``length`` tokens, or None when no part of it takes a ratio:
    a part with a ``ratio`` option gets it (unless it sets budget or ratio itself); a selection with
    only ``sink`` and ``window`` (streaming_llm) keeps ``(1 - ratio) x length`` tokens, sink included."""
    changed = False

    def one(part: PolicyRun) -> PolicyRun:
        nonlocal changed
        rest = tuple(one(p) for p in part.composed)
        if part.name == DENSE:
            return part
        known, options = _option_names(part.name), dict(part.options)
        if "ratio" in known and not {"ratio", "budget"} & set(options):
            options["ratio"] = ratio
        elif {"sink", "window"} <= set(known) and "ratio" not in known and policy_class(part.name).axis == "selection":
            sink = options.get("sink", known["sink"])
            options["window"] = max(1, round((1 - ratio) * length) - sink)
        else:
            return dataclasses.replace(part, composed=rest)
        changed = True
        return dataclasses.replace(part, options=options, composed=rest)

    result = one(run)
    return result if changed else None


def expand(policies: list[PolicyRun], options: dict[str, list], ratios: list[float], benchmarks: list[str],
           lengths: dict[str, list[int]], settings: dict[str, str] | None = None) -> list[Cell]:
    """Every cell of the grid, in a fixed order (benchmark, length, policy, option combination,
    ratio), dense first and each cell once; ``settings``: each benchmark's settings digest."""
    combos = [dict(zip(options, values)) for values in itertools.product(*options.values())] or [{}]
    cells: dict[tuple, Cell] = {}
    for bench in benchmarks:
        digest = (settings or {}).get(bench, "")
        for length in lengths[bench]:
            dense = Cell(bench, length, DENSE, DENSE, settings=digest)
            cells.setdefault(dense.key, dense)
            for run, combo in itertools.product(policies, combos):
                base = with_options(run, combo)
                for ratio in ratios or [None]:
                    ratioed = with_ratio(base, ratio, length) if ratio is not None else None
                    cell = Cell(bench, length, (ratioed or base).label, base.label, ratio if ratioed else None, digest)
                    cells.setdefault(cell.key, cell)
    return list(cells.values())


def shard(cells: list, rank: int, world: int) -> list:
    """The cells of shard ``rank`` of ``world``: every ``world``-th, starting at ``rank``."""
    if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
        raise ValueError(f"shard rank {rank!r} of world {world!r}: need 0 <= rank < world")
    return [cell for index, cell in enumerate(cells) if index % world == rank]
