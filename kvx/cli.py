"""The ``kvx`` command.

Bad input is a user mistake, not a crash: every command prints it as one line,
``kvx <command>: error: ...`` (naming the offending value, its flag and the valid choices), and
exits 2, before any work starts where the mistake can be seen up front. ``--debug`` shows the
traceback. An unexpected failure prints one line too, and exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import traceback
import warnings
from pathlib import Path

from kvx.policy import list_policies

USER_ERRORS = (ValueError, TypeError, OSError, ImportError)
"""What bad input raises (kvx's checks, a missing or unreadable file, a missing extra): exit 2."""

AXIS_TITLES = {
    "selection": "selection (which tokens each KV head keeps)",
    "storage": "storage (how kept tokens are held; dense unless composed)",
    "method": "method (which query-key pairs attention computes; dense unless composed)",
}


def _cmd_policies(args: argparse.Namespace) -> int:
    if args.spec is not None:
        return _describe_spec(args.spec, args.json)
    policies = list_policies()
    if args.json:
        print(json.dumps(policies, indent=2, default=repr))
        return 0
    for axis, title in AXIS_TITLES.items():
        on_axis = [p for p in policies if p["axis"] == axis]
        print(f"== {title}")
        if not on_axis:
            print("    (none registered yet)")
        for p in on_axis:
            needs = f" [needs {p['storage']} storage]" if axis == "selection" and p["storage"] != "dense" else ""
            print(f"{p['name']}: {p['description']}{needs}")
            for opt in p["options"]:
                print(f"    {opt['name']:<16} = {opt['default']!r:<9} {opt['help']}")
        print()
    print("Compose one policy per axis with '+' (on the method axis, a prefill method and a decode method: "
          "'vertical_slash+quest'): kvx policies 'snapkv:budget=1024+ragged' describes one; "
          "in Python, kvx.compose(kvx.make_policy('snapkv', budget=1024), 'ragged').")
    return 0


def _describe_spec(spec: str, as_json: bool) -> int:
    """``kvx policies SPEC``: the policy a spec names, each axis's part and its options."""
    from kvx.compose import as_composed, from_spec

    composed = as_composed(from_spec(spec))
    parts = [{"axis": part.axis, "name": part.name, "options": {o["name"]: getattr(part, o["name"])
                                                                   for o in part.options()},
              "implied": any(part is implied for implied in composed.implied)} for part in composed.parts]
    if as_json:
        print(json.dumps({"name": composed.name, "axes": composed.axes(), "parts": parts}, indent=2, default=repr))
        return 0
    print(composed.name)
    for axis in composed.axes():
        on_axis = [p for p in parts if p["axis"] == axis]  # two on the method axis: prefill, then decode
        for part in on_axis:
            opts = ", ".join(f"{k}={v!r}" for k, v in part["options"].items())
            note = " (needed by the selection)" if part["implied"] else ""
            print(f"    {axis:<10} {part['name']}({opts}){note}")
        if not on_axis:
            print(f"    {axis:<10} dense")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from kvx.compat import TRANSFORMERS_VERSION, causal_lm_model_types
    from kvx.patches import coverage

    if not args.verify and (args.write or args.model_type):
        given = "--write" if args.write else f"model types ({' '.join(args.model_type)})"
        raise ValueError(f"{given} only work with --verify (which checks the installed transformers now)")
    if args.verify:
        known = causal_lm_model_types()
        unknown = [name for name in args.model_type if name not in known]
        if unknown:
            raise ValueError(f"unknown model type(s) {', '.join(unknown)}; the causal-LM types of transformers "
                             f"{TRANSFORMERS_VERSION}: {', '.join(known)}")
        outcomes = coverage.check_all(args.model_type or None, progress=not args.no_progress)
        print(coverage.format_table(outcomes))
        print(f"\ntransformers {TRANSFORMERS_VERSION}: {coverage.summary(outcomes)}")
        if args.write:
            coverage.write_report(outcomes)
            print(f"written to {coverage.COVERAGE_FILE}")
        return 1 if any(o.status == coverage.FAILED for o in outcomes) else 0
    report = coverage.read_report()
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    rows = [coverage.Outcome(**row) for row in report["model_types"]]
    verified = [o.model_type for o in rows if o.status == coverage.VERIFIED]
    print(f"verified on transformers {report['transformers']} (installed: {TRANSFORMERS_VERSION}); "
          f"`kvx models --verify` checks the installed release")
    print(f"\n{len(verified)} verified (full-budget outputs equal the model's, evicting runs bounded):")
    print(textwrap.fill(", ".join(verified), width=100, initial_indent="  ", subsequent_indent="  "))
    for status in (coverage.REFUSED, coverage.NOT_BUILT, coverage.FAILED):
        chosen = [o for o in rows if o.status == status]
        if chosen:
            print(f"\n{len(chosen)} {status}:")
            print(coverage.format_table(chosen))
    return 0


def int_at_least(minimum: int):
    """An argparse type: an int >= ``minimum``, else an error naming the value and the bound."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int >= {minimum}"
    return parse


def device_arg(text: str) -> str:
    """An argparse type: a device this machine has (cpu, cuda, cuda:N, mps)."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; choose from cpu, cuda, cuda:N, mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine; use cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available on this machine; use cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"unsupported device {text!r}; choose from cpu, cuda, cuda:N, mps")
    return text


def model_flags(parser: argparse.ArgumentParser) -> None:
    """``--dtype`` and ``--device`` of a command that loads a model (``kvx.eval.needle.load_causal_lm``)."""
    parser.add_argument("--dtype", default="auto", help="model dtype: auto, float32, bfloat16, float16")
    parser.add_argument("--device", type=device_arg,
                        help="cpu, cuda, cuda:N or mps; default: where from_pretrained puts it")


def progress_flag(parser: argparse.ArgumentParser) -> None:
    """``--no-progress``, for a command that shows a progress bar."""
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def safetensors_path(path: str, flag: str = "--out") -> Path:
    """``path`` as the name of a .safetensors file to write, or an error naming ``flag``."""
    out = Path(path)
    if out.suffix != ".safetensors":
        raise ValueError(f"{flag} {path}: give a .safetensors file name")
    return out


def output_dir(path: str, flag: str = "--out") -> Path:
    """``path`` as a directory kvx can write to (created if missing), or an error naming ``flag``."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag} {path}: is a file, not a directory; give a directory for the results")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{flag} {path}: cannot create the directory ({err.strerror or err})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: the directory is not writable; give another one")
    return out


def input_file(path: str, flag: str) -> Path:
    """``path`` as a readable file, or an error naming ``flag``."""
    given = Path(path)
    if not given.exists():
        raise ValueError(f"{flag} {path}: no such file")
    if not given.is_file():
        raise ValueError(f"{flag} {path}: not a file")
    if not os.access(given, os.R_OK):
        raise ValueError(f"{flag} {path}: the file is not readable")
    return given


def read_text(path: str, flag: str) -> str:
    """The UTF-8 text of file ``path``, or an error naming ``flag``."""
    try:
        return input_file(path, flag).read_text()
    except UnicodeDecodeError as err:
        raise ValueError(f"{flag} {path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})") from None


def _cmd_demo(args: argparse.Namespace) -> int:
    from kvx.demo import run_demo

    run_demo(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens)
    return 0


def _cmd_needle(args: argparse.Namespace) -> int:
    from kvx.eval import needle
    from kvx.eval.measure import parse_dtype

    if args.dtype != "auto":
        parse_dtype(args.dtype)
    policies = needle.parse_policies(args.policy or [], [], with_dense=not args.no_dense)
    settings = dict(
        lengths=_parse_ints(args.lengths, "--lengths") if args.lengths else None,
        depths=_parse_numbers(args.depths, "--depths") if args.depths else None,
        variants=_split(args.variants, "--variants") if args.variants else None,
        samples=args.samples,
        policies=policies if args.policy else None,
        distractors=args.distractors,
        max_new_tokens=args.max_new_tokens,
        haystack_text=read_text(args.haystack, "--haystack") if args.haystack else None,
        use_chat_template=False if args.no_chat_template else None,
        compress=args.compress,
    )
    if args.config:
        config = needle.config_from_yaml(input_file(args.config, "--config"), **settings)
    else:
        defaults = dict(lengths=[1024, 2048, 4096], policies=policies or [needle.PolicyRun(needle.DENSE)])
        config = needle.NeedleConfig(**{**defaults, **{k: v for k, v in settings.items() if v is not None}})
    config = _policy_flags(config, args)
    out = output_dir(args.out)
    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    tokenizer = needle.load_tokenizer(args.model, args.tokenizer)
    needle.check_prompts(config, tokenizer)
    model = needle.load_causal_lm(args.model, args.dtype, args.device)
    runner = needle.NeedleRunner(model, tokenizer, config, out, model_path=args.model)
    rows = runner.run(progress=not args.no_progress, fresh=args.fresh)
    labels = [run.label for run in config.policies]
    summary = needle.summarize(rows, labels)
    print(needle.format_summary(summary))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    for path in needle.write_heatmaps(rows, out):
        print(f"wrote {path}")
    print(f"results: {runner.results_path}")
    return 0


def _policy_flags(config, args: argparse.Namespace):
    """``--opt`` and ``--no-dense`` applied to the run's policies, whether they come from ``--policy``
    or from the ``--config`` file."""
    import dataclasses

    from kvx.eval import needle

    runs = needle.apply_options([dataclasses.replace(run, options=dict(run.options)) for run in config.policies],
                                args.opt or [])
    if args.no_dense:
        runs = [run for run in runs if run.name != needle.DENSE]
        if not runs:
            raise ValueError("--no-dense leaves no policy to run; add --policy NAME (or policies in --config)")
    return dataclasses.replace(config, policies=runs)


def _split(text: str, flag: str) -> list[str]:
    """Comma-separated items, or an error naming ``flag`` when there are none."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"{flag} {text!r}: give at least one value, comma-separated")
    return items


def _parse_ints(text: str, flag: str) -> list[int]:
    """Positive token counts (``512``, ``4k``), comma-separated, or an error naming ``flag``."""
    from kvx.eval.needle import parse_length

    values = [parse_length(t) for t in _split(text, flag)]
    if min(values) <= 0:
        raise ValueError(f"{flag} must be positive numbers, comma-separated; got {text!r}")
    return _distinct(values, flag)


def _parse_numbers(text: str, flag: str) -> list[float]:
    """Numbers, comma-separated, or an error naming ``flag`` and the value it could not read."""
    values = []
    for item in _split(text, flag):
        try:
            values.append(float(item))
        except ValueError:
            raise ValueError(f"{flag}: cannot read {item!r} as a number (e.g. {flag} 0,50,100)") from None
    return _distinct(values, flag)


def _distinct(values: list, flag: str) -> list:
    """``values`` itself, or an error naming the first value ``flag`` lists twice."""
    from kvx.eval.needle import first_repeat

    repeated = first_repeat(values)
    if repeated is not None:
        raise ValueError(f"{flag} lists {repeated:g} twice; give each value once")
    return values


def _progress(enabled: bool):
    return (lambda msg: print(f"  {msg}", file=sys.stderr, flush=True)) if enabled else None


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from kvx.eval import bench
    from kvx.eval.measure import parse_dtype

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = parse_dtype(args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    lengths = _parse_ints(args.lengths, "--lengths")
    if args.bench == "e2e":
        policies = (bench.parse_policy_list(args.policies) if args.policies else
                    bench.parse_policy_specs(args.policy or ["snapkv", "streaming_llm"]))
        out = output_dir(args.out)
        model = bench.build_model(args.model, device, dtype, max(lengths) + args.new_tokens, args.layers)
        rows = bench.bench_e2e(model, lengths, policies, args.new_tokens, args.repeats, args.warmup,
                               _progress(not args.quiet), args.chunk_size)
        columns = bench.E2E_COLUMNS
    else:
        ops = _split(args.ops, "--ops") if args.ops else list(bench.KERNELS)
        head_dims, gqa = _parse_ints(args.head_dims, "--head-dims"), _parse_ints(args.gqa, "--gqa")
        bench.check_kernel_grid(ops, gqa)
        out = output_dir(args.out)
        rows = bench.bench_kernels(ops, lengths, head_dims, gqa, device, dtype, repeats=args.repeats,
                                   progress=_progress(not args.quiet))
        columns = bench.KERNEL_COLUMNS
    print(bench.markdown_table(rows, args.bench, columns))
    for path in bench.write_results(rows, out, args.bench, columns):
        print(f"wrote {path}")
    plot = bench.write_plot(rows, out, args.bench)
    print(f"wrote {plot}" if plot else "no plot: matplotlib is not installed (pip install 'kvx[eval]')")
    return 0


class Parser(argparse.ArgumentParser):
    """argparse, with its errors in kvx's one-line form: ``kvx <command>: error: ...``, exit 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _debug_flag(parser: argparse.ArgumentParser, top: bool = False) -> None:
    """``--debug`` on the top parser and on every command (a command's copy only sets it when given)."""
    parser.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                        help="show the Python traceback of an error")


def _debug_everywhere(parser: argparse.ArgumentParser) -> None:
    """Give every command and sub-command its own ``--debug`` (so it may follow the command)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _debug_flag(child)
                _debug_everywhere(child)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="kvx", description="Long-context KV-cache compression for transformers.")
    _debug_flag(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser(
        "policies", help="list the policies by axis with their options and defaults, or describe one spec",
        description="Without SPEC: every registered policy, grouped by the axis it answers (selection, storage, "
                    "method). With SPEC (e.g. 'snapkv:budget=1024,window=32+ragged'): the composed policy it "
                    "names, with the part and options on each axis.",
    )
    p.add_argument("spec", nargs="?", help="a policy spec: name[:key=value,...][+name[:key=value,...]...]")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=_cmd_policies)
    p = sub.add_parser(
        "models", help="the architectures kvx verified, and those it refuses with the reason",
        description="Without options: the verified, refused and unbuildable model types from kvx's last full "
                    "check (kvx/patches/coverage.json) and the transformers release it ran on. --verify checks "
                    "the installed transformers now (a tiny random model per causal-LM type, about a minute).",
    )
    p.add_argument("--verify", action="store_true", help="check the installed transformers now")
    p.add_argument("--write", action="store_true", help="with --verify: save the result as kvx's shipped list")
    p.add_argument("--json", action="store_true", help="print the shipped list as JSON")
    progress_flag(p)
    p.add_argument("model_type", nargs="*", help="with --verify: only these model types")
    p.set_defaults(func=_cmd_models)
    p = sub.add_parser("demo", help="patch a tiny random llama; compare dense and compressed KV bytes and outputs")
    p.add_argument("--prompt-tokens", type=int_at_least(1), default=2048, help="prompt length (default 2048)")
    p.add_argument("--new-tokens", type=int_at_least(1), default=16, help="tokens to generate (default 16)")
    p.set_defaults(func=_cmd_demo)

    from kvx.eval.haystack import VARIANTS
    from kvx.eval.needle import DEFAULT_MODEL

    p = sub.add_parser(
        "needle",
        help="needle-in-a-haystack accuracy of dense and compressed caches on identical prompts",
        description="Needle-in-a-haystack: every policy answers the same prompts; results are appended per cell "
        "to OUT/results.jsonl (a rerun resumes), with a summary table and one heatmap per policy.",
    )
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="local directory or hub id (default: kvx's shipped model)")
    p.add_argument("--tokenizer", help="tokenizer path, when not in the model directory")
    p.add_argument("--config", help="YAML file describing the run (flags given here override it)")
    p.add_argument("--lengths", help="context lengths in tokens, comma-separated (default 1k,2k,4k)")
    p.add_argument("--depths", help="needle depths in percent, comma-separated (default 0,25,50,75,100)")
    p.add_argument("--variants", help=f"comma-separated, from {', '.join(VARIANTS)} (default single)")
    p.add_argument("--samples", type=int_at_least(1), help="prompts per cell (default 1)")
    p.add_argument("--distractors", type=int_at_least(0),
                   help="distractor needles for multikey / absent (default 2; at least 1 with those variants)")
    p.add_argument("--policy", action="append", metavar="NAME[:k=v,...][+NAME...]",
                   help="a policy to compare (repeatable); '+' composes one policy per axis, e.g. snapkv:budget=256+ragged")
    p.add_argument("--opt", action="append", metavar="KEY=VALUE",
                   help="an option for every listed policy (from --policy or --config) that has it, unless its spec "
                        "sets it")
    p.add_argument("--no-dense", action="store_true", help="do not add the dense baseline")
    p.add_argument("--out", default="runs/needle", help="output directory (default runs/needle); a rerun into it "
                   "resumes when the model, tokenizer and settings are the same, and refuses otherwise")
    p.add_argument("--fresh", action="store_true", help="start a new results file in --out, moving an existing "
                   "one aside (results-N.jsonl) instead of resuming it")
    p.add_argument("--haystack", help="text file to use as filler instead of generated text")
    p.add_argument("--no-chat-template", action="store_true", help="plain prompts even if the tokenizer has a chat template")
    p.add_argument("--compress", choices=["prompt", "context"],
                   help="prompt (default): compress the whole prompt, question included; context: compress the "
                   "context alone, then append the question uncompressed (query-agnostic compression)")
    p.add_argument("--max-new-tokens", type=int_at_least(1), help="tokens to generate (default: enough for the answer)")
    model_flags(p)
    progress_flag(p)
    p.set_defaults(func=_cmd_needle)
    from kvx.eval.longbench.cli import add_longbench_command

    add_longbench_command(sub)

    from kvx.eval import profile_heads
    from kvx.eval.bench import KERNELS, PRESETS

    p = sub.add_parser("bench", help="speed and memory of policies (e2e) and attention ops (kernels) against dense")
    bench_sub = p.add_subparsers(dest="bench", metavar="WHAT", required=True)
    for name, helptext in (("e2e", "prefill time, decode tokens/s, KV bytes and peak memory per policy and length"),
                           ("kernels", "each attention op against torch SDPA (and flash-attn when installed)")):
        b = bench_sub.add_parser(name, help=helptext, description=helptext)
        b.add_argument("--device", type=device_arg, help="cpu or cuda (default: cuda when available)")
        b.add_argument("--dtype", help="float32, bfloat16, float16 (default: bfloat16 on GPU, float32 on CPU)")
        b.add_argument("--repeats", type=int_at_least(1), default=3,
                       help="timed repetitions; the median is reported (default 3)")
        b.add_argument("--out", default="docs/benchmarks", help="directory for JSON/CSV/markdown (one set per device)")
        b.add_argument("--quiet", action="store_true", help="no progress lines")
        b.set_defaults(func=_cmd_bench)
    e2e, kernels = bench_sub.choices["e2e"], bench_sub.choices["kernels"]
    e2e.add_argument("--model", default="tiny-llama",
                     help=f"a local model directory or a random-weight preset: {', '.join(PRESETS)} (default tiny-llama)")
    e2e.add_argument("--layers", type=int_at_least(1), help="override the number of layers (to fit a large shape)")
    e2e.add_argument("--lengths", default="4k,16k", help="context lengths (default 4k,16k)")
    chosen = e2e.add_mutually_exclusive_group()
    chosen.add_argument("--policy", action="append", metavar="NAME[:k=v,...][+NAME...]",
                        help="a policy to compare with dense (repeatable), the spec syntax of needle and sweep files, "
                             "e.g. snapkv:budget=512,window=16+ragged (default: snapkv and streaming_llm)")
    chosen.add_argument("--policies", metavar="SPEC,SPEC,...",
                        help="the same specs in one comma-separated list (dense,snapkv:budget=512,window=16,"
                             "streaming_llm): an item starting with key=value belongs to the spec before it")
    e2e.add_argument("--new-tokens", type=int_at_least(1), default=32, help="decoded tokens timed per run (default 32)")
    e2e.add_argument("--warmup", type=int_at_least(0), default=1, help="untimed warm-up runs (default 1)")
    e2e.add_argument("--chunk-size", type=int_at_least(1), help="policies prefill in chunks of this many tokens, compressing "
                     "between them (dense runs in one piece)")
    kernels.add_argument("--ops", help=f"comma-separated, from {', '.join(KERNELS)} (default all)")
    kernels.add_argument("--lengths", default="1k,4k", help="key lengths (default 1k,4k)")
    kernels.add_argument("--head-dims", default="64,128", help="head dims (default 64,128)")
    kernels.add_argument("--gqa", default="1,4,8", help="query heads per KV head, each dividing the 32 query heads "
                         "(default 1,4,8)")
    from kvx.eval.lm_eval_command import add_lm_eval_command

    add_lm_eval_command(sub)
    from kvx.eval.sweep import add_sweep_command

    add_sweep_command(sub)
    profile_heads.add_parser(sub)
    from kvx.eval import search_patterns

    search_patterns.add_parser(sub)
    _debug_everywhere(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status (2: bad input, 1: an unexpected failure)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:  # argparse has printed its one line (or --help)
        return exit.code if isinstance(exit.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 2
    prog = "kvx " + " ".join(filter(None, (args.command, getattr(args, "bench", None))))
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning(prog)
        try:
            return args.func(args)
        except Exception as err:  # noqa: BLE001 - every failure becomes one line; --debug shows the traceback
            return _report(prog, err, args.debug)
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr)
            return 130


def _report(prog: str, err: Exception, debug: bool) -> int:
    """Print ``err`` as one line (and its traceback with ``--debug``); the exit status it deserves."""
    if debug:
        traceback.print_exception(err)
    message = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, USER_ERRORS):
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    hint = "" if debug else " (run again with --debug for the traceback)"
    print(f"{prog}: internal error: {type(err).__name__}: {message}{hint}", file=sys.stderr)
    return 1


def _one_line_warning(prog: str):
    """``warnings.showwarning`` that prints ``kvx <command>: warning: ...`` on one line."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"{prog}: warning: {' '.join(str(message).split())}", file=sys.stderr)

    return show


if __name__ == "__main__":
    sys.exit(main())
