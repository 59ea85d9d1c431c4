"""The lm-eval bridge: kvx's model type runs a local harness task end to end on the shipped model,
dense and compressed, and the compressed run really held less (kept counts and bytes)."""

import json

import pytest
from harness_task import LENGTH, TASK, write_task

import kvx
from kvx.cli import main
from kvx.eval import lm_eval_bridge as bridge
from kvx.eval import needle

SINK, WINDOW = 4, 16


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("lm-eval-task")
    write_task(directory, needle.load_tokenizer(str(needle.DEFAULT_MODEL)))
    return directory


def test_dense_and_compressed_end_to_end(task_dir, tmp_path, capsys):
    """``kvx lm-eval`` on the local task: dense answers, streaming_llm keeps sink + window tokens per
    layer and holds proportionally fewer bytes, and loses the needle it evicted."""
    out = tmp_path / "out"
    assert main(["lm-eval", "--tasks", TASK, "--include-path", str(task_dir), "--no-default-tasks",
                 "--policy", f"streaming_llm:sink={SINK},window={WINDOW}", "--out", str(out)]) == 0
    rows = {r["policy"]: r for r in json.loads((out / "lm-eval.json").read_text())}
    dense, compressed = rows["dense"], rows[f"streaming_llm:sink={SINK},window={WINDOW}"]
    assert dense["calls"] == compressed["calls"] == 3 and dense["metric"] == "exact_match,none"
    assert dense["score"] == 1.0  # the shipped model retrieves every needle at this length
    assert dense["kept_tokens_min"] > LENGTH - 8  # dense keeps the whole prompt (and what it generated)
    assert compressed["kept_tokens_min"] == SINK + WINDOW
    assert compressed["kv_bytes_mean"] / dense["kv_bytes_mean"] == pytest.approx(
        (SINK + WINDOW) / dense["kept_tokens_mean"], rel=0.02)
    assert compressed["score"] < dense["score"]
    assert "| streaming_llm:sink=4,window=16 | kvx_tiny_needle | exact_match,none |" in capsys.readouterr().out


def test_model_args_patch_the_harness_model():
    """``--model kvx --model_args pretrained=...,policy=snapkv,budget=64,window=8``, as lm-eval builds it:
    the options after ``policy`` belong to its spec, and the model is patched with them."""
    from lm_eval.api.registry import get_model

    lm = get_model("kvx").create_from_arg_string(
        f"pretrained={needle.DEFAULT_MODEL},policy=snapkv+kivi:bits=4,group=16,window=64,dtype=float32",
        {"batch_size": 1, "device": "cpu"})
    policy = kvx.policy_of(lm.model)
    assert policy is not None and kvx.is_patched(lm.model)
    snapkv, kivi = policy.parts
    assert (kivi.bits, kivi.group, kivi.window) == (4, 16, 64)
    assert snapkv.window == kvx.make_policy("snapkv").window  # not given to snapkv: its default
    assert lm.policy_label == "snapkv+kivi:bits=4,group=16,window=64"
    assert bridge.policy_label("snapkv", {"budget": 64, "window": 8}) == "snapkv:budget=64,window=8"


def test_an_already_patched_model_is_reported_with_its_policy():
    """HFLM wrapping a model the caller patched: the records name the policy that runs, not dense."""
    model = needle.load_causal_lm(str(needle.DEFAULT_MODEL))
    kvx.patch(model, "snapkv", budget=64, window=8)
    lm = bridge.KvxLM(pretrained=model, tokenizer=needle.load_tokenizer(str(needle.DEFAULT_MODEL)), batch_size=1)
    assert lm.policy_label.startswith("snapkv:budget=64,ratio=none,") and "window=8" in lm.policy_label
    assert lm.kv_summary()["policy"] == lm.policy_label


@pytest.mark.parametrize("policy,options,message", [
    ("snapkv", {"budgt": 64}, r"snapkv.*budgt"),
    (None, {"budget": 64}, r"model_args budget: neither an HFLM argument nor a policy option"),
    ("snapkv:budget", {}, r"options are written key=value, got 'budget'"),
    ("snapkvv", {}, r"unknown policy 'snapkvv'"),
])
def test_bad_model_args(policy, options, message):
    with pytest.raises((ValueError, TypeError), match=message):
        bridge.policy_from_args(policy, options)


def test_unknown_task_and_missing_include_path(task_dir, tmp_path):
    manager = bridge.task_manager(task_dir, include_defaults=False)
    with pytest.raises(ValueError, match=r"unknown lm-eval task\(s\) 'kvx_tiny_needel' \(did you mean kvx_tiny_needle"):
        bridge.check_tasks(["kvx_tiny_needel"], manager)
    with pytest.raises(FileNotFoundError, match="no-such-dir: no such directory"):
        bridge.task_manager(tmp_path / "no-such-dir")
    with pytest.raises(ValueError, match="differs from the task manager's"):  # lm-eval would ignore it
        bridge.evaluate(None, [TASK], manager, metadata={"max_seq_lengths": [4096]})


@pytest.mark.parametrize("tasks,include,extra,message", [
    (TASK, None, ["--metadata", "{max_seq_lengths: 4096}"], r"--metadata .*: not JSON"),
    (TASK, None, ["--metadata", "[4096]"], r"--metadata .*: a JSON object"),
    ("kvx_tiny_needel", None, [], r"unknown lm-eval task\(s\) 'kvx_tiny_needel' \(did you mean kvx_tiny_needle\?\)"),
    (TASK, "/no/such/dir", [], r"include path /no/such/dir: no such directory"),
    (TASK, None, ["--no-dense"], r"--no-dense leaves no policy to run"),
    (TASK, None, ["--policy", "snapkv:budget"], r"options are written key=value, got 'budget'"),
    (" , ", None, [], r"--tasks ' , ': give at least one task name"),
])
def test_bad_command_lines_are_refused_before_loading(task_dir, tmp_path, capsys, tasks, include, extra, message):
    import re

    argv = ["lm-eval", "--tasks", tasks, "--include-path", include or str(task_dir), "--no-default-tasks",
            "--out", str(tmp_path), *extra]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith("kvx lm-eval: error: ") and re.search(message, error), error
    assert not (tmp_path / "lm-eval.json").exists()


def test_main_metric_is_the_length_run():
    """RULER names a metric per length and reports -1 for those not run: the score is the length run's."""
    ruler = {"4096,none": -1, "4096_stderr,none": "N/A", "512,none": 0.5, "sample_len": 2}
    assert bridge.main_metric(ruler, [512]) == ("512,none", 0.5)
    assert bridge.main_metric({"sample_len": 3, "exact_match,none": 1.0, "exact_match_stderr,none": 0.0}) == (
        "exact_match,none", 1.0)
    assert bridge.main_metric({"alias": "x"}) is None
