"""kvx as a model type of lm-evaluation-harness: ``--model kvx``.

    lm_eval --model kvx --model_args pretrained=PATH,policy=snapkv,budget=1024 --tasks niah_single_1

:class:`KvxLM` is the harness's ``HFLM`` with one difference: after loading the model it patches it
with the policy that ``model_args`` name. ``policy`` is a spec (``snapkv:budget=1024+kivi:bits=4``,
the syntax of ``kvx needle --policy``); the ``model_args`` that follow it and are not ``HFLM``
arguments are options of its last part, exactly as if the spec went on (``policy=snapkv,budget=1024``
reads as ``snapkv:budget=1024``); ``chunk_size`` goes to ``kvx.patch``. Without ``policy`` the model
runs dense. Anything else, such as a misspelt option, is an error that names it: nothing runs dense
while claiming a policy.

Every model call is recorded (:attr:`KvxLM.kv_records`: prompt tokens, KV bytes held at its end,
fewest tokens a compressed layer kept), and :func:`evaluate` returns their summary next to the
harness's metrics, so a run that compressed nothing shows it. Generation tasks (RULER, LongBench)
measure compression; a log-likelihood task scores one forward over the whole text, whose logits
compression does not change (only the cache it leaves behind is smaller).

lm-eval finds models by name in its registry and has no plugin entry point for them: the name
``kvx`` exists once this module is imported. ``kvx lm-eval`` imports it, and
``python -m kvx.eval.lm_eval_bridge ARGS`` is the ``lm_eval`` command with it imported (every flag of
the harness works). In Python: ``import kvx.eval.lm_eval_bridge`` before ``lm_eval.simple_evaluate``.
"""

from __future__ import annotations

import difflib
import inspect
import statistics
import sys
from pathlib import Path
from typing import Any

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as err:  # pragma: no cover - the message is the point
    raise ImportError(f"the lm-eval bridge needs lm-evaluation-harness: pip install 'kvx[lm-eval]' ({err})") from None

import kvx
from kvx.cache import cache_nbytes
from kvx.compat import cache_of
from kvx.compose import as_composed, from_spec, parse_spec, to_spec
from kvx.eval.needle import DENSE, _kept_tokens, parse_policies
from kvx.policy import Policy

MODEL_NAME = "kvx"


def hflm_arguments() -> set[str]:
    """The keyword arguments ``HFLM.__init__`` names."""
    return {name for name in inspect.signature(HFLM.__init__).parameters if name not in ("self", "kwargs")}


def policy_from_args(policy: str | Policy | None, options: dict[str, Any]) -> Policy | None:
    """The policy ``model_args`` describe: ``policy`` (a spec or an object) with ``options`` appended to
    its last part, in order; None (dense) when there is no policy and no option."""
    if isinstance(policy, Policy):
        if options:
            raise ValueError(f"model_args {sorted(options)}: set options on the policy object itself")
        return policy
    if policy is None or str(policy).strip() in ("", DENSE):
        if options:
            names = ", ".join(sorted(options))
            raise ValueError(f"model_args {names}: neither an HFLM argument nor a policy option (there is no policy=); "
                             f"HFLM takes {', '.join(sorted(hflm_arguments()))}")
        return None
    return from_spec(spec_with_options(str(policy), options))


def policy_label(policy: str | Policy | None, options: dict[str, Any]) -> str:
    """The policy as results name it (``kvx needle``'s label: ``snapkv:budget=64,window=8+kivi:bits=4``), or ``dense``."""
    if isinstance(policy, Policy):
        return object_label(policy)
    if policy is None or str(policy).strip() in ("", DENSE):
        return DENSE
    return parse_policies([spec_with_options(str(policy), options)], [], with_dense=False)[0].label


def object_label(policy: Policy) -> str:
    """A policy object as a spec with every option (``snapkv:budget=64,...+kivi:bits=2,...``), the parts a
    selection implies left out; its description where an option cannot be written in a spec."""
    composed = as_composed(policy)
    try:
        return "+".join(to_spec(part) for part in composed.parts if not any(part is i for i in composed.implied))
    except ValueError:
        return composed.describe()


def spec_with_options(spec: str, options: dict[str, Any]) -> str:
    """``spec`` with ``key=value`` options appended to its last ``+`` part (``snapkv`` + budget=64 ->
    ``snapkv:budget=64``)."""
    parse_spec(spec)  # a spec that does not parse fails here, naming itself
    if not options:
        return spec
    extra = ",".join(f"{key}={_spec_text(value)}" for key, value in options.items())
    last = spec.rsplit("+", 1)[-1]
    return f"{spec}{',' if ':' in last else ':'}{extra}"


def _spec_text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) or value is None else str(value)


@register_model(MODEL_NAME)
class KvxLM(HFLM):
    """The harness's ``HFLM``, its model patched with a kvx policy (see the module docstring)."""

    def __init__(self, pretrained: Any, policy: str | Policy | None = None, chunk_size: int | str | None = "auto",
                 **kwargs: Any):
        known = hflm_arguments()
        options = {k: v for k, v in kwargs.items() if k not in known}
        hflm_kwargs = {k: v for k, v in kwargs.items() if k in known}
        self.kvx_policy = policy_from_args(policy, options)  # checked before the model loads
        self.policy_label = policy_label(policy, options)
        self.kv_records: list[dict[str, Any]] = []
        super().__init__(pretrained=pretrained, **hflm_kwargs)
        if self.kvx_policy is not None:
            kvx.patch(self.model, self.kvx_policy, chunk_size=None if chunk_size == "none" else chunk_size)
        elif kvx.is_patched(self.model):  # a model the caller patched: its policy is what runs, not dense
            self.kvx_policy = kvx.policy_of(self.model)
            self.policy_label = object_label(self.kvx_policy)

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):
        out = super()._model_generate(context, max_length, stop, return_dict_in_generate=True, **generation_kwargs)
        self._record(context.shape[1], cache_of(out), "generate")
        return out.sequences

    def _model_call(self, inps, attn_mask=None, labels=None):
        outputs: list[Any] = []  # the model's output, for the cache it leaves
        handle = self.model.register_forward_hook(lambda module, args, out: outputs.append(out))
        try:
            logits = super()._model_call(inps, attn_mask, labels)
        finally:
            handle.remove()
        self._record(inps.shape[1], cache_of(outputs[-1]) if outputs else None, "forward")
        return logits

    def _record(self, prompt_tokens: int, cache: Any, kind: str) -> None:
        """One model call: prompt tokens, KV bytes held at its end, fewest tokens a compressed layer kept."""
        self.kv_records.append({
            "call": kind,
            "prompt_tokens": int(prompt_tokens),
            "kv_bytes": cache_nbytes(cache),
            "kept_tokens": None if cache is None else _kept_tokens(cache),
        })

    def kv_summary(self) -> dict[str, Any]:
        """The policy applied and what the recorded calls held: means of KV bytes and prompt tokens,
        and the fewest tokens any call kept (a compressed run keeps fewer than its prompt)."""
        records = self.kv_records
        kept = [r["kept_tokens"] for r in records if r["kept_tokens"] is not None]
        return {
            "policy": self.policy_label,
            "calls": len(records),
            "prompt_tokens_mean": statistics.fmean(r["prompt_tokens"] for r in records) if records else None,
            "kv_bytes_mean": statistics.fmean(r["kv_bytes"] for r in records) if records else None,
            "kept_tokens_min": min(kept) if kept else None,
            "kept_tokens_mean": statistics.fmean(kept) if kept else None,
        }


def task_manager(include_path: str | Path | None = None, metadata: dict[str, Any] | None = None,
                 include_defaults: bool = True):
    """lm-eval's task index, with the task YAMLs under ``include_path`` (a directory that must exist);
    ``include_defaults=False`` indexes those alone (seconds instead of the harness's whole catalogue)."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise FileNotFoundError(f"include path {include_path}: no such directory (it holds task YAML files)")
    if include_path is None and not include_defaults:
        raise ValueError("leaving out lm-eval's own tasks needs an include path with task YAML files")
    return TaskManager(include_path=str(include_path) if include_path else None, metadata=metadata,
                       include_defaults=include_defaults)


def check_tasks(tasks: list[str], manager) -> None:
    """Raise, naming each unknown task and the nearest known names, unless lm-eval knows every task."""
    known = set(manager.all_tasks)
    unknown = [task for task in tasks if task not in known]
    if unknown:
        hints = []
        for task in unknown:
            close = difflib.get_close_matches(task, known, n=3)
            hints.append(f"{task!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise ValueError(f"unknown lm-eval task(s) {', '.join(hints)}; `lm_eval ls tasks` lists them "
                         "(a local task: --include-path DIR with its YAML)")


def evaluate(lm: KvxLM, tasks: list[str], manager=None, limit: int | float | None = None,
             metadata: dict[str, Any] | None = None, **options: Any) -> dict[str, Any]:
    """Run ``tasks`` through ``lm``; returns ``{"results": {task: metrics}, "kvx": lm.kv_summary(),
    "versions": ...}`` (the calls of this run only)."""
    from lm_eval import simple_evaluate

    manager = manager or task_manager(metadata=metadata)
    if metadata is not None and manager.metadata != metadata:  # the harness would silently use the manager's
        raise ValueError(f"metadata {metadata} differs from the task manager's ({manager.metadata}); the tasks would "
                         "get the manager's: build it with task_manager(..., metadata)")
    check_tasks(tasks, manager)
    lm.kv_records.clear()
    out = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, metadata=metadata,
                          **options)
    return {"results": out["results"], "kvx": lm.kv_summary(), "versions": out.get("versions", {})}


def evaluate_policy(model: Any, tokenizer: Any, spec: str | None, tasks: list[str], manager=None, *,
                    batch_size: int = 1, max_length: int | None = None, chunk_size: int | str | None = "auto",
                    **options: Any) -> list[dict[str, Any]]:
    """One row per task: ``model`` (loaded once, left unpatched afterwards) patched with policy ``spec``
    (``None`` or ``dense``: as it is), its main metric as ``score``, every numeric metric, and what the
    cache held (:meth:`KvxLM.kv_summary`). ``options`` go to :func:`evaluate` (``limit``, ``metadata``)."""
    lm = KvxLM(pretrained=model, tokenizer=tokenizer, policy=spec, batch_size=batch_size, max_length=max_length,
               chunk_size=chunk_size)
    try:
        out = evaluate(lm, tasks, manager, **options)
    finally:
        if kvx.is_patched(model):
            kvx.unpatch(model)
    rows = []
    for task in tasks:
        metrics = {k: float(v) for k, v in out["results"].get(task, {}).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        main = main_metric(metrics, (options.get("metadata") or {}).get("max_seq_lengths"))
        rows.append({"policy": lm.policy_label, "task": task, "metric": main and main[0],
                     "score": main and main[1], "metrics": metrics, **out["kvx"]})
    return rows


def main_metric(metrics: dict[str, Any], lengths: list[int] | None = None) -> tuple[str, float] | None:
    """The metric a task is scored by: of its results (``exact_match,none``: metric, filter; stderrs
    skipped), the one named after the length run when there is one (RULER names a metric per length,
    ``4096,none``, and reports -1 for the lengths not run), else the first."""
    found = [(name, float(value)) for name, value in metrics.items()
             if "," in name and "_stderr" not in name and isinstance(value, (int, float)) and not isinstance(value, bool)]
    by_length = [m for m in found if m[0].split(",")[0] in {str(n) for n in lengths or []}]
    return (by_length or found or [None])[0]


def harness_main(argv: list[str] | None = None) -> None:
    """lm-eval's own command line, with the ``kvx`` model type registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    harness_main()
