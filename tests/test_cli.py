"""The kvx command explains itself."""

import json
import re

from kvx.cli import main


def test_policies_lists_names_and_options(capsys):
    assert main(["policies"]) == 0
    out = capsys.readouterr().out
    assert "snapkv:" in out and "streaming_llm:" in out and "budget" in out and "1024" in out


def test_policies_json(capsys):
    assert main(["policies", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    names = [p["name"] for p in listed]
    assert names == sorted(names) and "snapkv" in names
    axes = {p["name"]: (p["axis"], p["storage"]) for p in listed}
    assert axes["snapkv"] == ("selection", "dense") and axes["head_budget"] == ("selection", "ragged")
    assert axes["ragged"] == ("storage", "ragged")


def test_policies_are_grouped_by_axis(capsys):
    assert main(["policies"]) == 0
    out = capsys.readouterr().out
    selection, storage, method = (out.index(f"== {axis}") for axis in ("selection", "storage", "method"))
    assert selection < out.index("snapkv:") < storage < out.index("ragged:") < method
    assert "head_budget: " in out and "[needs ragged storage]" in out.split("head_budget: ")[1].split("\n")[0]


def test_policies_describes_a_spec_axis_by_axis(capsys):
    assert main(["policies", "snapkv:budget=64,window=8+ragged"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "snapkv+ragged"
    assert re.match(r"\s+selection\s+snapkv\(budget=64, .*window=8", out[1])
    assert re.match(r"\s+storage\s+ragged\(\)$", out[2]) and re.match(r"\s+method\s+dense$", out[3])
    assert main(["policies", "head_budget", "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["name"] == "head_budget" and described["axes"]["storage"] == "ragged"
    assert [p["implied"] for p in described["parts"]] == [False, True]


def test_policies_describes_a_prefill_and_a_decode_method(capsys):
    assert main(["policies", "quest:budget=64+vertical_slash:density=0.2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "vertical_slash+quest"
    assert re.match(r"\s+method\s+vertical_slash\(.*density=0.2", out[3])
    assert re.match(r"\s+method\s+quest\(budget=64, ", out[4])


def test_policies_refuses_a_bad_spec_by_name(capsys):
    for spec, message in [("snapkv:budgt=3", "unknown option(s) ['budgt']"),
                          ("snapkv+h2o", "snapkv and h2o both answer the selection axis"),
                          ("snapkv+", "a policy spec part without a name"),
                          ("snapkv:budget", "options are written key=value")]:
        assert main(["policies", spec]) == 2
        assert message in capsys.readouterr().err


def test_models(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    verified = out.split(" verified (")[1].split("refused:")[0]
    assert all(name in verified for name in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3"))
    assert re.search(r"deepseek_v3 +refused +kvx does not support model_type 'deepseek_v3': multi-head latent", out)
    assert "verified on transformers 5." in out


def test_models_verify_checks_the_installed_release(capsys):
    assert main(["models", "--verify", "--no-progress", "llama", "bloom"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"llama +verified", out) and re.search(r"bloom +refused", out) and "'verified': 1, 'refused': 1" in out


def test_models_bad_input_names_the_mistake(capsys):
    assert main(["models", "--verify", "--no-progress", "lama"]) == 2
    err = capsys.readouterr().err
    assert "unknown model type(s) lama; the causal-LM types of transformers" in err and "llama" in err
    assert main(["models", "--write"]) == 2
    assert "--write only work with --verify" in capsys.readouterr().err
    assert main(["models", "llama"]) == 2
    assert "model types (llama) only work with --verify" in capsys.readouterr().err


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "policies" in capsys.readouterr().out


def test_demo_runs_small(capsys):
    assert main(["demo", "--prompt-tokens", "300", "--new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "dense" in out and "snapkv(" in out and "streaming_llm(" in out
