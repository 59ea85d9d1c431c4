"""kvx longbench: official-format data, prompts, the run with the shipped model (dense, compressed,
query-aware), resume, and bad input."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from kvx.cli import main
from kvx.eval import needle
from kvx.eval.longbench import prompts, runner, summary, tasks
from kvx.eval.longbench.metrics import METRICS, score_sample
from kvx.eval.longbench.runner import LongBenchConfig, LongBenchRunner

FIXTURES = Path(__file__).parent / "fixtures" / "longbench"
SNAP = "snapkv:budget=16,window=4"
KIVI = "kivi:bits=4,window=16"


@pytest.fixture(scope="module")
def shipped():
    return needle.load_model(str(needle.DEFAULT_MODEL))


def _config(**kw):
    base = dict(data_dir=FIXTURES, tasks=["hotpotqa", "passage_count", "lcc"], limit=2, max_new_tokens=6,
                policies=needle.parse_policies([SNAP], []))
    return LongBenchConfig(**{**base, **kw})


def _sample(task="hotpotqa", index=0):
    return tasks.load_samples(FIXTURES, tasks.TASKS[task])[index]


def test_fixtures_are_official_format_and_cover_every_metric():
    names = [p.stem for p in FIXTURES.glob("*.jsonl") if not p.stem.endswith("_e")]
    assert {tasks.TASKS[n].metric for n in names} == set(METRICS)
    for name in names:
        assert all(s.answers and s.length > 0 for s in tasks.load_samples(FIXTURES, tasks.TASKS[name]))
    assert len(tasks.TASKS) == 21 and set(tasks.E_TASKS) < set(tasks.TASKS)
    assert [t for t in tasks.TASKS.values() if not t.chat] == [tasks.TASKS[n] for n in tasks.NO_CHAT_TASKS]


def test_prompt_splits_context_from_question_and_truncates_the_middle(shipped):
    _, tok = shipped
    task, sample = tasks.TASKS["hotpotqa"], _sample()
    full = prompts.build_prompt(tok, task, sample, max_length=None)
    assert not full.truncated and not full.chat  # the shipped tokenizer has no chat template
    question, context = tok.decode(full.ids[full.question_start:]), tok.decode(full.ids[:full.question_start])
    # the template's text after the context: the instruction again, then the question
    assert question.startswith("Answer the question") and question.endswith("magic number for otter ? Answer :")
    assert "magic number for otter is 3 4 7 1" in context and "Question" not in context
    cut = prompts.build_prompt(tok, task, sample, max_length=80)
    assert cut.truncated and len(cut.ids) <= 80 < len(full.ids)
    # the question survives the cut (decoded and re-read as the official code does, so <unk> tokens go)
    kept = tok.decode(full.ids[full.question_start:], skip_special_tokens=True)
    assert tok.decode(cut.ids[cut.question_start:]) == kept
    # a cut into the question leaves nothing to tell apart: no split
    assert prompts.build_prompt(tok, task, sample, max_length=full.question_tokens).question_start is None


def test_chat_template_wraps_every_task_but_the_official_plain_ones(shipped):
    _, tok = shipped
    chat_tok = type(tok).from_pretrained(str(needle.DEFAULT_MODEL))
    # a template in the shipped vocabulary: "river" opens the user turn, "forest" the assistant's
    chat_tok.chat_template = "{{ bos_token }}river {{ messages[0]['content'] | trim }} forest "
    qa = prompts.build_prompt(chat_tok, tasks.TASKS["hotpotqa"], _sample(), None)
    assert qa.chat and qa.ids[0] == chat_tok.bos_token_id and qa.ids.count(chat_tok.bos_token_id) == 1
    assert chat_tok.decode(qa.ids[qa.question_start:]).startswith("Answer the question")
    assert chat_tok.decode(qa.ids[qa.question_start:]).endswith("otter ? Answer : forest")
    assert chat_tok.decode(qa.ids[:3]) == "<s> river Answer"
    assert not prompts.build_prompt(chat_tok, tasks.TASKS["trec"], _sample("trec"), None).chat
    assert not prompts.build_prompt(chat_tok, tasks.TASKS["hotpotqa"], _sample(), None, use_chat_template=False).chat


def test_every_eos_token_of_the_model_stops_generation():
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[128001, 128009]),
                            config=SimpleNamespace(eos_token_id=128009))
    assert runner.eos_token_ids(model, SimpleNamespace(eos_token_id=128001)) == [128001, 128009]
    assert runner.eos_token_ids(SimpleNamespace(config=SimpleNamespace(eos_token_id=None)),
                                SimpleNamespace(eos_token_id=2)) == [2]


def test_generation_follows_the_official_lengths_and_stops(shipped, tmp_path):
    model, tok = shipped
    lb = LongBenchRunner(model, tok, _config(max_new_tokens=None), tmp_path)
    assert lb.generation_options(tasks.TASKS["gov_report"])["max_new_tokens"] == 512
    assert lb.max_length(tasks.TASKS["hotpotqa"]) == 16384 - 32  # max_position_embeddings less the answer
    assert LongBenchRunner(model, tok, _config(max_length=None), tmp_path).max_length(tasks.TASKS["lcc"]) is None
    # samsum also stops at a newline and generates at least one token
    newline_tok = SimpleNamespace(encode=lambda text, add_special_tokens: [29871, 13], pad_token_id=None)
    fake = SimpleNamespace(config=_config(max_new_tokens=None), eos=[2, 7], tokenizer=newline_tok)
    options = LongBenchRunner.generation_options(fake, tasks.TASKS["samsum"])
    assert options == {"max_new_tokens": 128, "min_new_tokens": 1, "eos_token_id": [2, 7, 13], "pad_token_id": 2}
    assert LongBenchRunner.generation_options(fake, tasks.TASKS["trec"])["eos_token_id"] == [2, 7]


def test_dense_and_compressed_rows_state_what_the_cache_held(shipped, tmp_path):
    model, tok = shipped
    config = _config(policies=needle.parse_policies([SNAP, "snapkv:budget=4096"], []))
    rows = LongBenchRunner(model, tok, config, tmp_path).run(progress=False)
    assert len(rows) == 3 * 2 * 3  # policies x tasks x samples
    for r in rows:
        task = tasks.TASKS[r["task"]]
        assert r["score"] == score_sample(task.metric, r["prediction"], r["answers"], r["all_classes"], task.first_line)
        assert 1 <= r["new_tokens"] <= 6 and {"commit", "torch", "transformers", "device"} <= set(r["stamp"])
        for layer in r["layers"]:
            assert layer["seen"] == r["prompt_tokens"] + r["new_tokens"] - 1  # the last token is not fed back
    dense = {(r["task"], r["index"]): r for r in rows if r["policy"] == "dense"}
    for r in rows:
        layers = r["layers"]
        if r["policy"] == SNAP:  # budget 16, then the decoded tokens appended
            assert r["evicted"] and r["compressed"]
            assert r["applied"].startswith("snapkv(budget=16,") and "window=4," in r["applied"]
            assert all(x["kept_max"] == 16 + r["new_tokens"] - 1 for x in layers)
            assert r["kv_bytes"] < dense[(r["task"], r["index"])]["kv_bytes"]
        else:  # dense, and a budget that holds every prompt: nothing compressed, and the rows say so
            assert not r["evicted"] and not r["compressed"] and all(x["kept_min"] == x["seen"] for x in layers)
    table = summary.summarize(rows, ["dense", SNAP, "snapkv:budget=4096"])
    snap = table["policies"][SNAP]
    assert snap["compressed"] == 1.0 and snap["kv_vs_dense"] < 0.5
    assert table["policies"]["snapkv:budget=4096"]["compressed"] == 0.0
    assert snap["categories"]["Multi-Doc QA"] == snap["tasks"]["hotpotqa"]
    assert snap["average"] == pytest.approx(sum(snap["tasks"].values()) / 3, abs=0.01)
    text = summary.format_summary(table)
    assert "[Synthetic]" in text and "compressed" in text and "0%" in text


def test_quantized_storage_counts_as_compressed_once_it_packs_tokens(shipped, tmp_path):
    model, tok = shipped
    config = _config(tasks=["hotpotqa", "lcc"], limit=1, max_new_tokens=2,
                     policies=needle.parse_policies([KIVI], [], with_dense=False))
    rows = {r["task"]: r for r in LongBenchRunner(model, tok, config, tmp_path).run(progress=False)}
    for r in rows.values():  # every token kept, so nothing evicted
        assert not r["evicted"] and all(x["kind"] == "quantized" and x["kept_min"] == x["seen"] for x in r["layers"])
    # ~200 tokens: those past the 16-token full-precision window are packed to 4 bits; lcc's 37 fit in
    # the window and one group of 32 still unpacked, so that cache is as large as a dense one
    assert rows["hotpotqa"]["prompt_tokens"] > 16 + 32 > rows["lcc"]["prompt_tokens"]
    assert rows["hotpotqa"]["compressed"] and not rows["lcc"]["compressed"]


def test_query_aware_compresses_the_context_and_appends_the_question(shipped, tmp_path):
    model, tok = shipped
    config = _config(tasks=["hotpotqa"], limit=1, compress="context")
    rows = LongBenchRunner(model, tok, config, tmp_path).run(progress=False)
    snap = next(r for r in rows if r["policy"] == SNAP)
    assert snap["query_aware"] and snap["question_tokens"] > 16
    # the context is cut to the budget; the question and the decoded tokens are all kept
    assert all(x["kept_max"] == 16 + snap["question_tokens"] + snap["new_tokens"] - 1 for x in snap["layers"])
    # a truncation that cuts into the question leaves nothing to split: the whole prompt is compressed, and said so
    cut = _config(tasks=["hotpotqa"], limit=1, compress="context", max_length=24,
                  policies=needle.parse_policies([SNAP], [], with_dense=False))
    with pytest.warns(UserWarning, match="hotpotqa sample 0: the question cannot be told apart"):
        rows = LongBenchRunner(model, tok, cut, tmp_path / "cut").run(progress=False)
    assert not rows[0]["query_aware"] and rows[0]["truncated"] and rows[0]["prompt_tokens"] <= 24


def test_a_rerun_resumes_and_refuses_other_settings(shipped, tmp_path, monkeypatch):
    model, tok = shipped
    real, calls = runner.LongBenchRunner.run_sample, []

    def failing(self, run, task, sample):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append((run.label, task.name, sample.index))
        return real(self, run, task, sample)

    monkeypatch.setattr(runner.LongBenchRunner, "run_sample", failing)
    config = _config(tasks=["lcc"], max_new_tokens=2)
    with pytest.raises(KeyboardInterrupt):
        LongBenchRunner(model, tok, config, tmp_path).run(progress=False)
    monkeypatch.setattr(runner.LongBenchRunner, "run_sample", real)
    rows = LongBenchRunner(model, tok, config, tmp_path).run(progress=False)
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(rows) == 4 and len(lines) == 1 + 4  # identity + each (policy, sample) once
    with pytest.raises(ValueError, match="settings.compress: 'prompt' -> 'context'.*--fresh"):
        LongBenchRunner(model, tok, _config(tasks=["lcc"], max_new_tokens=2, compress="context"), tmp_path).run(
            progress=False)
    with pytest.warns(UserWarning, match="moved to results-1.jsonl"):
        LongBenchRunner(model, tok, _config(tasks=["lcc"], limit=1, max_new_tokens=2), tmp_path).run(
            progress=False, fresh=True)
    assert (tmp_path / "results-1.jsonl").read_text().splitlines() == lines


def test_a_changed_task_file_refuses_to_resume(shipped, tmp_path):
    model, tok = shipped
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(FIXTURES / "lcc.jsonl", data / "lcc.jsonl")
    config = _config(data_dir=data, tasks=["lcc"], limit=1, max_new_tokens=2, policies=[needle.PolicyRun("dense")])
    LongBenchRunner(model, tok, config, tmp_path / "out").run(progress=False)
    rows = [json.loads(line) for line in (data / "lcc.jsonl").read_text().splitlines()]
    rows[0]["answers"] = ["something else"]
    (data / "lcc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="lcc sample 0 differs .* task file changed"):
        LongBenchRunner(model, tok, config, tmp_path / "out").run(progress=False)


def test_longbench_e_scores_by_length_range(shipped, tmp_path):
    model, tok = shipped
    config = _config(tasks=["hotpotqa"], longbench_e=True, limit=None, max_new_tokens=4,
                     policies=[needle.PolicyRun("dense")])
    rows = LongBenchRunner(model, tok, config, tmp_path).run(progress=False)
    assert sorted(summary.bucket(r["length"]) for r in rows) == ["0-4k", "4-8k", "8k+"]
    table = summary.summarize(rows, ["dense"], buckets=True)["policies"]["dense"]
    for r in rows:  # one sample per range: each range's score is that sample's
        assert table["buckets"]["hotpotqa"][summary.bucket(r["length"])] == round(100 * r["score"], 2)
    assert "LongBench-E, dense, by length" in summary.format_summary(summary.summarize(rows, ["dense"], True))
    with pytest.raises(ValueError, match="unknown LongBench-E task.*narrativeqa.*not LongBench-E"):
        _config(tasks=["narrativeqa"], longbench_e=True)


def test_the_command_runs_and_prints_the_table(tmp_path, capsys):
    code = main(["longbench", "--data", str(FIXTURES), "--tasks", "passage_retrieval_zh", "--max-new-tokens", "3",
                 "--policy", "streaming_llm:sink=2,window=8", "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "passage_retrieval_zh" in out and "streaming_llm" in out and "KV vs dense" in out
    assert json.loads((tmp_path / "summary.json").read_text())["tasks"] == ["passage_retrieval_zh"]


@pytest.mark.parametrize("args, message", [
    (["--data", "/no/such/dir"], "--data /no/such/dir: no such directory; expected one JSONL file per task"),
    (["--data", str(FIXTURES), "--tasks", "hotpotqa,nosuch"],
     "unknown LongBench task(s) nosuch; choose from narrativeqa"),
    (["--data", str(FIXTURES), "--tasks", "qasper"], "no qasper.jsonl; expected one JSONL file per task"),
    (["--data", str(FIXTURES), "--e", "--tasks", "qasper"], "no qasper_e.jsonl"),
    (["--data", str(FIXTURES), "--max-length", "lots"],
     "--max-length 'lots': give a token count >= 2, 'model' or 'none'"),
    (["--data", str(FIXTURES), "--policy", "snapkv:nosuch=1"], "nosuch"),
])
def test_bad_input_is_one_line_naming_it(args, message, tmp_path, capsys):
    assert main(["longbench", *args, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvx longbench: error:") and message in err and len(err.strip().splitlines()) == 1


def test_a_bad_line_names_its_file_and_number(tmp_path):
    (tmp_path / "lcc.jsonl").write_text(json.dumps({"context": "x", "input": "", "length": 1}) + "\n")
    with pytest.raises(ValueError, match=r"lcc.jsonl line 1: 'answers' must be a list"):
        tasks.load_samples(tmp_path, tasks.TASKS["lcc"])
    trec = {"context": "x", "input": "", "answers": ["A"], "length": 1}
    (tmp_path / "trec.jsonl").write_text(json.dumps(trec) + "\n")
    with pytest.raises(ValueError, match="trec is scored by class, so 'all_classes' must list the classes"):
        tasks.load_samples(tmp_path, tasks.TASKS["trec"])
