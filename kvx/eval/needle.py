"""``kvx needle``: needle-in-a-haystack accuracy of dense and compressed KV caches, side by side.

Every policy in a run answers the same prompts (a cell = length x depth x variant x sample, its
prompt seeded by the cell), greedy, scored by exact match. Each finished cell is appended to
``results.jsonl`` at once, so an interrupted run keeps what it did, and a rerun with the same
output directory skips finished cells and repeats none.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import kvx
from kvx.cache import cache_nbytes
from kvx.compat import cache_kwargs, cache_of
from kvx.compose import parse_spec, split_option
from kvx.eval.haystack import VARIANTS, PromptTemplate, build_prompt, make_needles, score_answer
from kvx.policy import Policy, make_policy, policy_class

DENSE = "dense"
COMPRESS_MODES = ("prompt", "context")
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "assets" / "needle-llama"


@dataclass(frozen=True)
class PolicyRun:
    """A policy to evaluate: ``dense`` or a registered name, with options, and any policies composed
    with it (``snapkv:budget=256+ragged``: one per axis, see ``kvx.compose``). ``label`` names it in
    results."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    composed: tuple[PolicyRun, ...] = ()

    @property
    def label(self) -> str:
        own = self.name if not self.options else (
            self.name + ":" + ",".join(f"{k}={v}" for k, v in sorted(self.options.items())))
        return "+".join([own] + [part.label for part in self.composed])

    def policy(self) -> Policy:
        """The policy object to patch with (raises with the valid choices on a bad name or option)."""
        own = make_policy(self.name, **self.options)
        return kvx.compose(own, *(part.policy() for part in self.composed)) if self.composed else own

    def validate(self) -> None:
        if self.name != DENSE:
            self.policy()


@dataclass(frozen=True)
class Cell:
    length: int
    depth: float
    variant: str
    sample: int

    @property
    def seed(self) -> int:
        return zlib.crc32(f"{self.length}/{self.depth}/{self.variant}/{self.sample}".encode())


@dataclass
class NeedleConfig:
    lengths: list[int]
    depths: list[float] = field(default_factory=lambda: [0, 25, 50, 75, 100])
    variants: list[str] = field(default_factory=lambda: ["single"])
    samples: int = 1
    policies: list[PolicyRun] = field(default_factory=lambda: [PolicyRun(DENSE)])
    distractors: int = 2
    values: int = 3
    max_new_tokens: int | None = None  # default: enough for the variant's answer
    haystack_text: str | None = None
    use_chat_template: bool = True
    compress: str = "prompt"  # "prompt": the whole prompt; "context": the context, then the question uncompressed

    def __post_init__(self) -> None:
        if self.compress not in COMPRESS_MODES:
            raise ValueError(f"compress must be one of {', '.join(COMPRESS_MODES)}; got {self.compress!r}")
        for depth in self.depths:
            if not 0 <= depth <= 100:
                raise ValueError(f"depth must be within [0, 100] percent, got {depth}")
        for length in self.lengths:
            if length <= 0:
                raise ValueError(f"lengths must be positive token counts, got {length}")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown needle variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
        for run in self.policies:
            run.validate()
        labels = [run.label for run in self.policies]
        if len(set(labels)) != len(labels):
            raise ValueError(f"the same policy is listed twice: {labels}")

    def cells(self) -> list[Cell]:
        return [
            Cell(length, depth, variant, sample)
            for length in self.lengths
            for depth in self.depths
            for variant in self.variants
            for sample in range(self.samples)
        ]


def parse_length(text: str) -> int:
    """``"4k"`` -> 4096, ``"1500"`` -> 1500."""
    raw = text.strip().lower()
    try:
        return int(float(raw[:-1]) * 1024) if raw.endswith("k") else int(raw)
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a length in tokens (examples: 512, 1k, 4k)") from None


def cell_key(policy: str, cell: Cell) -> tuple:
    return (policy, cell.length, cell.depth, cell.variant, cell.sample)


def load_results(path: Path) -> list[dict[str, Any]]:
    """Rows of a results file; a torn last line (a run killed mid-write) is dropped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _end_torn_line(path: Path) -> None:
    """After a run killed mid-write, start the next row on a line of its own."""
    if path.exists() and path.stat().st_size:
        with path.open("rb") as f:
            f.seek(-1, 2)
            torn = f.read(1) != b"\n"
        if torn:
            with path.open("a") as f:
                f.write("\n")


def _row_key(row: dict[str, Any]) -> tuple:
    return (row["policy"], row["length"], float(row["depth"]), row["variant"], row["sample"])


def load_model(path: str, tokenizer_path: str | None = None, dtype: str = "auto", device: str | None = None):
    """A causal LM and its tokenizer, the way users load them (``from_pretrained``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or path)
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(
            f"no tokenizer could be loaded from {tokenizer_path or path!r} ({err.__class__.__name__}); "
            "pass --tokenizer PATH to a directory that has one"
        ) from None
    from kvx.eval.measure import parse_dtype

    torch_dtype = dtype if dtype == "auto" else parse_dtype(dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    if device:
        model = model.to(device)
    return model.eval(), tokenizer


class NeedleRunner:
    """Runs the grid for every policy on one model; see the module docstring."""

    def __init__(self, model, tokenizer, config: NeedleConfig, out_dir: Path):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.out_dir = Path(out_dir)
        self.results_path = self.out_dir / "results.jsonl"
        self.template = PromptTemplate(tokenizer, config.use_chat_template)

    def pending(self) -> list[tuple[PolicyRun, Cell]]:
        done = {_row_key(r) for r in load_results(self.results_path)}
        return [
            (run, cell)
            for cell in self.config.cells()
            for run in self.config.policies
            if cell_key(run.label, cell) not in done
        ]

    def run(self, progress: bool = True) -> list[dict[str, Any]]:
        """Run every pending cell, appending each result as it finishes; returns all rows."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        todo = self.pending()
        _end_torn_line(self.results_path)
        with self.results_path.open("a") as sink:
            for run, cell in _progress(todo, progress, desc="needle"):
                row = self.run_cell(run, cell)
                sink.write(json.dumps(row) + "\n")
                sink.flush()
        return load_results(self.results_path)

    def build(self, cell: Cell):
        rng = random.Random(cell.seed)
        spec = make_needles(cell.variant, rng, self.config.distractors, self.config.values)
        prompt = build_prompt(self.tokenizer, cell.length, cell.depth, spec, rng, self.config.haystack_text, self.template)
        return prompt

    def run_cell(self, run: PolicyRun, cell: Cell) -> dict[str, Any]:
        prompt = self.build(cell)
        ids = torch.tensor([prompt.ids], device=self.model.device)
        new_tokens = self.config.max_new_tokens or (8 * len(prompt.spec.expected) + 4)
        # generating on top of a compressed context: no chunked prefill there (the question is short,
        # and transformers before 5.21 would prefill the whole prompt again on top of the cache)
        chunking = {"chunk_size": None} if self.config.compress == "context" else {}
        context = (kvx.patched(self.model, run.policy(), **chunking) if run.name != DENSE
                   else contextlib.nullcontext())
        start = time.perf_counter()
        with context, torch.inference_mode():
            cache = None
            if run.name != DENSE and self.config.compress == "context":
                cache = kvx.compress_context(self.model, ids[:, : prompt.question_start])
            out = self.model.generate(
                ids,
                **cache_kwargs(cache),
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                do_sample=False,
                return_dict_in_generate=True,
                pad_token_id=self.tokenizer.pad_token_id
                if self.tokenizer.pad_token_id is not None
                else self.tokenizer.eos_token_id,
            )
        seconds = time.perf_counter() - start
        answer = self.tokenizer.decode(out.sequences[0, ids.shape[1] :], skip_special_tokens=True)
        cache = cache_of(out)
        return {
            "policy": run.label,
            **asdict(cell),
            "compress": self.config.compress,
            "prompt_tokens": prompt.length,
            "needle_positions": prompt.needle_positions,
            "expected": prompt.spec.expected,
            "answer": answer.strip(),
            "score": score_answer(answer, prompt.spec.expected),
            "kv_bytes": cache_nbytes(cache),
            "kept_tokens": _kept_tokens(cache),
            "seconds": round(seconds, 4),
        }


def _kept_tokens(cache) -> int:
    """Fewest real tokens any full-attention layer holds at the end (all of them when dense)."""
    if isinstance(cache, kvx.KVCache):
        kept = [s["kept_min"] for s in cache.stats() if s["kind"] in ("compressed", "ragged")]
        return min(kept) if kept else 0
    return cache.get_seq_length()


def _progress(items: list, enabled: bool, desc: str) -> Iterable:
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return _plain_progress(items, desc)
    return tqdm(items, desc=desc, unit="cell")


def _plain_progress(items: list, desc: str) -> Iterator:
    for i, item in enumerate(items, 1):
        print(f"{desc}: {i}/{len(items)}", end="\r", flush=True)
        yield item
    print()


def summarize(rows: list[dict[str, Any]], policies: list[str]) -> list[dict[str, Any]]:
    """Per policy: mean score overall and per length, KV bytes relative to dense on the same cells, time."""
    by_cell = {(r["length"], float(r["depth"]), r["variant"], r["sample"]): {} for r in rows}
    for r in rows:
        by_cell[(r["length"], float(r["depth"]), r["variant"], r["sample"])][r["policy"]] = r
    lengths = sorted({r["length"] for r in rows})
    summary = []
    for policy in policies:
        mine = [r for r in rows if r["policy"] == policy]
        if not mine:
            continue
        ratios = [
            r["kv_bytes"] / cell[DENSE]["kv_bytes"]
            for cell in by_cell.values()
            if policy in cell and DENSE in cell and (r := cell[policy]) and cell[DENSE]["kv_bytes"]
        ]
        summary.append(
            {
                "policy": policy,
                "cells": len(mine),
                "accuracy": sum(r["score"] for r in mine) / len(mine),
                "per_length": {
                    n: _mean([r["score"] for r in mine if r["length"] == n]) for n in lengths
                },
                "kv_vs_dense": _mean(ratios) if ratios else None,
                "seconds": _mean([r["seconds"] for r in mine]),
            }
        )
    return summary


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def format_summary(summary: list[dict[str, Any]]) -> str:
    if not summary:
        return "no results"
    lengths = list(summary[0]["per_length"])
    header = ["policy", "accuracy"] + [f"@{n}" for n in lengths] + ["KV vs dense", "s/cell"]
    rows = [header]
    for s in summary:
        rows.append(
            [s["policy"], f"{s['accuracy']:.3f}"]
            + [("-" if s["per_length"][n] is None else f"{s['per_length'][n]:.3f}") for n in lengths]
            + ["-" if s["kv_vs_dense"] is None else f"{s['kv_vs_dense']:.3f}", f"{s['seconds']:.2f}"]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def write_heatmaps(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """One PNG per policy and variant: mean score, depth (rows) x length (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for policy in sorted({r["policy"] for r in rows}):
        for variant in sorted({r["variant"] for r in rows if r["policy"] == policy}):
            mine = [r for r in rows if r["policy"] == policy and r["variant"] == variant]
            lengths = sorted({r["length"] for r in mine})
            depths = sorted({float(r["depth"]) for r in mine})
            grid = [
                [_mean([r["score"] for r in mine if r["length"] == n and float(r["depth"]) == d]) for n in lengths]
                for d in depths
            ]
            values = [[float("nan") if v is None else v for v in row] for row in grid]
            fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.0 + 0.45 * len(depths)))
            image = ax.imshow(values, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
            ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel("needle depth")
            ax.set_title(f"{policy} ({variant})", fontsize=9)
            for i, row in enumerate(values):
                for j, v in enumerate(row):
                    ax.text(j, i, "-" if v != v else f"{v:.2f}", ha="center", va="center", fontsize=7)
            fig.colorbar(image, ax=ax, fraction=0.05)
            fig.tight_layout()
            path = out_dir / f"heatmap-{_safe(policy)}-{variant}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
    return paths


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def parse_policies(policy_args: list[str], opt_args: list[str], with_dense: bool = True) -> list[PolicyRun]:
    """``--policy NAME[:k=v,...]`` (repeatable) and ``--opt k=v`` (applies to every listed policy
    that has option ``k``) -> runs, dense first unless ``with_dense`` is False."""
    runs = [parse_spec(arg) for arg in policy_args]  # one list of (name, options) parts per run
    for opt in opt_args:
        key, value = split_option(opt)
        takers = [options for parts in runs for name, options in parts if name != DENSE and _has_option(name, key)]
        if not takers:
            listed = [name for parts in runs for name, _ in parts if name != DENSE] or ["(none)"]
            raise ValueError(f"--opt {key}: none of the listed policies ({', '.join(listed)}) has an option {key!r}")
        for options in takers:
            options.setdefault(key, value)
    result = [PolicyRun(*parts[0], composed=tuple(PolicyRun(*part) for part in parts[1:])) for parts in runs]
    for run in result:
        run.validate()
    if with_dense and not any(r.name == DENSE for r in result):
        result.insert(0, PolicyRun(DENSE))
    return result




def _has_option(policy: str, key: str) -> bool:
    return any(o["name"] == key for o in policy_class(policy).options())


def config_from_yaml(path: Path, **overrides: Any) -> NeedleConfig:
    """A run described in YAML::

        lengths: [1k, 2k, 4k]
        depths: [0, 50, 100]
        variants: [single, multikey]
        samples: 2
        policies:
          - dense
          - {name: snapkv, budget: 256, window: 32}
    """
    try:
        import yaml
    except ImportError:
        raise ImportError("reading a YAML run needs pyyaml: pip install 'kvx[eval]'") from None
    data = yaml.safe_load(Path(path).read_text()) or {}
    known = {f for f in NeedleConfig.__dataclass_fields__}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; valid keys: {', '.join(sorted(known))}")
    if "lengths" in data:
        data["lengths"] = [parse_length(str(n)) for n in data["lengths"]]
    if "policies" in data:
        data["policies"] = [
            PolicyRun(p) if isinstance(p, str) else PolicyRun(p["name"], {k: v for k, v in p.items() if k != "name"})
            for p in data["policies"]
        ]
    data.update({k: v for k, v in overrides.items() if v is not None})
    return NeedleConfig(**data)
