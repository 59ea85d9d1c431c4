"""``kvx longbench``: its arguments and handler (registered by ``kvx.cli.build_parser``)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from kvx.eval.longbench.tasks import E_TASKS, TASKS


def add_longbench_command(sub: Any) -> None:
    """Add ``kvx longbench`` to the ``kvx`` command's sub-parsers."""
    from kvx.cli import int_at_least, model_flags, progress_flag
    from kvx.eval.needle import DEFAULT_MODEL

    p = sub.add_parser(
        "longbench",
        help="LongBench / LongBench-E scores of dense and compressed caches on identical prompts (local data)",
        description="LongBench v1 or LongBench-E with the official prompts, generation lengths, EOS tokens and "
        "metrics, read from local JSONL files; results are appended per sample to OUT/results.jsonl (a rerun "
        "resumes) with the per-layer kept tokens and bytes of every sample, and a score table is printed.",
    )
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="local directory or hub id (default: kvx's shipped "
                   "model, which only checks the pipeline: its vocabulary is its needle task's)")
    p.add_argument("--tokenizer", help="tokenizer path, when not in the model directory")
    p.add_argument("--data", required=True, metavar="DIR", help="directory of the official JSONL files: <task>.jsonl "
                   "(LongBench) or <task>_e.jsonl (LongBench-E); see docs/longbench.md")
    p.add_argument("--e", dest="longbench_e", action="store_true", help="LongBench-E (<task>_e.jsonl), scored by "
                   "length range too")
    p.add_argument("--tasks", help=f"comma-separated (default all): {', '.join(TASKS)}; LongBench-E has "
                   f"{', '.join(E_TASKS)}")
    p.add_argument("--limit", type=int_at_least(1), help="the first N samples of each task")
    p.add_argument("--policy", action="append", metavar="NAME[:k=v,...][+NAME...]",
                   help="a policy to compare (repeatable); '+' composes one policy per axis, "
                   "e.g. snapkv:budget=256+ragged")
    p.add_argument("--opt", action="append", metavar="KEY=VALUE",
                   help="an option for every listed policy that has it, unless its spec sets it")
    p.add_argument("--no-dense", action="store_true", help="do not add the dense baseline")
    p.add_argument("--compress", choices=["prompt", "context"], default="prompt",
                   help="prompt (default): compress the whole prompt; context: query-aware, compress the context alone "
                   "and append the question uncompressed")
    p.add_argument("--max-length", default="model", metavar="TOKENS|model|none",
                   help="middle-truncate longer prompts to this many tokens; model (default): to the model's "
                   "max_position_embeddings less the task's generation length; none: never")
    p.add_argument("--max-new-tokens", type=int_at_least(1), help="cap every task's official generation length (a "
                   "quick check of the pipeline; the scores are then not the official protocol's)")
    p.add_argument("--no-chat-template", action="store_true", help="plain prompts even if the tokenizer has a chat "
                   "template (the official no-chat tasks are always plain)")
    p.add_argument("--out", default="runs/longbench", help="output directory (default runs/longbench); a rerun into it "
                   "resumes when the model, tokenizer and settings are the same, and refuses otherwise")
    p.add_argument("--fresh", action="store_true", help="start a new results file in --out, moving an existing one "
                   "aside (results-N.jsonl) instead of resuming it")
    model_flags(p)
    progress_flag(p)
    p.set_defaults(func=run_longbench_command)


def parse_max_length(text: str) -> int | str | None:
    """``--max-length``: a token count, ``model`` or ``none``; anything else raises naming it."""
    lowered = text.strip().lower()
    if lowered in ("model", "none"):
        return None if lowered == "none" else "model"
    try:
        value = int(lowered)
    except ValueError:
        value = 0
    if value < 2:
        raise ValueError(f"--max-length {text!r}: give a token count >= 2, 'model' or 'none'")
    return value


def config_from_args(args: argparse.Namespace):
    """The run the flags describe (every check that needs no model done here)."""
    from kvx.cli import _split
    from kvx.eval.longbench.runner import LongBenchConfig
    from kvx.eval.needle import DENSE, apply_options, parse_policies

    runs = parse_policies(args.policy or [], [], with_dense=not args.no_dense)
    runs = apply_options(runs, args.opt or [])
    if args.no_dense:
        runs = [run for run in runs if run.name != DENSE]
        if not runs:
            raise ValueError("--no-dense leaves no policy to run; add --policy NAME")
    return LongBenchConfig(
        data_dir=args.data, tasks=_split(args.tasks, "--tasks") if args.tasks else None, policies=runs,
        longbench_e=args.longbench_e, limit=args.limit, max_length=parse_max_length(args.max_length),
        use_chat_template=not args.no_chat_template, compress=args.compress, max_new_tokens=args.max_new_tokens,
    )


def run_longbench_command(args: argparse.Namespace) -> int:
    from kvx.cli import output_dir
    from kvx.eval import needle
    from kvx.eval.longbench.runner import LongBenchRunner
    from kvx.eval.longbench.summary import format_summary, summarize
    from kvx.eval.longbench.tasks import check_data
    from kvx.eval.measure import parse_dtype

    if args.dtype != "auto":
        parse_dtype(args.dtype)
    config = config_from_args(args)
    check_data(config.data_dir, config.selected(), config.longbench_e)
    out = output_dir(args.out)
    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    tokenizer = needle.load_tokenizer(args.model, args.tokenizer)
    model = needle.load_causal_lm(args.model, args.dtype, args.device)
    runner = LongBenchRunner(model, tokenizer, config, out, model_path=args.model)
    rows = runner.run(progress=not args.no_progress, fresh=args.fresh)
    summary = summarize(rows, [run.label for run in config.policies], buckets=config.longbench_e)
    print(format_summary(summary))
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    print(f"results: {runner.results_path}")
    return 0
