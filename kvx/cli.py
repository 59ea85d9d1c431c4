"""The ``kvx`` command."""

from __future__ import annotations

import argparse
import json
import sys

from kvx.patches import ADAPTERS
from kvx.policy import list_policies


def _cmd_policies(args: argparse.Namespace) -> int:
    policies = list_policies()
    if args.json:
        print(json.dumps(policies, indent=2, default=repr))
        return 0
    for p in policies:
        print(f"{p['name']}: {p['description']}")
        for opt in p["options"]:
            print(f"    {opt['name']:<12} = {opt['default']!r:<8} {opt['help']}")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    for model_type, adapter in sorted(ADAPTERS.items()):
        print(f"{model_type:<12} {adapter.attention_class:<18} {adapter.notes}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from kvx.demo import run_demo

    run_demo(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvx", description="Long-context KV-cache compression for transformers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("policies", help="list the policies with their options and defaults")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=_cmd_policies)
    p = sub.add_parser("models", help="list the supported architectures (config.model_type)")
    p.set_defaults(func=_cmd_models)
    p = sub.add_parser("demo", help="patch a tiny random llama; compare dense and compressed KV bytes and outputs")
    p.add_argument("--prompt-tokens", type=int, default=2048, help="prompt length (default 2048)")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens to generate (default 16)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
