"""``kvx sweep``: its arguments and handler (registered by ``kvx.cli.build_parser``)."""

from __future__ import annotations

from kvx.eval.sweep.runner import run_sweep


def add_sweep_command(sub) -> None:
    """Register ``kvx sweep`` on the ``kvx`` command's sub-parsers."""
    from kvx.cli import int_at_least, progress_flag

    p = sub.add_parser(
        "sweep", help="a grid of policies x options x ratios x benchmarks x lengths, resumable and sharded",
        description="Runs every cell of CONFIG's grid not yet in OUT/results.jsonl (a rerun resumes), appending each as "
                    "it finishes, then writes OUT/summary.md, summary.json and plots. Under torchrun each process runs "
                    "its shard of the cells (torchrun --nproc-per-node N -m kvx.cli sweep CONFIG).",
    )
    p.add_argument("config", help="the sweep's YAML file (see docs/sweep.md and configs/)")
    p.add_argument("--out", help="output directory (default runs/sweep-<config name>)")
    p.add_argument("--rank", type=int_at_least(0), help="run shard RANK of --world by hand, without torch.distributed")
    p.add_argument("--world", type=int_at_least(1), help="number of shards (with --rank)")
    p.add_argument("--summary-only", action="store_true", help="write the summary from the results file, run nothing")
    progress_flag(p)
    p.set_defaults(func=_cmd_sweep)


def _cmd_sweep(args) -> int:
    from kvx.cli import input_file, output_dir

    path = input_file(args.config, "config")
    if (args.rank is None) != (args.world is None):
        raise ValueError("--rank and --world go together (shard RANK of WORLD), or neither")
    if args.rank is not None and args.rank >= args.world:
        raise ValueError(f"--rank {args.rank} must be below --world {args.world}")
    out = output_dir(args.out or f"runs/sweep-{path.stem}")
    for written in run_sweep(path, out, args.rank, args.world, progress=not args.no_progress,
                             summary_only=args.summary_only):
        print(f"wrote {written}")
    return 0
