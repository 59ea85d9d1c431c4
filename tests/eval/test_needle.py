"""The needle runner: grid, identical prompts across policies, resume, outputs, bad input."""

import json

import pytest

from kvx.cli import main
from kvx.eval import needle
from kvx.eval.haystack import build_tokenizer
from kvx.tiny import tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("needle-model")
    tok = build_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _config(**kw):
    base = dict(lengths=[200, 300], depths=[0, 50, 100], variants=["single"], samples=1,
                policies=needle.parse_policies(["snapkv:budget=64,window=16"], []), max_new_tokens=5)
    base.update(kw)
    return needle.NeedleConfig(**base)


def test_grid_runs_every_policy_on_identical_prompts(model_dir, tmp_path):
    model, tok = needle.load_model(str(model_dir))
    runner = needle.NeedleRunner(model, tok, _config(), tmp_path)
    rows = runner.run(progress=False)
    assert len(rows) == 2 * 3 * 2  # lengths x depths x policies
    assert {r["policy"] for r in rows} == {"dense", "snapkv:budget=64,window=16"}
    for r in rows:
        assert r["prompt_tokens"] == r["length"]
        assert set(r) >= {"answer", "expected", "score", "kv_bytes", "kept_tokens", "seconds", "needle_positions"}
    by_cell = {}
    for r in rows:
        by_cell.setdefault((r["length"], r["depth"]), []).append(r)
    for pair in by_cell.values():
        assert pair[0]["expected"] == pair[1]["expected"] and pair[0]["needle_positions"] == pair[1]["needle_positions"]
        dense, snap = sorted(pair, key=lambda r: r["policy"] != "dense")
        assert snap["kv_bytes"] < dense["kv_bytes"]
        assert snap["kept_tokens"] == 64 + 4  # budget, then 4 decoded tokens appended
    summary = needle.summarize(rows, ["dense", "snapkv:budget=64,window=16"])
    assert summary[1]["kv_vs_dense"] < 0.4
    assert "KV vs dense" in needle.format_summary(summary)
    paths = needle.write_heatmaps(rows, tmp_path)
    assert len(paths) == 2 and all(p.stat().st_size > 1000 for p in paths)


def test_interrupted_run_resumes_without_losing_or_repeating(model_dir, tmp_path, monkeypatch):
    model, tok = needle.load_model(str(model_dir))
    runner = needle.NeedleRunner(model, tok, _config(), tmp_path)
    real = needle.NeedleRunner.run_cell
    calls = []

    def flaky(self, run, cell):
        if len(calls) == 5:
            raise KeyboardInterrupt
        calls.append((run.label, cell))
        return real(self, run, cell)

    monkeypatch.setattr(needle.NeedleRunner, "run_cell", flaky)
    with pytest.raises(KeyboardInterrupt):
        runner.run(progress=False)
    assert len(needle.load_results(runner.results_path)) == 5
    with runner.results_path.open("a") as f:
        f.write('{"policy": "dense", "len')  # a write torn by the kill
    monkeypatch.setattr(needle.NeedleRunner, "run_cell", real)
    assert len(runner.pending()) == 12 - 5
    with pytest.warns(UserWarning, match="results.jsonl line 7: not JSON"):  # the identity is line 1
        rows = runner.run(progress=False)
    keys = [needle._row_key(r) for r in rows]
    assert len(keys) == 12 and len(set(keys)) == 12
    assert runner.pending() == []


def test_cli_end_to_end(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["needle", "--model", str(model_dir), "--lengths", "200", "--depths", "0,100", "--policy", "streaming_llm",
            "--opt", "window=32", "--opt", "sink=2", "--out", str(out), "--no-progress", "--max-new-tokens", "4"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "streaming_llm:sink=2,window=32" in printed and "dense" in printed
    rows = needle.load_results(out / "results.jsonl")
    assert len(rows) == 4
    assert json.loads((out / "summary.json").read_text())[0]["policy"] == "dense"
    assert main(args) == 0  # rerun: nothing pending, same rows
    assert len(needle.load_results(out / "results.jsonl")) == 4


def test_yaml_config(model_dir, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lengths: [1k]\ndepths: [50]\nvariants: [multikey, absent]\npolicies:\n  - dense\n"
                    "  - {name: snapkv, budget: 128}\n")
    config = needle.config_from_yaml(path)
    assert config.lengths == [1024] and len(config.cells()) == 2
    assert [p.label for p in config.policies] == ["dense", "snapkv:budget=128"]
    path.write_text("lenghts: [1k]\n")
    with pytest.raises(ValueError, match="unknown key.*lenghts.*valid keys"):
        needle.config_from_yaml(path)


def test_model_without_tokenizer(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no tokenizer could be loaded.*--tokenizer"):
        needle.load_model(str(tmp_path))


def test_bad_input_gets_clear_errors(capsys):
    with pytest.raises(ValueError, match="unknown policy 'snapk'; known policies"):
        needle.parse_policies(["snapk"], [])
    with pytest.raises(ValueError, match="--opt budget: none of the listed policies \\(streaming_llm\\)"):
        needle.parse_policies(["streaming_llm"], ["budget=3"])
    with pytest.raises(ValueError, match="key=value"):
        needle.parse_policies(["snapkv"], ["budget"])
    with pytest.raises(ValueError, match=r"depths: 120 is not a depth within \[0, 100\]"):
        _config(depths=[120])
    with pytest.raises(ValueError, match="cannot read 'four' as a length"):
        needle.parse_length("four")
    with pytest.raises(ValueError, match="budget must be >= 1"):
        needle.parse_policies(["snapkv:budget=0"], [])[1].validate()
    assert main(["needle", "--lengths", "1k", "--policy", "nope", "--no-progress"]) == 2
    assert "unknown policy 'nope'" in capsys.readouterr().err


def test_context_only_compression_appends_the_question(model_dir, tmp_path):
    model, tok = needle.load_model(str(model_dir))
    config = _config(lengths=[300], depths=[50], compress="context")
    rows = needle.NeedleRunner(model, tok, config, tmp_path).run(progress=False)
    snap = next(r for r in rows if r["policy"] != "dense")
    prompt = needle.NeedleRunner(model, tok, config, tmp_path).build(needle.Cell(300, 50.0, "single", 0))
    question = 300 - prompt.question_start
    assert snap["compress"] == "context" and snap["kept_tokens"] == 64 + question + 4
    with pytest.raises(ValueError, match="compress must be one of prompt, context"):
        _config(compress="question")


def test_a_composed_policy_on_the_command_line(model_dir, tmp_path, capsys):
    """``--policy snapkv:budget=64+ragged``: one run, snapkv's selection on ragged storage; ``--opt``
    reaches the part that has the option; two selections in one run are refused by name."""
    out = tmp_path / "run"
    args = ["needle", "--model", str(model_dir), "--lengths", "300", "--depths", "50", "--policy",
            "snapkv:budget=64+ragged", "--opt", "window=16", "--out", str(out), "--no-progress", "--max-new-tokens", "4"]
    assert main(args) == 0
    rows = needle.load_results(out / "results.jsonl")
    composed = next(r for r in rows if r["policy"] != "dense")
    assert composed["policy"] == "snapkv:budget=64,window=16+ragged"
    assert composed["kept_tokens"] < next(r for r in rows if r["policy"] == "dense")["kept_tokens"]
    with pytest.raises(ValueError, match="snapkv and h2o both answer the selection axis"):
        needle.parse_policies(["snapkv+h2o"], [])


def test_multihop_cells_run_and_expect_the_second_needles_value(model_dir, tmp_path):
    model, tok = needle.load_model(str(model_dir))
    config = _config(lengths=[200], depths=[0, 100], variants=["multihop"], policies=[needle.PolicyRun("dense")])
    rows = needle.NeedleRunner(model, tok, config, tmp_path).run(progress=False)
    assert len(rows) == 2 and all(r["variant"] == "multihop" for r in rows)
    for row in rows:
        spec = needle.build_cell_prompt(config, tok, needle.Cell(200, row["depth"], "multihop", 0)).spec
        assert row["expected"] == spec.expected == [spec.needles[1][1]] and len(row["needle_positions"]) == 4


def test_summary_breaks_scores_down_by_variant():
    """With several variants, the summary gives each variant's mean per length, and prints them."""
    def row(policy, variant, length, score):
        return dict(policy=policy, variant=variant, length=length, depth=0.0, sample=0, score=score, kv_bytes=10,
                    seconds=0.1)

    rows = [row("dense", "single", 1024, 1.0), row("dense", "multikey", 1024, 0.0), row("dense", "multikey", 2048, 1.0),
            row("dense", "single", 2048, 0.5)]
    summary = needle.summarize(rows, ["dense"])
    assert summary[0]["per_variant"] == {"multikey": {1024: 0.0, 2048: 1.0}, "single": {1024: 1.0, 2048: 0.5}}
    text = needle.format_summary(summary)
    assert "by variant:" in text
    assert [line.split() for line in text.splitlines()[-2:]] == [["dense", "multikey", "0.000", "1.000"],
                                                                 ["dense", "single", "1.000", "0.500"]]
    one_variant = needle.summarize([r for r in rows if r["variant"] == "single"], ["dense"])
    assert "by variant" not in needle.format_summary(one_variant)
