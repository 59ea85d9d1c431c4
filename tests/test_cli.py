"""The kvx command explains itself."""

import json

from kvx.cli import main


def test_policies_lists_names_and_options(capsys):
    assert main(["policies"]) == 0
    out = capsys.readouterr().out
    assert "snapkv:" in out and "streaming_llm:" in out and "budget" in out and "1024" in out


def test_policies_json(capsys):
    assert main(["policies", "--json"]) == 0
    names = [p["name"] for p in json.loads(capsys.readouterr().out)]
    assert names == sorted(names) and "snapkv" in names


def test_models(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3"))


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "policies" in capsys.readouterr().out


def test_demo_runs_small(capsys):
    assert main(["demo", "--prompt-tokens", "300", "--new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "dense" in out and "snapkv(" in out and "streaming_llm(" in out
