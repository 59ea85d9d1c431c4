"""``kvx lm-eval``: lm-evaluation-harness tasks through kvx's model type, dense and each policy.

Its arguments live here (``kvx/cli.py`` registers the command with one line); the harness is
imported only when the command runs. Every lm-eval flag is available through
``python -m kvx.eval.lm_eval_bridge --model kvx ...`` (the harness's own command line).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from kvx.eval.needle import DEFAULT_MODEL, DENSE


def add_lm_eval_command(sub: argparse._SubParsersAction) -> None:
    """Register ``kvx lm-eval`` on the ``kvx`` command's sub-parsers."""
    from kvx.cli import int_at_least, model_flags

    p = sub.add_parser(
        "lm-eval", help="lm-evaluation-harness tasks (RULER, LongBench, your own) dense and under each policy",
        description="Runs lm-eval tasks through kvx's model type ('--model kvx' of lm-eval: the harness's HF model, "
                    "patched): dense, then each --policy, on one loaded model. Prints each task's main metric with the "
                    "KV bytes its calls held, and writes OUT/lm-eval.json.",
    )
    p.add_argument("--tasks", required=True, help="lm-eval task names, comma-separated (e.g. niah_single_1)")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="local directory or hub id (default: kvx's shipped model)")
    p.add_argument("--tokenizer", help="tokenizer path, when not in the model directory")
    p.add_argument("--policy", action="append", metavar="NAME[:k=v,...][+NAME...]",
                   help="a policy to compare with dense (repeatable), e.g. snapkv:budget=1024+kivi:bits=4")
    p.add_argument("--no-dense", action="store_true", help="do not run the dense baseline")
    p.add_argument("--include-path", help="a directory of task YAML files (local tasks)")
    p.add_argument("--no-default-tasks", action="store_true",
                   help="index only --include-path's tasks (fast), not the harness's whole catalogue")
    p.add_argument("--limit", type=float, help="examples per task (a fraction when below 1)")
    p.add_argument("--metadata", help="JSON given to the tasks, e.g. '{\"max_seq_lengths\": [4096]}' for RULER "
                   "(which also needs \"tokenizer\": PATH, default --model)")
    p.add_argument("--batch-size", type=int_at_least(1), default=1, help="requests per batch (default 1)")
    p.add_argument("--max-length", type=int_at_least(1), help="the model's context limit for the harness "
                   "(default: from its config)")
    p.add_argument("--chunk-size", type=int_at_least(1), help="policies prefill in chunks of this many tokens "
                   "(default: kvx.patch's)")
    model_flags(p)
    p.add_argument("--out", default="runs/lm-eval", help="output directory (default runs/lm-eval)")
    p.set_defaults(func=run_command)


def parse_metadata(text: str | None, model: str) -> dict[str, Any] | None:
    """``--metadata`` as a dict (with ``tokenizer`` defaulting to the model, as RULER needs), or an error."""
    if text is None:
        return None
    try:
        metadata = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--metadata {text!r}: not JSON ({err.msg}); e.g. '{{\"max_seq_lengths\": [4096]}}'") from None
    if not isinstance(metadata, dict):
        raise ValueError(f"--metadata {text!r}: a JSON object, e.g. '{{\"max_seq_lengths\": [4096]}}'")
    return {"tokenizer": model, **metadata}


def run_command(args: argparse.Namespace) -> int:
    """``kvx lm-eval``: check everything, load the model once, evaluate dense and each policy."""
    from kvx.cli import output_dir
    from kvx.eval import needle

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError(f"--tasks {args.tasks!r}: give at least one task name, comma-separated")
    runs = needle.parse_policies(args.policy or [], [], with_dense=not args.no_dense)
    if not runs:
        raise ValueError("--no-dense leaves no policy to run; add --policy SPEC")
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    metadata = parse_metadata(args.metadata, args.tokenizer or args.model)
    from kvx.eval import lm_eval_bridge as bridge

    manager = bridge.task_manager(args.include_path, metadata, include_defaults=not args.no_default_tasks)
    bridge.check_tasks(tasks, manager)
    out = output_dir(args.out)
    tokenizer = needle.load_tokenizer(args.model, args.tokenizer)
    model = needle.load_causal_lm(args.model, args.dtype, args.device)
    needle.check_patchable(model, runs)
    rows = []
    for run in runs:
        rows += bridge.evaluate_policy(model, tokenizer, None if run.name == DENSE else run.label, tasks, manager,
                                       batch_size=args.batch_size, max_length=args.max_length,
                                       chunk_size=args.chunk_size or "auto", limit=limit, metadata=metadata)
    print(format_rows(rows))
    path = Path(out) / "lm-eval.json"
    path.write_text(json.dumps(rows, indent=1))
    print(f"wrote {path}")
    return 0


def format_rows(rows: list[dict[str, Any]]) -> str:
    """A markdown table: policy, task, main metric, KV bytes (and against dense on the same task), fewest kept."""
    dense = {r["task"]: r["kv_bytes_mean"] for r in rows if r["policy"] == DENSE}
    lines = ["| policy | task | metric | score | KV bytes | vs dense | kept (min) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r["kv_bytes_mean"] / dense[r["task"]] if dense.get(r["task"]) and r["kv_bytes_mean"] is not None else None
        lines.append(f"| {r['policy']} | {r['task']} | {r['metric'] or '-'} | "
                     f"{'-' if r['score'] is None else format(r['score'], '.4g')} | "
                     f"{'-' if r['kv_bytes_mean'] is None else format(r['kv_bytes_mean'], '.0f')} | "
                     f"{'-' if ratio is None else format(ratio, '.3f')} | {r['kept_tokens_min']} |")
    return "\n".join(lines)
