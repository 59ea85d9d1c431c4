"""``kvx needle``: needle-in-a-haystack accuracy of dense and compressed KV caches, side by side.

Every policy in a run answers the same prompts (a cell = length x depth x variant x sample, its
prompt seeded by the cell), greedy, scored by exact match. Each finished cell is appended to
``results.jsonl`` at once, so an interrupted run keeps what it did, and a rerun with the same
output directory skips finished cells and repeats none.

The first line of ``results.jsonl`` is the run's identity (:func:`run_identity`: the model's path
and a fingerprint of its config and weights, the tokenizer, the prompt and generation settings,
kvx's version); a rerun whose identity differs refuses to resume it (``fresh=True`` moves it aside
and starts a new one). A row that cannot be read (torn by a kill, edited, from another tool) is
reported by line number and neither crashes the run nor counts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import time
import warnings
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import kvx
from kvx.cache import cache_nbytes
from kvx.compat import cache_kwargs, cache_of, decoder_config
from kvx.compose import parse_spec, split_option
from kvx.eval.haystack import KEYS, VARIANTS, PromptTemplate, build_prompt, make_needles, score_answer
from kvx.eval.results import Results, ResultsFile
from kvx.policy import Policy, check_positive_int, make_policy, policy_class

DENSE = "dense"
COMPRESS_MODES = ("prompt", "context")
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "assets" / "needle-llama"
KEYS_MODEL = DEFAULT_MODEL.with_name("needle-llama-keys")
"""The second shipped model (4 layers, 8 query / 4 KV heads): it matches keys (multi-key, "none" when the
key is absent) at 1K-2K, where the default one copies a single needle; see its card."""


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
        """Raise (naming the policy, option and valid choices) unless this run can be built."""
        if self.name != DENSE:
            self.policy()
        elif self.options or self.composed:
            raise ValueError(f"dense is the uncompressed baseline and takes no options or composition; got {self.label!r}")


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
        """Every setting checked by name (the YAML key; the flag is the same with dashes)."""
        if self.compress not in COMPRESS_MODES:
            raise ValueError(f"compress must be one of {', '.join(COMPRESS_MODES)}; got {self.compress!r}")
        for length in nonempty_list("lengths", self.lengths):
            check_positive_int("needle", "each of lengths (tokens)", length)
        for depth in nonempty_list("depths", self.depths):
            if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0 <= depth <= 100:
                raise ValueError(f"depths: {depth!r} is not a depth within [0, 100] percent")
        unknown = [v for v in nonempty_list("variants", self.variants) if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown needle variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
        check_positive_int("needle", "samples", self.samples)
        self._check_needle_counts()
        if self.max_new_tokens is not None:
            check_positive_int("needle", "max_new_tokens", self.max_new_tokens)
        if not isinstance(self.use_chat_template, bool):
            raise TypeError(f"use_chat_template must be true or false, got {self.use_chat_template!r}")
        if self.haystack_text is not None and not isinstance(self.haystack_text, str):
            raise TypeError(f"haystack_text must be text, got {type(self.haystack_text).__name__}")
        for run in nonempty_list("policies", self.policies, distinct=False):  # labels are compared below
            run.validate()
        labels = [run.label for run in self.policies]
        if len(set(labels)) != len(labels):
            raise ValueError(f"the same policy is listed twice: {labels}")

    def _check_needle_counts(self) -> None:
        """``distractors`` and ``values`` are counts the variants asked for can honour."""
        check_positive_int("needle", "distractors", self.distractors, minimum=0)
        if self.distractors > len(KEYS) - 1:
            raise ValueError(f"needle: distractors must be at most {len(KEYS) - 1} (the keys there are), "
                             f"got {self.distractors}")
        needs_distractors = sorted({"multikey", "absent"} & set(self.variants))
        if needs_distractors and self.distractors < 1:
            raise ValueError(f"needle: distractors must be >= 1 with variant(s) {', '.join(needs_distractors)} "
                             f"(they are what those variants test), got {self.distractors}")
        check_positive_int("needle", "values", self.values, minimum=2 if "multivalue" in self.variants else 1)

    def cells(self) -> list[Cell]:
        return [
            Cell(length, depth, variant, sample)
            for length in self.lengths
            for depth in self.depths
            for variant in self.variants
            for sample in range(self.samples)
        ]


def nonempty_list(name: str, value: Any, distinct: bool = True) -> list:
    """``value`` itself when it is a non-empty list (of distinct items), else an error naming setting ``name``."""
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{name} must be a non-empty list, got {value!r}")
    repeated = first_repeat(value) if distinct else None
    if repeated is not None:
        raise ValueError(f"{name} lists {repeated!r} twice; give each once (a cell would run twice)")
    return list(value)


def first_repeat(values: Iterable) -> Any:
    """The first item of ``values`` seen before (equal values count: 1024 and 1024.0), or None."""
    seen: list = []
    for value in values:
        if any(value == other for other in seen):
            return value
        seen.append(value)
    return None


def parse_length(text: str) -> int:
    """``"4k"`` -> 4096, ``"1500"`` -> 1500; anything that is not a whole token count raises."""
    raw = str(text).strip().lower()
    scale = 1024 if raw.endswith("k") else 1
    try:
        value = float(raw[:-1] if scale > 1 else raw) * scale
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value != int(value):
        raise ValueError(f"cannot read {text!r} as a length in tokens (examples: 512, 1k, 4k)")
    return int(value)


def cell_key(policy: str, cell: Cell) -> tuple:
    return (policy, cell.length, cell.depth, cell.variant, cell.sample)


ROW_FIELDS: dict[str, tuple[type, ...]] = {
    "policy": (str,), "length": (int,), "depth": (int, float), "variant": (str,), "sample": (int,),
    "score": (int, float), "kv_bytes": (int,), "seconds": (int, float),
}
"""What every result row holds, and its type: a row without them is reported, not counted."""
IDENTITY_KEY = "kvx_needle_run"


def _results_file(path: Path) -> ResultsFile:
    """``path`` as a needle results file (identity ``kvx_needle_run``, one row per cell and policy)."""
    return ResultsFile(Path(path), IDENTITY_KEY, _row_key, _check_row)


def read_results(path: Path) -> Results:
    """Read ``results.jsonl``: a torn, malformed, foreign or repeated line is a problem reported
    by its number, never an exception and never a row."""
    return _results_file(path).read()


def _check_row(row: dict[str, Any]) -> str | None:
    """Why a JSON object is not a result row of kvx needle (None when it is)."""
    missing = [k for k in ROW_FIELDS if k not in row]
    if missing:
        return f"not a result row of kvx needle (no {', '.join(missing)})"
    wrong = [k for k, kinds in ROW_FIELDS.items() if isinstance(row[k], bool) or not isinstance(row[k], kinds)]
    if wrong or row["variant"] not in VARIANTS or not 0 <= row["score"] <= 1:
        return f"a result row with invalid {', '.join(wrong) or 'variant or score'}"
    return None


def load_results(path: Path) -> list[dict[str, Any]]:
    """The rows of a results file that can be read (see :func:`read_results`)."""
    return read_results(path).rows


def _row_key(row: dict[str, Any]) -> tuple:
    return (row["policy"], row["length"], float(row["depth"]), row["variant"], row["sample"])


def short_digest(*parts: Any) -> str:
    """A short SHA-256 of ``parts`` (bytes, or anything with a stable ``str``)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else str(part).encode())
    return h.hexdigest()[:16]


def weights_fingerprint(model: torch.nn.Module, samples: int = 4096) -> str:
    """A fingerprint of a model's weights: every tensor's name, shape and dtype, and ``samples``
    values of it at positions drawn with a fixed seed (so no row or column is skipped the way an
    even stride over a matrix skips all but one column). A change confined to a few entries can
    escape it: it tells runs apart, it is not a checksum. Tensors without data (``meta``, offloaded)
    count by name, shape and dtype only."""
    parts: list[Any] = []
    for name, tensor in sorted(model.state_dict().items()):
        parts.append(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}:{tensor.device.type == 'meta'}")
        if tensor.device.type == "meta" or tensor.numel() == 0:
            continue
        flat = tensor.detach().reshape(-1)
        positions = torch.randint(0, flat.numel(), (min(samples, flat.numel()),),
                                  generator=torch.Generator().manual_seed(flat.numel()))
        picked = flat[positions.to(flat.device)].to("cpu").contiguous()
        parts.append(picked.view(torch.uint8).numpy().tobytes())
    return short_digest(*parts)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A fingerprint of what a tokenizer turns text into: class, vocabulary, special tokens, chat template."""
    vocab = sorted(tokenizer.get_vocab().items())
    return short_digest(type(tokenizer).__name__, vocab, getattr(tokenizer, "all_special_tokens", []),
                        getattr(tokenizer, "chat_template", None))


def run_identity(model: torch.nn.Module, tokenizer: Any, config: NeedleConfig, model_path: str | None) -> dict[str, Any]:
    """What produced a run's rows: the model (path, config, weights, dtype), the tokenizer, the
    settings that shape a cell's prompt or answer, and kvx's version. The grid (lengths, depths,
    variants, samples, policies) is not part of it: a rerun may add cells."""
    return {
        **model_identity(model, tokenizer, model_path),
        "settings": {"distractors": config.distractors, "values": config.values,
                     "max_new_tokens": config.max_new_tokens, "use_chat_template": config.use_chat_template,
                     "compress": config.compress,
                     "haystack": None if config.haystack_text is None else short_digest(config.haystack_text)},
        "kvx": kvx.__version__,
    }


def model_identity(model: torch.nn.Module, tokenizer: Any, model_path: str | None) -> dict[str, Any]:
    """The model and tokenizer part of a run's identity: path (resolved, so every spelling of one
    directory is one model), a digest of the config, the weights' fingerprint, dtype, tokenizer."""
    if model_path is None:
        model_path = getattr(model, "name_or_path", "") or ""
    if model_path and Path(model_path).expanduser().exists():  # one spelling per directory
        model_path = str(Path(model_path).expanduser().resolve())
    model_config = {k: v for k, v in model.config.to_dict().items()
                    if k not in ("_name_or_path", "transformers_version") and not k.startswith("_attn_implementation")}
    return {
        "model": str(model_path),
        "model_config": short_digest(json.dumps(model_config, sort_keys=True, default=str)),
        "weights": weights_fingerprint(model),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }


def load_model(path: str, tokenizer_path: str | None = None, dtype: str = "auto", device: str | None = None):
    """A causal LM and its tokenizer, the way users load them (``from_pretrained``); a path that is
    not there, or a directory without a tokenizer or weights, raises an error that names it."""
    tokenizer = load_tokenizer(path, tokenizer_path)
    return load_causal_lm(path, dtype, device), tokenizer


def load_tokenizer(path: str, tokenizer_path: str | None = None):
    """The tokenizer of ``tokenizer_path`` (else of the model directory ``path``)."""
    from transformers import AutoTokenizer

    _check_local(path, "--model")
    if tokenizer_path:
        _check_local(tokenizer_path, "--tokenizer")
    try:
        return AutoTokenizer.from_pretrained(tokenizer_path or path)
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(
            f"no tokenizer could be loaded from {tokenizer_path or path!r} ({err.__class__.__name__}); "
            "pass --tokenizer PATH to a directory that has one"
        ) from None


def load_causal_lm(path: str, dtype: str = "auto", device: str | None = None):
    """The causal LM of ``path`` in eval mode, in ``dtype`` (auto, float32, bfloat16, float16), on ``device``."""
    from transformers import AutoModelForCausalLM

    from kvx.eval.measure import parse_dtype

    torch_dtype = dtype if dtype == "auto" else parse_dtype(dtype)
    _check_local(path, "--model")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except (OSError, ValueError, KeyError) as err:
        reason = " ".join(str(err).split())[:300]
        raise ValueError(f"--model {path}: no causal LM could be loaded from it ({reason})") from None
    if device:
        model = model.to(device)
    return model.eval()


def _check_local(path: str, flag: str) -> None:
    """A path that names a local directory (not a hub id: ``gpt2``, ``org/name``) must be one."""
    given = Path(path).expanduser()
    looks_local = given.is_absolute() or path.startswith((".", "~")) or path.count("/") > 1
    if given.exists() and not given.is_dir():
        raise ValueError(f"{flag} {path}: is a file; give the model's directory")
    if looks_local and not given.exists():
        raise ValueError(f"{flag} {path}: no such directory")


def build_cell_prompt(config: NeedleConfig, tokenizer: Any, cell: Cell, template: PromptTemplate | None = None):
    """The prompt of one cell: its needles and filler seeded by the cell, so every policy gets the same."""
    rng = random.Random(cell.seed)
    spec = make_needles(cell.variant, rng, config.distractors, config.values)
    template = template or PromptTemplate(tokenizer, config.use_chat_template)
    return build_prompt(tokenizer, cell.length, cell.depth, spec, rng, config.haystack_text, template)


def check_prompts(config: NeedleConfig, tokenizer: Any, vocab_size: int | None = None) -> None:
    """Build one prompt per length and variant: a length too short for its needles (or an empty
    haystack) raises before any cell runs, not after others have; given the model's ``vocab_size``,
    so does a tokenizer whose ids the model does not have (one that belongs to another model)."""
    template = PromptTemplate(tokenizer, config.use_chat_template)
    for length in config.lengths:
        for variant in config.variants:
            top = max(build_cell_prompt(config, tokenizer, Cell(length, 0.0, variant, 0), template).ids)
            if vocab_size is not None and top >= vocab_size:
                raise ValueError(f"the tokenizer gives token id {top}, past the model's vocabulary ({vocab_size} "
                                 "tokens): it is not this model's tokenizer; pass the model's own with --tokenizer")


def check_patchable(model: torch.nn.Module, runs: list[PolicyRun], **patch_options: Any) -> None:
    """Patch ``model`` with each run's policy once and unpatch it: a policy this model cannot take
    (a schedule for another layer count, an architecture kvx refuses) raises before any work."""
    for run in runs:
        if run.name != DENSE:
            with kvx.patched(model, run.policy(), **patch_options):
                pass


class NeedleRunner:
    """Runs the grid for every policy on one model; see the module docstring."""

    def __init__(self, model, tokenizer, config: NeedleConfig, out_dir: Path, model_path: str | None = None):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.out_dir = Path(out_dir)
        self.results_path = self.out_dir / "results.jsonl"
        self.template = PromptTemplate(tokenizer, config.use_chat_template)
        self.identity = run_identity(model, tokenizer, config, model_path)

    def pending(self) -> list[tuple[PolicyRun, Cell]]:
        done = {_row_key(r) for r in load_results(self.results_path)}
        return [
            (run, cell)
            for cell in self.config.cells()
            for run in self.config.policies
            if cell_key(run.label, cell) not in done
        ]

    def rows(self) -> list[dict[str, Any]]:
        """The rows of this run's grid and policies (a results file may hold more cells)."""
        wanted = {cell_key(run.label, cell) for cell in self.config.cells() for run in self.config.policies}
        return [row for row in load_results(self.results_path) if _row_key(row) in wanted]

    def run(self, progress: bool = True, fresh: bool = False) -> list[dict[str, Any]]:
        """Run every pending cell, appending each result as it finishes; returns this grid's rows.

        Before any cell: every prompt length is checked, every policy patches this model, and an
        existing results file must come from the same identity (``fresh``: it is moved aside, and a
        new one started)."""
        check_prompts(self.config, self.tokenizer, decoder_config(self.model.config).vocab_size)
        check_patchable(self.model, self.config.policies, **self._chunking())
        self.warn_past_positions()
        self.open_results(fresh)
        todo = self.pending()
        with _results_file(self.results_path).appender() as append:
            for run, cell in progress_bar(todo, progress, desc="needle"):
                append(self.run_cell(run, cell))
        return self.rows()

    def warn_past_positions(self) -> None:
        """Lengths past the model's ``max_position_embeddings`` run, but measure extrapolation: say so."""
        limit = getattr(decoder_config(self.model.config), "max_position_embeddings", None)
        beyond = [n for n in self.config.lengths if isinstance(limit, int) and n > limit]
        if beyond:
            warnings.warn(f"lengths {', '.join(map(str, beyond))} exceed the model's max_position_embeddings ({limit}): "
                          "those cells measure position extrapolation as much as compression", stacklevel=3)

    def open_results(self, fresh: bool = False) -> None:
        """Make ``results.jsonl`` ready to append to: new (with this run's identity), or an existing
        one of the same identity (its problems reported as warnings); refuse one of another."""
        _results_file(self.results_path).open(self.identity, fresh)

    def build(self, cell: Cell):
        return build_cell_prompt(self.config, self.tokenizer, cell, self.template)

    def _chunking(self) -> dict[str, Any]:
        """``patch``'s chunk size for this run: generating on top of a compressed context, no chunked
        prefill (the question is short, and transformers before 5.21 would prefill the whole prompt
        again on top of the cache)."""
        return {"chunk_size": None} if self.config.compress == "context" else {}

    def run_cell(self, run: PolicyRun, cell: Cell) -> dict[str, Any]:
        prompt = self.build(cell)
        ids = torch.tensor([prompt.ids], device=self.model.device)
        new_tokens = self.config.max_new_tokens or (8 * len(prompt.spec.expected) + 4)
        out, seconds = policy_generate(
            self.model, run, ids, prompt.question_start if self.config.compress == "context" else None,
            self._chunking(), max_new_tokens=new_tokens,
            pad_token_id=self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.tokenizer.eos_token_id,
        )
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


def policy_generate(model, run: PolicyRun, ids: torch.Tensor, context_end: int | None = None,
                    patch_options: dict[str, Any] | None = None, **generate_kwargs: Any) -> tuple[Any, float]:
    """Greedy ``model.generate(ids, ...)`` patched with ``run``'s policy (as it is for dense), and
    the seconds it took. ``context_end``: query-aware, the policy compresses ``ids[:, :context_end]``
    alone (``kvx.compress_context``) and the rest is appended uncompressed. ``patch_options`` go to
    ``kvx.patched``; the output is ``generate``'s dict (``kvx.cache_of(out)`` is its cache)."""
    context = (kvx.patched(model, run.policy(), **(patch_options or {})) if run.name != DENSE
               else contextlib.nullcontext())
    start = time.perf_counter()
    with context, torch.inference_mode():
        cache = None
        if run.name != DENSE and context_end is not None:
            cache = kvx.compress_context(model, ids[:, :context_end])
        out = model.generate(ids, **cache_kwargs(cache), attention_mask=torch.ones_like(ids), do_sample=False,
                             return_dict_in_generate=True, **generate_kwargs)
    return out, time.perf_counter() - start


def _kept_tokens(cache) -> int:
    """Fewest real tokens any full-attention layer holds at the end (all of them when dense)."""
    if isinstance(cache, kvx.KVCache):
        kept = [s["kept_min"] for s in cache.stats() if s["kind"] in ("compressed", "ragged")]
        return min(kept) if kept else 0
    return cache.get_seq_length()


def progress_bar(items: list, enabled: bool, desc: str) -> Iterable:
    """``items``, with a progress bar titled ``desc`` while iterated when ``enabled`` (tqdm, else a
    counter line)."""
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
    """Per policy: mean score overall, per length and per variant and length, KV bytes relative to
    dense on the same cells, time."""
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
                "per_variant": {
                    v: {n: _mean([r["score"] for r in mine if r["variant"] == v and r["length"] == n]) for n in lengths}
                    for v in sorted({r["variant"] for r in mine})
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
    table = aligned_table(rows[0], rows[1:])
    variants = sorted({v for s in summary for v in s["per_variant"]})
    if len(variants) < 2:
        return table
    by_variant = []
    for s in summary:
        for v, scores in s["per_variant"].items():
            by_variant.append([s["policy"], v] + ["-" if scores[n] is None else f"{scores[n]:.3f}" for n in lengths])
    return table + "\n\nby variant:\n" + aligned_table(["policy", "variant"] + [f"@{n}" for n in lengths], by_variant,
                                                        left=2)


def aligned_table(header: list[str], rows: list[list[str]], left: int = 1) -> str:
    """Aligned text: the first ``left`` columns flush left, the others right, a rule under the header."""
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [header] + rows]
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
            path = out_dir / f"heatmap-{safe_filename(policy)}-{variant}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
    return paths


def safe_filename(label: str) -> str:
    """``label`` (a policy spec, a cell) as a file name: characters other than letters, digits and
    ``-_.`` become ``_``."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def parse_policies(policy_args: list[str], opt_args: list[str], with_dense: bool = True) -> list[PolicyRun]:
    """``--policy NAME[:k=v,...]`` (repeatable) and ``--opt k=v`` (applies to every listed policy
    that has option ``k``, unless its spec sets it) -> runs, dense first unless ``with_dense`` is False."""
    runs = [parse_spec(arg) for arg in policy_args]  # one list of (name, options) parts per run
    result = [PolicyRun(*parts[0], composed=tuple(PolicyRun(*part) for part in parts[1:])) for parts in runs]
    result = apply_options(result, opt_args)
    if with_dense and not any(r.name == DENSE for r in result):
        result.insert(0, PolicyRun(DENSE))
    return result


def apply_options(runs: list[PolicyRun], opt_args: list[str]) -> list[PolicyRun]:
    """``runs`` with each ``--opt key=value`` given to every part that has option ``key`` and does not
    set it itself; an option no part has is an error naming it. Every run is validated."""
    parts = [part for run in runs for part in (run, *run.composed) if part.name != DENSE]
    for opt in opt_args:
        key, value = split_option(opt)
        takers = [part for part in parts if _has_option(part.name, key)]
        if not takers:
            listed = [part.name for part in parts] or ["(none)"]
            raise ValueError(f"--opt {key}: none of the listed policies ({', '.join(listed)}) has an option {key!r}")
        for part in takers:
            part.options.setdefault(key, value)
    for run in runs:
        run.validate()
    return runs


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
    data = read_yaml_mapping(Path(path), {f for f in NeedleConfig.__dataclass_fields__})
    try:
        if "lengths" in data:
            data["lengths"] = [parse_length(n) for n in nonempty_list("lengths", data["lengths"])]
        if "policies" in data:
            data["policies"] = [yaml_policy(i, p) for i, p in enumerate(nonempty_list("policies", data["policies"]))]
        data.update({k: v for k, v in overrides.items() if v is not None})
        return NeedleConfig(**data)
    except (ValueError, TypeError) as err:
        raise type(err)(f"{path}: {err}") from None


def read_yaml_mapping(path: Path, known: Iterable[str]) -> dict[str, Any]:
    """The YAML mapping in ``path`` (empty when the file is), or an error naming the file and what is
    wrong: not UTF-8, not YAML (with the line), not a mapping, or keys outside ``known`` (listed)."""
    try:
        import yaml
    except ImportError:
        raise ImportError("reading a YAML run needs pyyaml: pip install 'kvx[eval]'") from None
    try:
        data = yaml.safe_load(Path(path).read_text())
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"{path}: not valid YAML{where}: {getattr(err, 'problem', None) or err}") from None
    known = set(known)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a run is a YAML mapping with keys from {', '.join(sorted(known))}; "
                         f"got a {type(data).__name__}")
    unknown = sorted(str(k) for k in set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; valid keys: {', '.join(sorted(known))}")
    return data


def yaml_policy(index: int, entry: Any) -> PolicyRun:
    """One entry of a YAML ``policies`` list: a spec (``snapkv:budget=256+ragged``, or ``dense``) or a
    mapping ``{name: snapkv, budget: 256}``."""
    if isinstance(entry, str):
        if entry.strip() == DENSE:
            return PolicyRun(DENSE)
        return parse_policies([entry], [], with_dense=False)[0]
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise ValueError(f"policies[{index}]: each entry is a policy spec or a mapping with a name, "
                         f"e.g. {{name: snapkv, budget: 256}}; got {entry!r}")
    run = PolicyRun(entry["name"], {k: v for k, v in entry.items() if k != "name"})
    try:
        run.validate()
    except (ValueError, TypeError) as err:
        raise type(err)(f"policies[{index}]: {err}") from None
    return run
