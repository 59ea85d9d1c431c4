"""``kvx longbench``: LongBench / LongBench-E scores of dense and compressed KV caches, side by side.

Every policy answers the same prompts, greedy, with the official templates, generation lengths,
EOS tokens and metrics (:mod:`.tasks`, :mod:`.prompts`, :mod:`.metrics`). Each finished sample is
appended to ``results.jsonl`` at once, with what the policy really did to the cache (per-layer
tokens seen and kept, bytes), so a run that compressed nothing shows it; a rerun into the same
directory skips finished samples and refuses a file written with another model or settings
(``fresh=True`` moves it aside). The first line is the run's identity; every row carries the
commit, package versions and device that produced it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import kvx
from kvx.cache import cache_nbytes, layer_nbytes
from kvx.compat import cache_of, decoder_config
from kvx.compose import as_composed
from kvx.eval.longbench.metrics import score_sample
from kvx.eval.longbench.prompts import Prompt, build_prompt
from kvx.eval.longbench.tasks import (
    TASKS,
    Sample,
    Task,
    check_data,
    load_samples,
    select_tasks,
    templates_digest,
)
from kvx.eval.measure import stamp
from kvx.eval.needle import (
    COMPRESS_MODES,
    DENSE,
    PolicyRun,
    check_patchable,
    model_identity,
    policy_generate,
    progress_bar,
)
from kvx.eval.results import ResultsFile

IDENTITY_KEY = "kvx_longbench_run"
MODEL_LIMIT = "model"
ROW_FIELDS: dict[str, tuple[type, ...]] = {
    "policy": (str,), "task": (str,), "index": (int,), "sample": (str,), "length": (int,),
    "score": (int, float), "kv_bytes": (int,), "layers": (list,), "seconds": (int, float),
}
"""What every result row holds, and its type: a row without them is reported, not counted."""


@dataclass
class LongBenchConfig:
    """A run: which tasks (all of the benchmark when None) from ``data_dir``, which policies, and
    the settings that shape a prompt (``max_length``: middle-truncate prompts to this many tokens;
    ``"model"``: to the model's ``max_position_embeddings`` less the task's generation length;
    None: never). ``compress="context"`` is query-aware: the policy compresses the context alone
    and the question is appended uncompressed. ``limit``: the first N samples of each task;
    ``max_new_tokens``: a cap on every task's official generation length (a quick check, not the
    official protocol)."""

    data_dir: Path
    tasks: list[str] | None = None
    policies: list[PolicyRun] = field(default_factory=lambda: [PolicyRun(DENSE)])
    longbench_e: bool = False
    limit: int | None = None
    max_length: int | str | None = MODEL_LIMIT
    use_chat_template: bool = True
    compress: str = "prompt"
    max_new_tokens: int | None = None

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if self.compress not in COMPRESS_MODES:
            raise ValueError(f"compress must be one of {', '.join(COMPRESS_MODES)}; got {self.compress!r}")
        for name in ("limit", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive whole number or None, got {value!r}")
        if self.max_length not in (None, MODEL_LIMIT) and (
                isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2):
            raise ValueError(f"max_length must be a token count >= 2, {MODEL_LIMIT!r} or None; got {self.max_length!r}")
        if not self.policies:
            raise ValueError("policies must list at least one policy (dense, or a spec such as snapkv:budget=256)")
        for run in self.policies:
            run.validate()
        labels = [run.label for run in self.policies]
        if len(set(labels)) != len(labels):
            raise ValueError(f"the same policy is listed twice: {labels}")
        self.selected()  # unknown or repeated task names raise here

    def selected(self) -> list[Task]:
        return select_tasks(self.tasks, self.longbench_e)


def row_key(row: dict[str, Any]) -> tuple:
    return (row["policy"], row["task"], row["index"])


def check_row(row: dict[str, Any]) -> str | None:
    """Why ``row`` is not a result row of kvx longbench (None when it is)."""
    missing = [k for k in ROW_FIELDS if k not in row]
    if missing:
        return f"not a result row of kvx longbench (no {', '.join(missing)})"
    wrong = [k for k, kinds in ROW_FIELDS.items() if isinstance(row[k], bool) or not isinstance(row[k], kinds)]
    if wrong or row["task"] not in TASKS or not 0 <= row["score"] <= 1:
        return f"a result row with invalid {', '.join(wrong) or 'task or score'}"
    return None


def eos_token_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    """Every end-of-sequence id the model declares (generation config, config, tokenizer), in that
    order without repeats: Llama-3 instruct ends turns with ``<|eot_id|>`` and text with
    ``<|end_of_text|>``, and stopping at only one of them runs on past the answer."""
    found: list[int] = []
    sources = (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
               getattr(model.config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None))
    for value in sources:
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(token, int) and token not in found:
                found.append(token)
    return found


MODEL_LAYER_KINDS = ("sliding(", "model(")
"""Cache layers kvx leaves to the model (its sliding windows, non-attention layers): not the policy's doing."""


def cache_report(cache: Any, bytes_per_token: int | None = None, lossy: bool = False) -> dict[str, Any]:
    """What the cache holds at the end of a sample: bytes, and per layer its kind, tokens seen,
    tokens kept (fewest and most over KV heads), bytes and key/value bytes.

    ``evicted``: a layer under the policy holds fewer tokens than it saw. ``compressed``: evicted,
    or (for a ``lossy`` storage) its layers' key/value bytes are below what the tokens they saw
    take at full precision (``bytes_per_token`` per layer). Both are False for dense, and for a
    policy whose budget (or full-precision window) held everything."""
    if isinstance(cache, kvx.KVCache):
        keys = ("kind", "seen", "kept_min", "kept_max", "nbytes", "kv_bytes")
        layers = [{k: s[k] for k in keys} for s in cache.stats()]
        policy_layers = [s for s in layers if not s["kind"].startswith(MODEL_LAYER_KINDS)]
    else:
        layers, policy_layers = [_plain_layer(layer) for layer in cache.layers], []
    evicted = any(s["kept_min"] < s["seen"] for s in policy_layers)
    full = sum(s["seen"] for s in policy_layers) * (bytes_per_token or 0)
    shrunk = lossy and full > 0 and sum(s["kv_bytes"] for s in policy_layers) < full
    return {"kv_bytes": cache_nbytes(cache), "evicted": evicted, "compressed": evicted or shrunk, "layers": layers}


def _plain_layer(layer: Any) -> dict[str, Any]:
    """A transformers cache layer (dense run) as :func:`cache_report` lists it."""
    seen = layer.get_seq_length()
    keys = getattr(layer, "keys", None)
    kept = keys.shape[-2] if isinstance(keys, torch.Tensor) and keys.dim() >= 2 else seen  # a window keeps fewer
    nbytes = layer_nbytes(layer)
    return {"kind": "dense", "seen": seen, "kept_min": kept, "kept_max": kept, "nbytes": nbytes, "kv_bytes": nbytes}


def full_bytes_per_token(model: torch.nn.Module) -> int | None:
    """Bytes of one token's keys and values in one layer at the model's precision (batch 1), from
    its config (KV heads x head dim x 2); None where the config does not say."""
    config = decoder_config(model.config)
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    dim = getattr(config, "head_dim", None) or (getattr(config, "hidden_size", 0) // heads if heads else None)
    if not isinstance(kv_heads, int) or not isinstance(dim, int) or not kv_heads or not dim:
        return None
    return 2 * kv_heads * dim * torch.empty((), dtype=model.dtype).element_size()


def is_lossy(policy: Any) -> bool:
    """Whether a policy stores approximations of the keys and values (a quantized storage part)."""
    return any(getattr(part, "lossy", False) for part in as_composed(policy).parts)


class LongBenchRunner:
    """Runs every selected task's samples for every policy on one model; see the module docstring."""

    def __init__(self, model, tokenizer, config: LongBenchConfig, out_dir: Path, model_path: str | None = None):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.out_dir = Path(out_dir)
        self.results = ResultsFile(self.out_dir / "results.jsonl", IDENTITY_KEY, row_key, check_row)
        self.results_path = self.results.path
        self.tasks = config.selected()
        self.eos = eos_token_ids(model, tokenizer)
        self.bytes_per_token = full_bytes_per_token(model)
        self.identity = {
            **model_identity(model, tokenizer, model_path),
            "settings": {"benchmark": "LongBench-E" if config.longbench_e else "LongBench",
                         "max_length": config.max_length, "use_chat_template": config.use_chat_template,
                         "compress": config.compress, "max_new_tokens": config.max_new_tokens,
                         "templates": templates_digest()},
            "kvx": kvx.__version__,
        }

    def max_length(self, task: Task) -> int | None:
        """The prompt length ``task``'s prompts are middle-truncated to (None: not truncated)."""
        if self.config.max_length != MODEL_LIMIT:
            return self.config.max_length
        limit = getattr(decoder_config(self.model.config), "max_position_embeddings", None)
        return limit - task.max_new_tokens if isinstance(limit, int) and limit > task.max_new_tokens else None

    def load(self) -> dict[str, list[Sample]]:
        """Every selected task's samples; a missing file or a bad line raises before any work."""
        check_data(self.config.data_dir, self.tasks, self.config.longbench_e)
        return {t.name: load_samples(self.config.data_dir, t, self.config.longbench_e, self.config.limit)
                for t in self.tasks}

    def run(self, progress: bool = True, fresh: bool = False) -> list[dict[str, Any]]:
        """Run every pending (policy, sample), appending each result as it finishes; returns the
        rows of this run's tasks, samples and policies."""
        samples = self.load()
        check_patchable(self.model, self.config.policies, **self._patch_options())
        existing = self.results.open(self.identity, fresh)
        _check_same_samples(existing.rows, samples, self.results_path)
        done = {row_key(r) for r in existing.rows}
        todo = [(run, task, sample) for task in self.tasks for sample in samples[task.name]
                for run in self.config.policies if (run.label, task.name, sample.index) not in done]
        if todo:
            run_stamp = stamp(self.model.device)
            with self.results.appender() as append:
                for run, task, sample in progress_bar(todo, progress, desc="longbench"):
                    append({**self.run_sample(run, task, sample), "stamp": run_stamp})
        return self.rows(samples)

    def rows(self, samples: dict[str, list[Sample]]) -> list[dict[str, Any]]:
        wanted = {(run.label, task, s.index) for task, items in samples.items() for s in items
                  for run in self.config.policies}
        return [row for row in self.results.read().rows if row_key(row) in wanted]

    def _patch_options(self) -> dict[str, Any]:
        """Query-aware runs generate on top of a compressed context: no chunked prefill there."""
        return {"chunk_size": None} if self.config.compress == "context" else {}

    def build(self, task: Task, sample: Sample) -> Prompt:
        return build_prompt(self.tokenizer, task, sample, self.max_length(task), self.config.use_chat_template)

    def generation_options(self, task: Task) -> dict[str, Any]:
        """``generate``'s options for ``task``: its maximum length (or the cap), every EOS token;
        samsum also stops at a newline and generates at least one token (as the official ``pred.py``)."""
        cap = self.config.max_new_tokens
        new_tokens = task.max_new_tokens if cap is None else min(cap, task.max_new_tokens)
        options: dict[str, Any] = {"max_new_tokens": new_tokens}
        eos = list(self.eos)
        if task.name == "samsum":
            eos += self.tokenizer.encode("\n", add_special_tokens=False)[-1:]
            options["min_new_tokens"] = 1
        pad = self.tokenizer.pad_token_id
        if pad is None and eos:
            pad = eos[0]
        return {**options, "eos_token_id": eos or None, "pad_token_id": pad}

    def context_end(self, run: PolicyRun, task: Task, sample: Sample, prompt: Prompt) -> int | None:
        """Where the policy's compression stops: the question's first token in query-aware mode,
        None (the whole prompt) otherwise, for dense, and where the question cannot be found (warned)."""
        if self.config.compress != "context" or run.name == DENSE:
            return None
        if prompt.question_start is None:
            warnings.warn(f"{task.name} sample {sample.index}: the question cannot be told apart from the context "
                          "(cut by truncation, or changed by the chat template); the whole prompt is compressed",
                          stacklevel=3)
        return prompt.question_start

    def run_sample(self, run: PolicyRun, task: Task, sample: Sample) -> dict[str, Any]:
        """One sample under one policy: its prompt, prediction, official score and the cache's report."""
        prompt = self.build(task, sample)
        context_end = self.context_end(run, task, sample, prompt)
        ids = torch.tensor([prompt.ids], device=self.model.device)
        out, seconds = policy_generate(self.model, run, ids, context_end, self._patch_options(),
                                       **self.generation_options(task))
        prediction = self.tokenizer.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True)
        policy = None if run.name == DENSE else run.policy()
        return {
            "policy": run.label, "applied": DENSE if policy is None else policy.describe(),
            "task": task.name, "index": sample.index, "id": sample.id, "sample": sample.digest, "length": sample.length,
            "prompt_tokens": len(prompt.ids), "question_tokens": prompt.question_tokens, "truncated": prompt.truncated,
            "chat": prompt.chat, "query_aware": context_end is not None,
            "new_tokens": out.sequences.shape[1] - ids.shape[1], "prediction": prediction,
            "answers": sample.answers, "all_classes": sample.all_classes,
            "score": score_sample(task.metric, prediction, sample.answers, sample.all_classes, task.first_line),
            **cache_report(cache_of(out), self.bytes_per_token, policy is not None and is_lossy(policy)),
            "seconds": round(seconds, 4),
        }


def _check_same_samples(rows: list[dict[str, Any]], samples: dict[str, list[Sample]], path: Path) -> None:
    """Refuse to resume rows whose sample is not the one the data now holds at that index (the
    task file changed since): they would be scored against other questions."""
    digests = {(task, s.index): s.digest for task, items in samples.items() for s in items}
    for row in rows:
        expected = digests.get((row["task"], row["index"]))
        if expected is not None and expected != row["sample"]:
            raise ValueError(f"{path}: its {row['task']} sample {row['index']} differs from that sample in the data "
                             "now (the task file changed); pass --fresh (fresh=True) to start a new file, or another "
                             "--out")
