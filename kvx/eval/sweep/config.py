"""A sweep's YAML read and checked: every key, policy, option, ratio and benchmark before any cell."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvx.eval.needle import DEFAULT_MODEL, DENSE, PolicyRun, nonempty_list, parse_length, yaml_policy
from kvx.eval.sweep.benchmarks import BENCHMARKS, Benchmark
from kvx.eval.sweep.grid import Cell, _option_names, expand

TOP_KEYS = {
    "model": "local model directory or hub id (default: kvx's shipped model)",
    "tokenizer": "tokenizer path, when not in the model directory",
    "dtype": "auto, float32, bfloat16, float16 (default auto)",
    "device": "cpu, cuda, ... (default: where from_pretrained puts it; one GPU per rank under torchrun)",
    "policies": "policy specs (name:key=value,...+name...) or {name: ..., key: value} mappings; dense is always run",
    "options": "{key: [values]}: every combination, each given to the policies that have the option",
    "ratios": "compression ratios (fraction of the KV removed), e.g. [0.25, 0.5, 0.75, 0.875]",
    "lengths": "context lengths in tokens (1k, 4k, ...)",
    "benchmarks": "list of {kind: needle | lm_eval | longbench, ...}",
}


@dataclass
class SweepConfig:
    """A sweep as its YAML describes it (see :data:`TOP_KEYS`); :func:`load_config` reads and checks one."""

    benchmarks: list[Benchmark]
    lengths: dict[str, list[int]]  # per benchmark name
    policies: list[PolicyRun] = field(default_factory=list)
    options: dict[str, list] = field(default_factory=dict)
    ratios: list[float] = field(default_factory=list)
    model: str = str(DEFAULT_MODEL)
    tokenizer: str | None = None
    dtype: str = "auto"
    device: str | None = None

    def cells(self) -> list[Cell]:
        return expand(self.policies, self.options, self.ratios, [b.name for b in self.benchmarks], self.lengths,
                      {b.name: b.digest for b in self.benchmarks})

    def benchmark(self, name: str) -> Benchmark:
        return next(b for b in self.benchmarks if b.name == name)


def load_config(path: str | Path) -> SweepConfig:
    """Read and check a sweep YAML: unknown keys (top level or in a benchmark), a policy that does not
    parse, an option no policy has, a ratio outside [0, 1), an unknown benchmark kind all raise,
    naming the key or value and the valid choices."""
    from kvx.eval.needle import read_yaml_mapping

    data = read_yaml_mapping(Path(path), TOP_KEYS)
    try:
        return _build_config(data)
    except (ValueError, TypeError) as err:
        raise type(err)(f"{path}: {err}") from None


def _build_config(data: dict[str, Any]) -> SweepConfig:
    lengths = [parse_length(n) for n in nonempty_list("lengths", data.get("lengths"))]
    policies = [yaml_policy(i, p) for i, p in enumerate(data.get("policies") or [])]
    policies = [p for p in policies if p.name != DENSE]  # dense is always run, once
    options = _grid_options(data.get("options") or {}, policies)
    ratios = [_ratio(r) for r in (data.get("ratios") or [])]
    benchmarks, per_bench = [], {}
    for index, entry in enumerate(nonempty_list("benchmarks", data.get("benchmarks"), distinct=False)):
        for bench in _benchmarks_of(index, entry):
            if bench.name in per_bench:
                raise ValueError(f"benchmarks[{index}]: a second benchmark named {bench.name!r}; give it another name")
            own = bench.settings.get("lengths")
            per_bench[bench.name] = [parse_length(n) for n in nonempty_list("lengths", own)] if own else lengths
            benchmarks.append(bench)
    known = {k: data[k] for k in ("model", "tokenizer", "dtype", "device") if data.get(k) is not None}
    return SweepConfig(benchmarks, per_bench, policies, options, ratios, **{k: str(v) for k, v in known.items()})


def _benchmarks_of(index: int, entry: Any) -> list[Benchmark]:
    """The benchmarks of one ``benchmarks`` entry, its keys checked against its kind's."""
    if isinstance(entry, str):
        entry = {"kind": entry}
    if not isinstance(entry, dict) or entry.get("kind") not in BENCHMARKS:
        kind = entry.get("kind") if isinstance(entry, dict) else entry
        raise ValueError(f"benchmarks[{index}]: unknown kind {kind!r}; choose from {', '.join(BENCHMARKS)}")
    kind = BENCHMARKS[entry["kind"]]
    valid = {"kind", "name", "lengths", *kind.keys}
    unknown = sorted(str(k) for k in set(entry) - valid)
    if unknown:
        raise ValueError(f"benchmarks[{index}] ({entry['kind']}): unknown key(s) {unknown}; "
                         f"valid keys: {', '.join(sorted(valid))}")
    try:
        return kind.expand(entry)
    except (ValueError, TypeError) as err:
        raise type(err)(f"benchmarks[{index}] ({entry['kind']}): {err}") from None


def _grid_options(options: Any, policies: list[PolicyRun]) -> dict[str, list]:
    """``options: {key: [values]}``, each key an option of at least one listed policy."""
    if not isinstance(options, dict):
        raise ValueError(f"options must be a mapping {{key: [values]}}, got {options!r}")
    names = {part.name for run in policies for part in (run, *run.composed)}
    grid = {}
    for key, values in options.items():
        if not any(key in _option_names(name) for name in names):
            raise ValueError(f"options: {key!r} is an option of none of the listed policies ({', '.join(sorted(names))})")
        grid[str(key)] = nonempty_list(f"options.{key}", values if isinstance(values, list) else [values])
    return grid


def _ratio(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"ratios: {value!r} is not a compression ratio in [0, 1) (the fraction of the KV removed)")
    return float(value)
