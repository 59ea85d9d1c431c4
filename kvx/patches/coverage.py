"""Which causal-LM architectures of the installed transformers kvx patches correctly, checked.

For one ``model_type``: build a tiny random model (:mod:`kvx.tiny_zoo`), generate greedily with
the model as it is (the reference), then

1. **equivalence**: under SnapKV and StreamingLLM with budgets that keep every token, the same
   greedy tokens and logits within :data:`LOGIT_TOLERANCE`;
2. **eviction**: under StreamingLLM (4 sinks + 8 recent) and SnapKV (budget 12), generation runs,
   the cache is kvx's, and every layer kvx compresses ends within its bound while having seen
   more tokens than that.

A model kvx refuses raises a ``ValueError`` naming the reason, from ``kvx.patch`` or from its
first patched forward; that is an outcome too. Anything else (another exception, different
tokens or logits, an unbounded layer) is a failure: ``tests/patches/test_coverage.py`` fails on
it, and ``kvx models --verify`` reports it.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import kvx
from kvx.cache import KVCache, SlidingWindowLayer
from kvx.compat import TRANSFORMERS_VERSION, cache_of, causal_lm_model_types, decoder_config
from kvx.storage import DenseLayer
from kvx.tiny_zoo import CannotBuildTiny, layer_kinds, tiny_model

LOGIT_TOLERANCE = 1e-5
PROMPT_TOKENS = 40
NEW_TOKENS = 8
KEEP_ALL = (("snapkv", {"budget": 100_000, "window": 8}), ("streaming_llm", {"sink": 4, "window": 100_000}))
EVICTING = (("streaming_llm", {"sink": 4, "window": 8}, 12), ("snapkv", {"budget": 12, "window": 4}, 12 + NEW_TOKENS))
REFUSAL_MARKERS = ("kvx does not support", "which kvx cannot honour")

VERIFIED, REFUSED, NOT_BUILT, FAILED = "verified", "refused", "not built", "FAILED"

COVERAGE_FILE = Path(__file__).with_name("coverage.json")
"""The last full sweep, shipped: what ``kvx models`` prints."""


@dataclass
class Outcome:
    """What checking one model type gave."""

    model_type: str
    status: str  # VERIFIED, REFUSED, NOT_BUILT or FAILED
    reason: str = ""
    layers: list | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def check_model_type(model_type: str, seed: int = 0) -> Outcome:
    """Build, patch and compare one model type (see the module docstring)."""
    start = time.perf_counter()
    try:
        model = tiny_model(model_type, seed)
    except CannotBuildTiny as exc:
        return Outcome(model_type, NOT_BUILT, str(exc))
    outcome = Outcome(model_type, VERIFIED, layers=layer_kinds(model.config))
    try:
        with warnings.catch_warnings():  # "nothing to compress" at patch: reported as this outcome's note
            warnings.filterwarnings("ignore", message=".*has nothing to compress", category=UserWarning)
            _check(model, outcome)
    except ValueError as exc:
        if not any(marker in str(exc) for marker in REFUSAL_MARKERS):
            _record_failure(outcome, exc)
        else:
            outcome.status, outcome.reason = REFUSED, str(exc)
    except Exception as exc:  # noqa: BLE001 - every other error is reported as a failure
        _record_failure(outcome, exc)
    finally:
        if kvx.is_patched(model):
            kvx.unpatch(model)
    outcome.seconds = round(time.perf_counter() - start, 2)
    return outcome


def _record_failure(outcome: Outcome, exc: Exception) -> None:
    """Mark ``outcome`` failed with the first line of ``exc``."""
    outcome.status, outcome.reason = FAILED, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"


def _check(model: torch.nn.Module, outcome: Outcome) -> None:
    vocab = min(256, decoder_config(model.config).vocab_size)
    ids = torch.randint(3, vocab, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    ref_tokens, ref_logits, _ = _greedy(model, ids)
    for name, options in KEEP_ALL:
        with kvx.patched(model, name, **options):
            tokens, logits, cache = _greedy(model, ids)
        if not isinstance(cache, KVCache):
            raise AssertionError(f"{name}: generate() did not run on a kvx cache ({type(cache).__name__})")
        diff = float((logits - ref_logits).abs().max())
        if not torch.equal(tokens, ref_tokens) or diff > LOGIT_TOLERANCE:
            outcome.status = FAILED
            outcome.reason = f"{name} keeping every token differs from the model: max |logit diff| {diff:.2e}"
            return
    for name, options, bound in EVICTING:
        with kvx.patched(model, name, **options):
            _, _, cache = _greedy(model, ids)
        problem = _eviction_problem(cache, bound)
        if problem:
            outcome.status, outcome.reason = FAILED, f"{name} evicting: {problem}"
            return
    kinds = {type(layer) for layer in cache.layers}
    if not any(issubclass(kind, DenseLayer) for kind in kinds):
        outcome.notes.append("no layer to compress: every attention layer has the model's own sliding window")
        outcome.notes.append(_check_without_windows(outcome.model_type))
    elif any(not issubclass(kind, (DenseLayer, SlidingWindowLayer)) for kind in kinds):
        outcome.notes.append("layers that are not plain attention keep transformers' own cache layers")


def _check_without_windows(model_type: str) -> str:
    """The same check on the model type with its sliding windows removed (checkpoints that attend over
    everything), as a note: a verdict on a model kvx compresses, not only one it leaves alone."""
    try:
        model = tiny_model(model_type, windows=False)
    except CannotBuildTiny as exc:
        return f"with its windows removed: not built ({exc})"
    second = Outcome(model_type, VERIFIED)
    try:
        _check(model, second)
    except Exception as exc:  # noqa: BLE001 - reported in the note
        _record_failure(second, exc)
    finally:
        if kvx.is_patched(model):
            kvx.unpatch(model)
    if second.status == VERIFIED and not any(note.startswith("no layer to compress") for note in second.notes):
        return "with its windows removed: verified, compressing every attention layer"
    return f"with its windows removed: {second.reason or 'still nothing to compress'}"


def _eviction_problem(cache: Any, bound: int) -> str:
    """Why a cache after an evicting run breaks its promise, or '' when it keeps it."""
    if not isinstance(cache, KVCache):
        return f"generate() did not run on a kvx cache ({type(cache).__name__})"
    # layers that saw tokens (mllama's cross-attention layers never do)
    compressed = [layer for layer in cache.layers if isinstance(layer, DenseLayer) and layer.seen > 0]
    for layer in compressed:
        kept = int(layer.kept_per_head().max())
        if kept > bound:
            return f"a compressed layer keeps {kept} tokens, more than its bound {bound}"
        if layer.seen <= bound:
            return f"a compressed layer saw only {layer.seen} tokens (nothing to evict)"
    return ""


def _greedy(model: torch.nn.Module, ids: torch.Tensor):
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
            do_sample=False, return_dict_in_generate=True, output_logits=True, pad_token_id=0,
        )
    return out.sequences, torch.stack(out.logits), cache_of(out)


def check_all(model_types: list[str] | None = None, progress: bool = True) -> list[Outcome]:
    """:func:`check_model_type` for every causal-LM type of the installed transformers (or those given)."""
    types = model_types or causal_lm_model_types()
    if progress:
        from tqdm import tqdm

        types = tqdm(types, desc="model types", unit="type")
    return [check_model_type(model_type) for model_type in types]


def summary(outcomes: list[Outcome]) -> dict[str, int]:
    counts = {status: 0 for status in (VERIFIED, REFUSED, NOT_BUILT, FAILED)}
    for outcome in outcomes:
        counts[outcome.status] += 1
    return counts


def write_report(outcomes: list[Outcome], path: Path = COVERAGE_FILE) -> None:
    """Write the outcomes with the transformers version they were checked on (what ``kvx models`` reads)."""
    report = {"transformers": str(TRANSFORMERS_VERSION), "counts": summary(outcomes),
              "model_types": [asdict(o) for o in outcomes]}
    path.write_text(json.dumps(report, indent=1) + "\n")


def read_report(path: Path = COVERAGE_FILE) -> dict[str, Any]:
    return json.loads(path.read_text())


def format_table(outcomes: list[Outcome]) -> str:
    """One line per model type: status, then the reason or the notes."""
    width = max(len(o.model_type) for o in outcomes)
    lines = []
    for o in outcomes:
        detail = o.reason or "; ".join(o.notes)
        lines.append(f"{o.model_type:<{width}}  {o.status:<9}  {detail}".rstrip())
    return "\n".join(lines)
