"""The catalogue of bad inputs and faults: every mistake a new user plausibly makes against the API
and each CLI command, and the faults a long run meets.

Three classes, told apart by the test name (the command at the end of this module counts them):

- ``test_error_*``: bad input raises the right type (the CLI: exit 2, one line ``kvx <command>:
  error: ...``, no traceback) with a message that names the mistake;
- ``test_valid_*``: inputs close to a mistake that are valid, and give the correct result;
- ``test_fault_*``: a killed run, a torn or foreign results row, a results file of another run, a
  model directory missing its tokenizer or weights, an unwritable ``--out``: survived, or refused
  by name.

Cheap by construction: one tiny random llama per module, prompts of tens of tokens, needle runs of
a few 200-token cells on a tiny model saved once.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from conftest import greedy, random_ids
from transformers import BloomConfig, BloomForCausalLM, DynamicCache

import kvx
from kvx.cli import main
from kvx.compose import from_spec
from kvx.eval import bench, needle
from kvx.eval.haystack import build_tokenizer
from kvx.tiny import tiny_model

# ---------------------------------------------------------------- shared fixtures and helpers


@pytest.fixture(scope="module")
def model():
    """One tiny random llama for every API case (2 layers, 4 query / 2 KV heads); unpatched between cases."""
    return tiny_model("llama")


@pytest.fixture(autouse=True)
def _unpatched(request):
    """Whatever a case did, the shared model leaves it unpatched."""
    yield
    if "model" in request.fixturenames:
        shared = request.getfixturevalue("model")
        if kvx.is_patched(shared):
            kvx.unpatch(shared)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Model directories saved once: a tiny needle model (with tokenizer), the same without its
    tokenizer, one without weights, and one with other weights."""
    root = tmp_path_factory.mktemp("bad-inputs")
    tok = build_tokenizer()
    ids = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id, max_position_embeddings=256)
    paths = {name: root / name for name in ("model", "other", "no_tokenizer", "no_weights", "big_vocab")}
    tiny_model("llama", **ids).save_pretrained(paths["model"])
    tok.save_pretrained(paths["model"])
    tiny_model("llama", seed=1, **ids).save_pretrained(paths["other"])
    tok.save_pretrained(paths["other"])
    tiny_model("llama", **ids).save_pretrained(paths["no_tokenizer"])
    tiny_model("llama", **ids).config.save_pretrained(paths["no_weights"])
    tok.save_pretrained(paths["no_weights"])
    _tokenizer_with_shifted_ids(tok).save_pretrained(paths["big_vocab"])
    return paths


def _tokenizer_with_shifted_ids(tok):
    """A word-level tokenizer for the same words whose ids start past the tiny model's vocabulary."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {word: index + 1000 for word, index in tok.get_vocab().items()}
    inner = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    inner.pre_tokenizer = tok.backend_tokenizer.pre_tokenizer
    inner.decoder = tok.backend_tokenizer.decoder
    return PreTrainedTokenizerFast(tokenizer_object=inner, pad_token="<pad>", eos_token="</s>", bos_token="<s>",
                                   unk_token="<unk>")


@pytest.fixture
def paths(dirs, tmp_path):
    """Placeholders of the CLI tables: the model directories, a fresh --out, a plain file."""
    plain, empty, binary = tmp_path / "file.txt", tmp_path / "empty.txt", tmp_path / "binary.bin"
    plain.write_text("not a directory\n")
    empty.write_text("")
    binary.write_bytes(b"lengths: [1k]\n\xff\xfe\x00")
    return {**{k: str(v) for k, v in dirs.items()}, "out": str(tmp_path / "out"), "file": str(plain),
            "empty": str(empty), "binary": str(binary), "tmp": str(tmp_path)}


def cli_error(argv: list[str], capsys) -> str:
    """Run ``kvx argv``; assert the user-mistake contract (exit 2, one line ``kvx <command>: error:
    ...``, no traceback) and return that line."""
    code = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    command = " ".join(argv[:2] if argv[0] == "bench" and argv[1:2] in (["e2e"], ["kernels"]) else argv[:1])
    assert code == 2, captured
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"kvx {command}: error: ") or lines[0].startswith("kvx: error: "), lines[0]
    assert "Traceback" not in captured.err
    return lines[0]


def fill(argv: list[str], paths: dict[str, str]) -> list[str]:
    """Substitute ``{model}``, ``{out}``, ``{file}``... in a table's argv."""
    return [arg.format(**paths) for arg in argv]


def needle_args(paths: dict[str, str], *extra: str, model: str = "{model}") -> list[str]:
    """A cheap needle run (200 tokens, 2 depths, streaming_llm vs dense, 2 new tokens) plus ``extra``."""
    base = ["needle", "--model", model, "--out", "{out}", "--no-progress", "--lengths", "200", "--depths", "0,100",
            "--max-new-tokens", "2", "--policy", "streaming_llm:sink=2,window=32"]
    return fill(base + list(extra), paths)


# ---------------------------------------------------------------- API: errors that name the mistake

API_ERRORS = [
    # (id, call on the shared model, error type, what the message must say)
    ("unknown-policy", lambda m: kvx.patch(m, "snapkvv"), ValueError, r"unknown policy 'snapkvv'.*known.*snapkv"),
    ("policy-not-a-name", lambda m: kvx.patch(m, 3), TypeError, "policy must be a name or a kvx Policy object, got int"),
    ("policy-none", lambda m: kvx.make_policy(None), TypeError, "got NoneType"),
    ("unknown-option", lambda m: kvx.patch(m, "snapkv", budgett=3), TypeError,
     r"snapkv: unknown option\(s\) \['budgett'\]; valid options: budget, ratio"),
    ("options-with-object", lambda m: kvx.patch(m, kvx.policies.SnapKV(), budget=3), TypeError,
     r"options \['budget'\] were given with a policy object"),
    ("budget-zero", lambda m: kvx.patch(m, "snapkv", budget=0), ValueError, "snapkv: budget must be >= 1, got 0"),
    ("budget-negative", lambda m: kvx.patch(m, "h2o", budget=-5), ValueError, "h2o: budget must be >= 1, got -5"),
    ("budget-float", lambda m: kvx.make_policy("tova", budget=0.5), TypeError, "tova: budget must be an int, got float 0.5"),
    ("budget-string", lambda m: kvx.make_policy("knorm", budget="big"), TypeError, "knorm: budget must be an int, got str 'big'"),
    ("budget-bool", lambda m: kvx.make_policy("snapkv", budget=True), TypeError, "budget must be an int, got bool True"),
    ("budget-none", lambda m: kvx.make_policy("snapkv", budget=None), TypeError, "budget must be an int, got NoneType"),
    ("ratio-one", lambda m: kvx.make_policy("h2o", ratio=1.0), ValueError, r"h2o: ratio must be a number in \[0, 1\), got 1.0"),
    ("ratio-negative", lambda m: kvx.make_policy("snapkv", ratio=-0.1), ValueError, r"ratio must be a number in \[0, 1\)"),
    ("ratio-string", lambda m: kvx.make_policy("snapkv", ratio="half"), TypeError, "ratio must be a number, got str 'half'"),
    ("ratio-nan", lambda m: kvx.make_policy("snapkv", ratio=float("nan")), TypeError, "ratio must be a number, got float nan"),
    ("decode-interval-negative", lambda m: kvx.make_policy("knorm", decode_interval=-1), ValueError,
     "knorm: decode_interval must be >= 0, got -1"),
    ("snapkv-window-over-budget", lambda m: kvx.make_policy("snapkv", budget=32, window=64), ValueError,
     r"snapkv: window \(64\) must not exceed budget \(32\)"),
    ("snapkv-window-zero", lambda m: kvx.make_policy("snapkv", window=0), ValueError, "snapkv: window must be >= 1, got 0"),
    ("snapkv-kernel-even", lambda m: kvx.make_policy("snapkv", kernel_size=4), ValueError, "kernel_size must be odd.*got 4"),
    ("snapkv-kernel-zero", lambda m: kvx.make_policy("snapkv", kernel_size=0), ValueError, "kernel_size must be >= 1, got 0"),
    ("snapkv-pooling", lambda m: kvx.make_policy("snapkv", pooling="median"), ValueError,
     "pooling must be one of avg, max, none; got 'median'"),
    ("snapkv-pooling-not-str", lambda m: kvx.make_policy("snapkv", pooling=["avg"]), ValueError,
     r"pooling must be one of avg, max, none; got \['avg'\]"),
    ("snapkv-gqa-reduce", lambda m: kvx.make_policy("snapkv", gqa_reduce="sum"), ValueError,
     "gqa_reduce must be one of mean, max; got 'sum'"),
    ("h2o-recent-over-budget", lambda m: kvx.make_policy("h2o", budget=8, recent=9), ValueError,
     r"h2o: recent \(9\) must not exceed budget \(8\)"),
    ("h2o-recent-negative", lambda m: kvx.make_policy("h2o", recent=-1), ValueError, "h2o: recent must be >= 0, got -1"),
    ("h2o-gqa-reduce", lambda m: kvx.make_policy("h2o", gqa_reduce="avg"), ValueError,
     "gqa_reduce must be one of mean, max, sum; got 'avg'"),
    ("keyformer-recent-over-budget", lambda m: kvx.make_policy("keyformer", budget=16, recent=17), ValueError,
     r"keyformer: recent \(17\) must not exceed budget \(16\)"),
    ("keyformer-tau-zero", lambda m: kvx.make_policy("keyformer", tau=0), ValueError, r"tau must be a number in \(0, inf\), got 0"),
    ("keyformer-tau-string", lambda m: kvx.make_policy("keyformer", tau="hot"), TypeError, "tau must be a number, got str"),
    ("keyformer-window-zero", lambda m: kvx.make_policy("keyformer", window=0), ValueError, "keyformer: window must be >= 1"),
    ("keyformer-seed-negative", lambda m: kvx.make_policy("keyformer", seed=-1), ValueError, "keyformer: seed must be >= 0"),
    ("knorm-recent-over-budget", lambda m: kvx.make_policy("knorm", budget=8, recent=32), ValueError,
     r"knorm: recent \(32\) must not exceed budget \(8\)"),
    ("knorm-recent-negative", lambda m: kvx.make_policy("knorm", recent=-1), ValueError, "knorm: recent must be >= 0"),
    ("tova-per-head", lambda m: kvx.make_policy("tova", per_head="yes"), TypeError, "per_head must be true or false, got 'yes'"),
    ("streaming-sink-negative", lambda m: kvx.make_policy("streaming_llm", sink=-1), ValueError,
     "streaming_llm: sink must be >= 0, got -1"),
    ("streaming-window-zero", lambda m: kvx.make_policy("streaming_llm", window=0), ValueError,
     "streaming_llm: window must be >= 1, got 0"),
    ("streaming-window-float", lambda m: kvx.make_policy("streaming_llm", window=1.5), TypeError,
     "window must be an int, got float 1.5"),
    ("streaming-has-no-budget", lambda m: kvx.make_policy("streaming_llm", budget=64), TypeError,
     r"streaming_llm: unknown option\(s\) \['budget'\]; valid options: sink, window"),
    ("pyramid-beta", lambda m: kvx.make_policy("pyramidkv", beta=0.5), ValueError, r"beta must be a number in \[1, inf\), got 0.5"),
    ("pyramid-schedule-name", lambda m: kvx.make_policy("pyramidkv", schedule="steep"), ValueError,
     "schedule must be one of pyramid, uniform or a list of budgets; got 'steep'"),
    ("pyramid-schedule-empty", lambda m: kvx.make_policy("pyramidkv", schedule=[]), ValueError, "schedule list is empty"),
    ("pyramid-schedule-below-window", lambda m: kvx.make_policy("pyramidkv", schedule=[64, 8]), ValueError,
     r"schedule\[1\] \(8\) is below window \(32\)"),
    ("pyramid-schedule-entry-type", lambda m: kvx.make_policy("pyramidkv", schedule=[64, "x"]), TypeError,
     r"schedule\[1\] must be an int, got str 'x'"),
    ("pyramid-schedule-with-ratio", lambda m: kvx.make_policy("pyramidkv", schedule=[64, 64], ratio=0.5), ValueError,
     "cannot be combined with ratio"),
    ("pyramid-window-over-budget", lambda m: kvx.make_policy("pyramidkv", budget=16, window=32), ValueError,
     r"pyramidkv: window \(32\) must not exceed budget \(16\)"),
    ("pyramid-scorer-positional", lambda m: kvx.make_policy("pyramidkv", scorer="streaming_llm"), TypeError,
     "does not rank tokens by importance"),
    ("pyramid-scorer-unknown", lambda m: kvx.make_policy("pyramidkv", scorer="nope"), ValueError, "unknown policy 'nope'"),
    ("pyramid-schedule-length", lambda m: kvx.patch(m, "pyramidkv", schedule=[64, 64, 64]), ValueError,
     "schedule lists 3 budgets but the model has 2 layers"),
    ("head-budget-floor-high", lambda m: kvx.make_policy("head_budget", floor=1.5), ValueError,
     r"floor must be a number in \[0, 1\], got 1.5"),
    ("head-budget-floor-negative", lambda m: kvx.make_policy("head_budget", floor=-0.1), ValueError, r"floor must be a number in \[0, 1\]"),
    ("head-budget-floor-string", lambda m: kvx.make_policy("head_budget", floor="x"), TypeError, "floor must be a number, got str"),
    ("head-budget-window-over-budget", lambda m: kvx.make_policy("head_budget", budget=8), ValueError,
     r"head_budget: window \(32\) must not exceed budget \(8\)"),
    ("head-budget-scorer-object-window", lambda m: kvx.make_policy(
        "head_budget", budget=48, window=8, scorer=kvx.make_policy("snapkv", window=64)), ValueError,
     r"head_budget: scorer snapkv always keeps 64 tokens, more than budget \(48\)"),
    ("head-budget-scorer-positional", lambda m: kvx.make_policy("head_budget", scorer="streaming_llm"), TypeError,
     "does not rank tokens by importance"),
    ("compose-two-selections", lambda m: kvx.compose("snapkv", "h2o"), ValueError,
     "snapkv and h2o both answer the selection axis"),
    ("compose-nothing", lambda m: kvx.compose(), ValueError, "kvx.compose needs at least one policy"),
    ("compose-options", lambda m: kvx.compose("snapkv", budget=3), TypeError, r"set options \['budget'\] on them"),
    ("compose-wrong-storage", lambda m: kvx.compose(kvx.make_policy("head_budget", budget=64), "ragged", "ragged"),
     ValueError, "both answer the storage axis"),
    ("spec-empty", lambda m: from_spec(""), ValueError, "an empty policy spec"),
    ("spec-dangling-plus", lambda m: from_spec("snapkv+"), ValueError, "a policy spec part without a name"),
    ("spec-no-value", lambda m: from_spec("snapkv:budget"), ValueError, "options are written key=value, got 'budget'"),
    ("spec-text-value", lambda m: from_spec("snapkv:budget=lots"), TypeError, "budget must be an int, got str 'lots'"),
    ("chunk-size-zero", lambda m: kvx.patch(m, "snapkv", chunk_size=0), ValueError,
     "chunk_size must be a positive int, None or 'auto', got 0"),
    ("chunk-size-text", lambda m: kvx.patch(m, "snapkv", chunk_size="big"), ValueError, "chunk_size must be .* got 'big'"),
    ("chunk-size-bool", lambda m: kvx.patch(m, "snapkv", chunk_size=True), ValueError, "chunk_size must be .* got True"),
    ("chunk-size-float", lambda m: kvx.patch(m, "snapkv", chunk_size=512.0), ValueError, "chunk_size must be .* got 512.0"),
    ("unpatch-unpatched", lambda m: kvx.unpatch(m), ValueError, "LlamaForCausalLM is not patched by kvx"),
    ("prefill-unpatched", lambda m: kvx.prefill(m, random_ids(1, 8)), ValueError, r"not patched by kvx: call kvx.patch"),
    ("compress-context-unpatched", lambda m: kvx.compress_context(m, random_ids(1, 8)), ValueError, "not patched by kvx"),
    ("kv-cache-storage", lambda m: kvx.KVCache(m.config, "sparse"), ValueError, r"storage 'sparse'.*(choose from|known policies: ).*dense|ragged"),
    ("legacy-architecture", lambda m: kvx.patch(BloomForCausalLM(BloomConfig(n_layer=1, hidden_size=32, n_head=2,
                                                                              vocab_size=64)), "snapkv"),
     ValueError, "does not support model_type 'bloom'"),
]


@pytest.mark.parametrize("call,error,message", [pytest.param(*case[1:], id=case[0]) for case in API_ERRORS])
def test_error_api(model, call, error, message):
    with pytest.raises(error, match=message):
        call(model)
    assert not kvx.is_patched(model)  # a refused patch leaves the model as it was


def _patched_prefill(model, ids=None, mask=None, chunk_size=None):
    """kvx.prefill on the shared model patched with snapkv (budget 8, window 4)."""
    kvx.patch(model, "snapkv", budget=8, window=4)
    return kvx.prefill(model, random_ids(1, 8) if ids is None else ids, mask, chunk_size)


def _patched_generate(model, **kwargs):
    """generate() on the shared model patched with snapkv (budget 8, window 4)."""
    kvx.patch(model, "snapkv", budget=8, window=4)
    ids = random_ids(1, 20)
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False, **kwargs)


def _patched_forward(model, **kwargs):
    kvx.patch(model, "snapkv", budget=8, window=4)
    with torch.inference_mode():
        return model(random_ids(1, 12), **kwargs)


PATCHED_ERRORS = [
    ("prefill-chunk-negative", lambda m: _patched_prefill(m, chunk_size=-1),
     "chunk_size must be a positive int or None, got -1"),
    ("prefill-chunk-zero", lambda m: _patched_prefill(m, chunk_size=0), "chunk_size must be .* got 0"),
    ("prefill-1d-ids", lambda m: _patched_prefill(m, ids=random_ids(1, 8)[0]),
     r"input_ids must be a 2-D integer tensor \[batch, tokens\], got a 1-D torch.int64 tensor"),
    ("prefill-float-ids", lambda m: _patched_prefill(m, ids=random_ids(1, 8).float()),
     "input_ids must be a 2-D integer tensor .* got a 2-D torch.float32 tensor"),
    ("prefill-list-ids", lambda m: _patched_prefill(m, ids=[[5, 6, 7]]), "input_ids must be .* got list"),
    ("prefill-no-tokens", lambda m: _patched_prefill(m, ids=random_ids(1, 8)[:, :0]),
     r"input_ids holds no tokens \(shape \[batch, 0\]\)"),
    ("prefill-mask-shape", lambda m: _patched_prefill(m, mask=torch.ones(1, 5, dtype=torch.long)),
     r"attention_mask must have the shape of input_ids \(1, 8\), got \(1, 5\)"),
    ("compress-context-chunk", lambda m: (kvx.patch(m, "snapkv", budget=8, window=4),
                                          kvx.compress_context(m, random_ids(1, 8), chunk_size=-4)),
     "chunk_size must be a positive int or None, got -4"),
    ("output-attentions-generate", lambda m: _patched_generate(m, output_attentions=True, return_dict_in_generate=True),
     "output_attentions=True: a kvx-patched model returns no attention maps.*kvx.unpatch"),
    ("output-attentions-forward", lambda m: _patched_forward(m, output_attentions=True),
     "output_attentions=True: a kvx-patched model returns no attention maps"),
    ("offloaded-cache", lambda m: _patched_generate(m, cache_implementation="offloaded"),
     "cache_implementation='offloaded': a kvx cache .* does not offload"),
    ("static-cache", lambda m: _patched_generate(m, cache_implementation="static"),
     "was given a StaticCache; drop cache_implementation"),
    ("filled-dynamic-cache", lambda m: _filled_dynamic_cache(m), "a DynamicCache that already holds tokens"),
    ("ragged-policy-dense-cache", lambda m: _ragged_on_dense_cache(m), "this kvx cache has dense storage but policy head_budget"),
]


def _filled_dynamic_cache(model):
    cache = DynamicCache()
    with torch.inference_mode():
        model(random_ids(1, 6), **kvx.cache_kwargs(cache))  # unpatched: a plain cache that holds 6 tokens
    kvx.patch(model, "snapkv", budget=8, window=4)
    with torch.inference_mode():
        model(random_ids(1, 4), **kvx.cache_kwargs(cache))


def _ragged_on_dense_cache(model):
    kvx.patch(model, "head_budget", budget=8, window=4)
    with torch.inference_mode():
        model(random_ids(1, 6), **kvx.cache_kwargs(kvx.KVCache(model.config)))


@pytest.mark.parametrize("call,message", [pytest.param(*case[1:], id=case[0]) for case in PATCHED_ERRORS])
def test_error_patched_model(model, call, message):
    with pytest.raises(ValueError, match=message):
        call(model)


def _policy(spec: str):
    return from_spec(spec)


ASSIGNMENTS = [
    # (id, policy spec, option, bad value, error type, message); the old value must survive
    ("budget-zero", "snapkv:budget=64,window=8", "budget", 0, ValueError, "snapkv: budget must be >= 1, got 0"),
    ("budget-below-window", "snapkv:budget=64,window=8", "budget", 4, ValueError, r"window \(8\) must not exceed budget \(4\)"),
    ("window-over-budget", "snapkv:budget=64,window=8", "window", 65, ValueError, r"window \(65\) must not exceed budget \(64\)"),
    ("ratio-two", "h2o:budget=64", "ratio", 2, ValueError, r"ratio must be a number in \[0, 1\), got 2"),
    ("pooling", "snapkv", "pooling", "mean", ValueError, "pooling must be one of avg, max, none; got 'mean'"),
    ("recent", "h2o:budget=16,recent=4", "recent", 17, ValueError, r"recent \(17\) must not exceed budget \(16\)"),
    ("tau", "keyformer", "tau", -1.0, ValueError, r"tau must be a number in \(0, inf\)"),
    ("sink", "streaming_llm", "sink", -1, ValueError, "sink must be >= 0"),
    ("floor", "head_budget", "floor", 3, ValueError, r"floor must be a number in \[0, 1\], got 3"),
    ("scorer", "pyramidkv", "scorer", "nope", ValueError, "unknown policy 'nope'"),
    ("schedule", "pyramidkv:budget=64,window=16", "schedule", [64, 8], ValueError, r"schedule\[1\] \(8\) is below window \(16\)"),
    ("knorm-recent", "knorm:budget=8", "recent", 9, ValueError, r"recent \(9\) must not exceed budget \(8\)"),
    ("decode-interval", "tova", "decode_interval", -3, ValueError, "decode_interval must be >= 0, got -3"),
]


@pytest.mark.parametrize("spec,option,value,error,message", [pytest.param(*case[1:], id=case[0]) for case in ASSIGNMENTS])
def test_error_assignment_is_validated(spec, option, value, error, message):
    policy = _policy(spec)
    before = getattr(policy, option)
    with pytest.raises(error, match=message):
        setattr(policy, option, value)
    assert getattr(policy, option) == before  # an invalid value is not kept


@pytest.mark.parametrize("spec,name", [("snapkv", "bugdet"), ("streaming_llm", "budget"), ("h2o", "window")])
def test_error_assignment_to_a_name_that_is_not_an_option(spec, name):
    """A typo in an attribute name raises (it used to create an attribute nothing reads)."""
    policy = _policy(spec)
    with pytest.raises(AttributeError, match=rf"{spec} has no option '{name}'; its options: "):
        setattr(policy, name, 8)
    assert not hasattr(policy, name)


def test_error_assignment_after_patching_is_validated(model):
    """``policy.budget = 0`` on a patched model's policy raises; the patch keeps compressing at 8."""
    policy = kvx.patch(model, "snapkv", budget=8, window=4)
    with pytest.raises(ValueError, match="snapkv: budget must be >= 1, got 0"):
        kvx.policy_of(model).budget = 0
    _, _, cache = greedy(model, random_ids(1, 30), new_tokens=1)
    assert policy.budget == 8 and max(s["kept_max"] for s in cache.stats()) == 8


def test_error_a_schedule_assigned_after_patching_must_fit_the_model(model):
    policy = kvx.patch(model, "pyramidkv", budget=16, window=4, schedule=[16, 16])
    policy.schedule = [16, 8, 4]  # valid by itself: the model is only known at the next forward
    with pytest.raises(ValueError, match="the schedule lists 3 budgets but the model has 2 layers"):
        greedy(model, random_ids(1, 30), new_tokens=1)


# ---------------------------------------------------------------- CLI: one line, exit 2, names the mistake

CLI_ERRORS = [
    # (id, argv with placeholders, what the one line must say)
    ("no-such-command", ["polices"], r"argument COMMAND: invalid choice: 'polices'"),
    ("unknown-flag", ["policies", "--jsn"], r"unrecognized arguments: --jsn"),
    ("policies-unknown", ["policies", "nope"], r"unknown policy 'nope'; known policies: "),
    ("policies-option-typo", ["policies", "snapkv:budgt=3"], r"unknown option\(s\) \['budgt'\]; valid options"),
    ("policies-two-selections", ["policies", "snapkv+h2o"], "snapkv and h2o both answer the selection axis"),
    ("policies-dangling-plus", ["policies", "snapkv+"], "a policy spec part without a name"),
    ("policies-no-value", ["policies", "snapkv:budget"], "options are written key=value"),
    ("policies-budget-zero", ["policies", "snapkv:budget=0"], "snapkv: budget must be >= 1, got 0"),
    ("policies-window-over-budget", ["policies", "snapkv:budget=16,window=32"], r"window \(32\) must not exceed budget \(16\)"),
    ("policies-knorm-recent", ["policies", "knorm:budget=8,recent=9"], r"recent \(9\) must not exceed budget \(8\)"),
    ("policies-schedule", ["policies", "pyramidkv:schedule=steep"], "schedule must be one of pyramid, uniform"),
    ("policies-no-name", ["policies", ":budget=3"], "a policy spec part without a name"),
    ("policies-empty-spec", ["policies", ""], "an empty policy spec"),
    ("models-write-alone", ["models", "--write"], "--write only work with --verify"),
    ("models-type-alone", ["models", "llama"], r"model types \(llama\) only work with --verify"),
    ("models-unknown-type", ["models", "--verify", "--no-progress", "lama"], r"unknown model type\(s\) lama.*llama"),
    ("demo-prompt-zero", ["demo", "--prompt-tokens", "0"], "argument --prompt-tokens: must be >= 1, got 0"),
    ("demo-prompt-negative", ["demo", "--prompt-tokens", "-5"], "argument --prompt-tokens: must be >= 1, got -5"),
    ("demo-prompt-text", ["demo", "--prompt-tokens", "many"], "argument --prompt-tokens: 'many' is not a whole number"),
    ("demo-new-zero", ["demo", "--new-tokens", "0"], "argument --new-tokens: must be >= 1, got 0"),
    ("needle-lengths-zero", ["--lengths", "0"], "--lengths must be positive numbers.*got '0'"),
    ("needle-lengths-text", ["--lengths", "four"], "cannot read 'four' as a length in tokens"),
    ("needle-lengths-empty", ["--lengths", ","], "--lengths ',': give at least one value"),
    ("needle-lengths-fraction", ["--lengths", "1.3"], "cannot read '1.3' as a length"),
    ("needle-lengths-too-short", ["--lengths", "20"], "length 20 is too short: the question and needles alone take"),
    ("needle-depths-over", ["--depths", "120"], r"depths: 120.0 is not a depth within \[0, 100\] percent"),
    ("needle-depths-negative", ["--depths", "-5"], r"depths: -5.0 is not a depth within \[0, 100\]"),
    ("needle-depths-text", ["--depths", "half"], "--depths: cannot read 'half' as a number"),
    ("needle-lengths-twice", ["--lengths", "200,256,200"], "--lengths lists 200 twice"),
    ("needle-depths-twice", ["--depths", "50,50.0"], "--depths lists 50 twice"),
    ("needle-variants-twice", ["--variants", "single,single"], "variants lists 'single' twice"),
    ("needle-variants-typo", ["--variants", "multikeys"], r"unknown needle variant\(s\) \['multikeys'\]; choose from single"),
    ("needle-samples-zero", ["--samples", "0"], "argument --samples: must be >= 1, got 0"),
    ("needle-samples-text", ["--samples", "two"], "argument --samples: 'two' is not a whole number"),
    ("needle-distractors-negative", ["--distractors", "-1"], "argument --distractors: must be >= 0, got -1"),
    ("needle-distractors-zero-multikey", ["--distractors", "0", "--variants", "multikey"],
     "distractors must be >= 1 with variant.*multikey"),
    ("needle-distractors-too-many", ["--distractors", "500"], "distractors must be at most"),
    ("needle-max-new-zero", ["--max-new-tokens", "0"], "argument --max-new-tokens: must be >= 1, got 0"),
    ("needle-max-new-negative", ["--max-new-tokens", "-2"], "argument --max-new-tokens: must be >= 1, got -2"),
    ("needle-policy-unknown", ["--policy", "nope"], "unknown policy 'nope'"),
    ("needle-policy-option-typo", ["--policy", "snapkv:budgt=3"], r"unknown option\(s\) \['budgt'\]"),
    ("needle-policy-budget-zero", ["--policy", "snapkv:budget=0"], "budget must be >= 1, got 0"),
    ("needle-policy-twice", ["--policy", "streaming_llm:sink=2,window=32"], "the same policy is listed twice"),
    ("needle-dense-options", ["--policy", "dense:budget=3"], "dense is the uncompressed baseline and takes no options"),
    ("needle-opt-nobody", ["--opt", "budget=3"], r"--opt budget: none of the listed policies \(streaming_llm\)"),
    ("needle-opt-no-value", ["--opt", "window"], "options are written key=value, got 'window'"),
    ("needle-compress", ["--compress", "question"], r"argument --compress: invalid choice: 'question'"),
    ("needle-dtype", ["--dtype", "float64"], "unknown dtype 'float64'; choose from float32, bfloat16, float16"),
    ("needle-device-gpu", ["--device", "gpu"], r"argument --device: unknown device 'gpu'; choose from cpu, cuda"),
    ("needle-device-missing", ["--device", "cuda:99"], r"argument --device: 'cuda:99'"),
    ("needle-out-file", ["--out", "{file}"], r"--out .*file.txt: is a file, not a directory"),
    ("needle-out-under-file", ["--out", "{file}/sub"], r"--out .*file.txt/sub: cannot create the directory"),
    ("needle-haystack-missing", ["--haystack", "{tmp}/nope.txt"], r"--haystack .*nope.txt: no such file"),
    ("needle-haystack-dir", ["--haystack", "{tmp}"], r"--haystack .*: not a file"),
    ("needle-haystack-binary", ["--haystack", "{binary}"], r"--haystack .*binary.bin: not UTF-8 text \(byte 0xff at offset 14\)"),
    ("needle-config-binary", ["--config", "{binary}"], r"binary.bin: not UTF-8 text \(byte 0xff at offset 14\)"),
    ("needle-foreign-tokenizer", ["--tokenizer", "{big_vocab}"], r"the tokenizer gives token id \d+, past the model's "
                                                                  r"vocabulary \(\d+ tokens\): it is not this model's"),
    ("needle-haystack-empty", ["--haystack", "{empty}"], "the haystack text file is empty"),
    ("needle-no-dense-alone", ["needle", "--model", "{model}", "--out", "{out}", "--no-dense", "--lengths", "200"],
     "--no-dense leaves no policy to run; add --policy NAME"),
    ("needle-config-missing", ["--config", "{tmp}/nope.yaml"], r"--config .*nope.yaml: no such file"),
    ("needle-model-missing", ["--model", "{tmp}/no-model"], r"--model .*no-model: no such directory"),
    ("needle-model-file", ["--model", "{file}"], r"--model .*file.txt: is a file; give the model's directory"),
    ("needle-model-no-tokenizer", ["--model", "{no_tokenizer}"], "no tokenizer could be loaded from .* --tokenizer PATH"),
    ("needle-model-no-weights", ["--model", "{no_weights}"], r"--model .*no_weights: no causal LM could be loaded"),
    ("needle-tokenizer-missing", ["--tokenizer", "{tmp}/no-tok"], r"--tokenizer .*no-tok: no such directory"),
]


@pytest.mark.parametrize("argv,message", [pytest.param(*case[1:], id=case[0]) for case in CLI_ERRORS])
def test_error_cli(argv, message, paths, capsys):
    argv = needle_args(paths, *argv) if argv[0].startswith("--") else fill(argv, paths)
    assert re.search(message, cli_error(argv, capsys))
    assert not Path(paths["out"], "results.jsonl").exists()  # refused before any work


BENCH_ERRORS = [
    ("e2e-new-tokens-negative", ["e2e", "--new-tokens", "-2"], "argument --new-tokens: must be >= 1, got -2"),
    ("e2e-new-tokens-zero", ["e2e", "--new-tokens", "0"], "argument --new-tokens: must be >= 1, got 0"),
    ("e2e-repeats-zero", ["e2e", "--repeats", "0"], "argument --repeats: must be >= 1, got 0"),
    ("e2e-warmup-negative", ["e2e", "--warmup", "-1"], "argument --warmup: must be >= 0, got -1"),
    ("e2e-layers-zero", ["e2e", "--layers", "0"], "argument --layers: must be >= 1, got 0"),
    ("e2e-chunk-zero", ["e2e", "--chunk-size", "0"], "argument --chunk-size: must be >= 1, got 0"),
    ("e2e-lengths-zero", ["e2e", "--lengths", "0"], "--lengths must be positive numbers"),
    ("e2e-lengths-text", ["e2e", "--lengths", "4k,lots"], "cannot read 'lots' as a length"),
    ("e2e-lengths-empty", ["e2e", "--lengths", ""], "--lengths '': give at least one value"),
    ("e2e-policies-twice", ["e2e", "--policies", "snapkv,snapkv"], "--policies lists snapkv twice"),
    ("e2e-lengths-twice", ["e2e", "--lengths", "4k,4096"], "--lengths lists 4096 twice"),
    ("e2e-policy-unknown", ["e2e", "--policies", "dense,snapkvv"], "unknown policy 'snapkvv'"),
    ("e2e-policy-budget", ["e2e", "--policies", "snapkv:budget=0"], "snapkv: budget must be >= 1, got 0"),
    ("e2e-policy-window", ["e2e", "--policy", "snapkv:budget=16,window=32"], r"window \(32\) must not exceed budget \(16\)"),
    ("e2e-policies-semicolon", ["e2e", "--policies", "snapkv:budget=16;window=8"], "';' no longer separates options"),
    ("e2e-policy-twice", ["e2e", "--policy", "h2o:budget=64", "--policy", "h2o:budget=64"], "--policy lists h2o:budget=64 twice"),
    ("e2e-policy-and-policies", ["e2e", "--policy", "h2o", "--policies", "snapkv"], "--policies: not allowed with"),
    ("e2e-model-unknown", ["e2e", "--model", "no-such-model"], "unknown model 'no-such-model'.*tiny-llama"),
    ("e2e-dtype", ["e2e", "--dtype", "float64"], "unknown dtype 'float64'"),
    ("e2e-device-gpu", ["e2e", "--device", "gpu"], "argument --device: unknown device 'gpu'"),
    ("e2e-device-bogus", ["e2e", "--device", "tpu"], "argument --device: unsupported device 'tpu'|unknown device 'tpu'"),
    ("e2e-out-file", ["e2e", "--out", "{file}"], "--out .*: is a file, not a directory"),
    ("e2e-too-big", ["e2e", "--model", "llama3-8b", "--lengths", "1000k"], r"needs about .* GiB .* free"),
    ("kernels-gqa-3", ["kernels", "--gqa", "1,3"], r"gqa 3: query heads per KV head must divide the 32 query heads; "
                                                    r"choose from 1, 2, 4, 8, 16, 32"),
    ("kernels-gqa-zero", ["kernels", "--gqa", "0"], "--gqa must be positive numbers"),
    ("kernels-gqa-twice", ["kernels", "--gqa", "4,4"], "--gqa lists 4 twice"),
    ("kernels-head-dims-zero", ["kernels", "--head-dims", "0"], "--head-dims must be positive numbers"),
    ("kernels-op-unknown", ["kernels", "--ops", "attention_decode,warp"], r"unknown kernel\(s\) \['warp'\]; choose from"),
    ("kernels-ops-empty", ["kernels", "--ops", ","], "--ops ',': give at least one value"),
    ("kernels-repeats-zero", ["kernels", "--repeats", "0"], "argument --repeats: must be >= 1, got 0"),
    ("kernels-out-file", ["kernels", "--out", "{file}"], "--out .*: is a file, not a directory"),
    ("bench-no-what", [], "the following arguments are required: WHAT"),
]


@pytest.mark.parametrize("argv,message", [pytest.param(*case[1:], id=case[0]) for case in BENCH_ERRORS])
def test_error_cli_bench(argv, message, paths, capsys):
    extra = ["--quiet", "--lengths", "64"] if argv and "--lengths" not in argv else []
    out = [] if not argv or "--out" in argv else ["--out", "{out}"]
    line = cli_error(fill(["bench"] + argv + extra + out, paths), capsys)
    assert re.search(message, line), line


YAML_ERRORS = [
    ("malformed", "lengths: [1k, 2k\n", r"run.yaml: not valid YAML at line \d+, column \d+"),
    ("not-a-mapping", "- 1k\n- 2k\n", "run.yaml: a run is a YAML mapping with keys from .*lengths.*; got a list"),
    ("unknown-key", "lenghts: [1k]\n", r"run.yaml: unknown key\(s\) \['lenghts'\]; valid keys"),
    ("lengths-scalar", "lengths: 1k\n", "run.yaml: lengths must be a non-empty list, got '1k'"),
    ("lengths-text", "lengths: [lots]\n", "run.yaml: cannot read 'lots' as a length"),
    ("lengths-twice", "lengths: [1k, 1024]\n", "run.yaml: lengths lists 1024 twice"),
    ("depths-text", "lengths: [200]\ndepths: [half]\n", r"run.yaml: depths: 'half' is not a depth within \[0, 100\]"),
    ("samples-text", "lengths: [200]\nsamples: two\n", "run.yaml: needle: samples must be an int, got str 'two'"),
    ("variants-typo", "lengths: [200]\nvariants: [singel]\n", r"run.yaml: unknown needle variant\(s\) \['singel'\]"),
    ("compress", "lengths: [200]\ncompress: all\n", "run.yaml: compress must be one of prompt, context; got 'all'"),
    ("policies-empty", "lengths: [200]\npolicies: []\n", "run.yaml: policies must be a non-empty list"),
    ("policy-no-name", "lengths: [200]\npolicies:\n  - {budget: 64}\n",
     r"run.yaml: policies\[0\]: each entry is a policy spec or a mapping with a name"),
    ("policy-option-typo", "lengths: [200]\npolicies:\n  - dense\n  - {name: snapkv, budgt: 64}\n",
     r"run.yaml: policies\[1\]: snapkv: unknown option\(s\) \['budgt'\]"),
    ("policy-spec-typo", "lengths: [200]\npolicies: ['snapkv:budget=0']\n", "run.yaml: snapkv: budget must be >= 1, got 0"),
    ("chat-template-text", "lengths: [200]\nuse_chat_template: maybe\n", "run.yaml: use_chat_template must be true or false"),
    ("max-new-tokens-negative", "lengths: [200]\nmax_new_tokens: -2\n", "run.yaml: needle: max_new_tokens must be >= 1"),
    ("schedule-for-another-model", "lengths: [200]\npolicies:\n  - {name: pyramidkv, budget: 64, window: 16, "
     "schedule: [64, 64, 64]}\n", "pyramidkv: the schedule lists 3 budgets but the model has 2 layers"),
    ("values-one-multivalue", "lengths: [200]\nvariants: [multivalue]\nvalues: 1\n",
     "run.yaml: needle: values must be >= 2, got 1"),
]


@pytest.mark.parametrize("text,message", [pytest.param(*case[1:], id=case[0]) for case in YAML_ERRORS])
def test_error_cli_yaml(text, message, paths, capsys):
    config = Path(paths["tmp"], "run.yaml")
    config.write_text(text)
    argv = fill(["needle", "--model", "{model}", "--out", "{out}", "--no-progress", "--config", str(config)], paths)
    assert re.search(message, cli_error(argv, capsys))
    assert not Path(paths["out"], "results.jsonl").exists()  # refused before any cell


def test_error_bench_policy_the_model_cannot_take_is_refused_before_timing(model):
    runs = [needle.PolicyRun("dense"), needle.PolicyRun("pyramidkv", {"budget": 64, "window": 16, "schedule": [64] * 3})]
    with pytest.raises(ValueError, match="the schedule lists 3 budgets but the model has 2 layers"):
        bench.bench_e2e(model, [32], runs, new_tokens=1, repeats=1, warmup=0)


def test_error_cli_debug_shows_the_traceback(capsys):
    """--debug (before or after the command) adds the traceback; the last line is still the one-line error."""
    for argv in (["--debug", "policies", "snapkvv"], ["policies", "snapkvv", "--debug"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and err.strip().splitlines()[-1].startswith(
            "kvx policies: error: unknown policy 'snapkvv'")


def test_error_cli_unexpected_failure_is_one_line(monkeypatch, capsys):
    """A bug (not a user mistake) is one line too, exit 1, pointing at --debug."""
    monkeypatch.setattr("kvx.cli.list_policies", lambda: 1 / 0)
    assert main(["policies"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["kvx policies: internal error: ZeroDivisionError: division by zero "
                     "(run again with --debug for the traceback)"]


# ---------------------------------------------------------------- valid inputs give the correct result


def test_valid_generate_without_cache_equals_unpatched(model):
    ids = random_ids(1, 20)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, use_cache=False)
    with torch.inference_mode():
        expected = model.generate(ids, **kwargs)
        with kvx.patched(model, "snapkv", budget=8, window=4):
            assert torch.equal(model.generate(ids, **kwargs), expected)


def test_valid_generate_from_inputs_embeds_equals_unpatched(model):
    ids = random_ids(1, 20)
    embeds = model.get_input_embeddings()(ids).detach()
    kwargs = dict(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    with torch.inference_mode():
        expected = model.generate(**kwargs)
        with kvx.patched(model, "snapkv", budget=64, window=4):  # keeps everything: equal to dense
            assert torch.equal(model.generate(**kwargs), expected)


def test_valid_unpatch_removes_the_generate_wrapper(model):
    kvx.patch(model, "snapkv", budget=8, window=4)
    assert "generate" in vars(model)
    kvx.unpatch(model)
    assert "generate" not in vars(model) and model.generation_config.prefill_chunk_size is None


def test_valid_assignment_takes_effect(model):
    """A valid assignment after patching is used by the next run."""
    policy = kvx.patch(model, "snapkv", budget=16, window=4)
    policy.budget = 6
    _, _, cache = greedy(model, random_ids(1, 30), new_tokens=1)
    assert {s["kept_max"] for s in cache.stats()} == {6}


@pytest.mark.parametrize("spec,prompt,kept", [
    ("snapkv:ratio=0.9,window=16", 40, 16),  # 10% of 40 is 4, but the 16-token window is always kept
    ("snapkv:ratio=0.5,window=4", 40, 20),
    ("h2o:ratio=0.9,recent=12,decode_interval=0", 40, 12),
    ("knorm:ratio=0.95,recent=6", 40, 6),
    ("pyramidkv:ratio=0.9,window=10,schedule=uniform", 40, 10),
])
def test_valid_ratio_never_keeps_fewer_than_the_window(model, spec, prompt, kept):
    kvx.patch(model, from_spec(spec))
    _, _, cache = greedy(model, random_ids(1, prompt), new_tokens=1)
    assert {s["kept_min"] for s in cache.stats()} == {kept}


@pytest.mark.parametrize("budget,window,beta,layers", [(256, 32, 20, 3), (100, 8, 10, 8), (64, 32, 20, 2),
                                                       (64, 64, 2, 5), (1024, 32, 20, 32)])
def test_valid_pyramid_schedule_keeps_its_floor_and_average(budget, window, beta, layers):
    budgets = kvx.make_policy("pyramidkv", budget=budget, window=window, beta=beta).layer_budgets(layers, budget)
    assert min(budgets) == budgets[-1] >= window and budgets == sorted(budgets, reverse=True)
    assert sum(budgets) / layers == pytest.approx(budget, abs=1)


@pytest.mark.parametrize("spec", ["snapkv:budget=16,window=16", "h2o:budget=8,recent=8", "knorm:budget=8,recent=8",
                                  "keyformer:budget=8,recent=8", "head_budget:budget=8,window=8",
                                  "pyramidkv:budget=16,window=16"])
def test_valid_window_equal_to_budget(model, spec):
    """The always-kept window may fill the budget: accepted, and the run keeps the budget."""
    kvx.patch(model, from_spec(spec))
    _, _, cache = greedy(model, random_ids(1, 40), new_tokens=1)
    assert max(s["kept_max"] for s in cache.stats()) <= int(re.search(r"budget=(\d+)", spec).group(1))


def test_valid_knorm_keeps_its_recent_tokens(model):
    """recent == budget: knorm keeps exactly the newest tokens, whatever their key norms."""
    ids = random_ids(1, 40, seed=3)
    with torch.inference_mode():
        newest = kvx.cache_of(model(ids)).layers[0].keys[..., -10:, :]
        kvx.patch(model, "knorm", budget=10, recent=10)
        kept = kvx.cache_of(model(ids)).layers[0].keys
    assert torch.equal(kept, newest)


def test_valid_sliding_only_model_warns_once_and_runs_dense():
    sliding = tiny_model("mistral", sliding_window=8)
    ids = random_ids(1, 20)
    expected, _, _ = greedy(sliding, ids, new_tokens=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kvx.patch(sliding, "snapkv", budget=4, window=2)
        got, _, _ = greedy(sliding, ids, new_tokens=3)
    messages = [str(w.message) for w in caught if "nothing to compress" in str(w.message)]
    assert len(messages) == 1 and "snapkv" in messages[0] and "sliding window" in messages[0]
    assert torch.equal(got, expected)


def test_valid_model_with_a_full_layer_does_not_warn():
    mixed = tiny_model("gemma3_text")  # one sliding, one full attention layer
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kvx.patch(mixed, "snapkv", budget=8, window=4)


def test_valid_failed_patch_keeps_the_previous_policy(model):
    kvx.patch(model, "snapkv", budget=8, window=4)
    with pytest.raises(ValueError, match="budget must be >= 1"):
        kvx.patch(model, "snapkv", budget=0)
    assert kvx.policy_of(model).budget == 8


@pytest.mark.parametrize("text,tokens", [("512", 512), ("4k", 4096), ("1.5k", 1536), (" 2K ", 2048), ("64.0", 64)])
def test_valid_lengths(text, tokens):
    assert needle.parse_length(text) == tokens


@pytest.mark.parametrize("spec,label", [
    ("SnapKV:budget=64,window=8", "snapkv:budget=64,window=8"),
    ("snapkv:budget=64,window=8+ragged", "snapkv:budget=64,window=8+ragged"),
    ("streaming-llm:sink=2,window=30", "streaming_llm:sink=2,window=30"),
    ("dense", "dense"),
])
def test_valid_policy_specs_on_the_command_line(spec, label):
    assert bench.parse_policy_list(spec)[-1].label == label


def test_valid_policies_command_describes_a_spec(capsys):
    assert main(["policies", "knorm:budget=8,recent=8"]) == 0
    assert "recent=8" in capsys.readouterr().out


def test_valid_kernel_grid_with_every_divisor():
    bench.check_kernel_grid(list(bench.KERNELS), [1, 2, 4, 8, 16, 32])
    assert len(bench.kernel_cases("attention_decode", [64], [16], [1, 32])) == 2


def test_valid_needle_distractors_zero_with_single(paths, capsys):
    """Distractors only matter for multikey and absent: 0 is valid with the single variant."""
    assert main(needle_args(paths, "--distractors", "0", "--depths", "50")) == 0
    rows = needle.load_results(Path(paths["out"], "results.jsonl"))
    assert len(rows) == 2 and {len(r["needle_positions"]) for r in rows} == {1}


def test_valid_needle_multikey_places_its_distractors(paths, capsys):
    assert main(needle_args(paths, "--variants", "multikey", "--distractors", "3", "--depths", "50")) == 0
    rows = needle.load_results(Path(paths["out"], "results.jsonl"))
    assert {len(r["needle_positions"]) for r in rows} == {4}  # the needle + 3 distractors


def test_valid_opt_and_no_dense_reach_the_config_policies(paths, capsys):
    """--opt and --no-dense apply to the policies of --config too (they used to be dropped or refused)."""
    config = Path(paths["tmp"], "run.yaml")
    config.write_text("lengths: [200]\ndepths: [50]\nmax_new_tokens: 2\npolicies:\n  - dense\n  - streaming_llm\n"
                      "  - 'snapkv:budget=64+ragged'\n")
    argv = fill(["needle", "--model", "{model}", "--out", "{out}", "--no-progress", "--config", str(config),
                 "--opt", "window=16", "--no-dense"], paths)
    assert main(argv) == 0
    assert sorted(r["policy"] for r in _rows(paths)) == ["snapkv:budget=64,window=16+ragged",
                                                         "streaming_llm:window=16"]


def test_valid_lengths_past_the_models_positions_run_with_a_warning(paths, capsys):
    assert main(needle_args(paths, "--lengths", "300", "--depths", "50")) == 0
    err = capsys.readouterr().err
    assert "kvx needle: warning: lengths 300 exceed the model's max_position_embeddings (256)" in err
    assert {r["prompt_tokens"] for r in _rows(paths)} == {300}


def test_valid_validate_may_normalise_an_option_and_set_a_derived_attribute():
    """What a policy's validate() assigns (a normalised option, a derived value) is stored without
    validating again: no recursion, no 'has no option' error."""
    from dataclasses import dataclass
    from typing import ClassVar

    from kvx.policy import BudgetedPolicy, option

    @dataclass
    class Normalising(BudgetedPolicy):
        name: ClassVar[str] = "normalising"
        summary: ClassVar[str] = "test"
        mode: str = option("MEAN", "a case-insensitive choice")

        def validate(self):
            super().validate()
            self.mode = self.mode.lower()
            self.half = self.budget // 2

    policy = Normalising(budget=8)
    policy.budget = 10
    policy.mode = "MAX"
    assert (policy.mode, policy.half) == ("max", 5)


def test_valid_output_attentions_false_overrides_the_config(model):
    eager = tiny_model("llama")
    eager.set_attn_implementation("eager")
    eager.config.output_attentions = True
    with kvx.patched(eager, "snapkv", budget=8, window=4):
        out = eager(random_ids(1, 20), output_attentions=False)
    assert out.logits.shape == (1, 20, eager.config.vocab_size)


def test_valid_a_generate_of_the_users_survives_patch_and_unpatch(model):
    """An instance generate the model had is what the patched generate calls, and comes back at
    unpatch; one the user sets while patched stays after unpatch."""
    calls = []

    def before(*args, **kwargs):
        calls.append("before")
        return type(model).generate(model, *args, **kwargs)

    model.generate = before
    try:
        kvx.patch(model, "snapkv", budget=8, window=4, chunk_size=8)
        out = model.generate(random_ids(1, 20), use_cache=False, max_new_tokens=2, pad_token_id=0)
        assert out.shape == (1, 22) and calls == ["before"]
        kvx.unpatch(model)
        assert model.generate is before
        kvx.patch(model, "snapkv", budget=8, window=4, chunk_size=8)

        def during(*args, **kwargs):
            return "during"

        model.generate = during
        kvx.unpatch(model)
        assert model.generate is during
    finally:
        vars(model).pop("generate", None)


def test_valid_the_weights_fingerprint_sees_a_change_in_a_few_columns():
    """Zeroing a block of columns of one matrix (pruning a head's inputs) changes the fingerprint;
    an even stride over the flattened matrix would have read one column only."""
    first, second = tiny_model("llama"), tiny_model("llama")
    assert needle.weights_fingerprint(first) == needle.weights_fingerprint(second)
    with torch.no_grad():
        second.model.layers[0].self_attn.o_proj.weight[:, 16:32] = 0
    assert needle.weights_fingerprint(first) != needle.weights_fingerprint(second)


def test_valid_a_hub_id_without_an_organisation_is_not_taken_for_a_missing_directory():
    needle._check_local("gpt2", "--model")  # a hub id: loading it is transformers' business
    needle._check_local("meta-llama/Llama-3.1-8B", "--model")
    with pytest.raises(ValueError, match="--model ./gpt2: no such directory"):
        needle._check_local("./gpt2", "--model")


def test_valid_the_run_identity_names_one_directory_however_it_is_spelled(tmp_path, monkeypatch):
    tiny = tiny_model("llama")
    tiny.save_pretrained(tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    config = needle.NeedleConfig(lengths=[256])
    tokenizer = build_tokenizer()
    identities = []
    for spelling in ("m", str(tmp_path / "m"), "./m/"):
        tiny.name_or_path = spelling
        identities.append(needle.run_identity(tiny, tokenizer, config, None)["model"])
    assert identities == [str((tmp_path / "m").resolve())] * 3


def test_valid_pyramidkv_keeps_a_scorer_objects_larger_window_in_every_layer():
    scorer = kvx.make_policy("snapkv", budget=64, window=48)
    policy = kvx.make_policy("pyramidkv", budget=64, window=8, scorer=scorer)
    budgets = policy.layer_budgets(4, 64)
    assert min(budgets) == 48 and sum(budgets) / 4 == pytest.approx(64, abs=1)
    with pytest.raises(ValueError, match=r"schedule\[0\] \(40\) is below window \(48\)"):
        kvx.make_policy("pyramidkv", budget=64, window=8, scorer=scorer, schedule=[40, 40, 40, 40])


# ---------------------------------------------------------------- faults survived


def _rows(paths) -> list[dict]:
    return needle.load_results(Path(paths["out"], "results.jsonl"))


def test_fault_killed_mid_cell_resumes_without_losing_or_repeating(paths, capsys, monkeypatch):
    real = needle.NeedleRunner.run_cell
    done = []

    def killed_on_the_third(self, run, cell):
        if len(done) == 2:
            raise KeyboardInterrupt  # the kill lands inside the third cell
        done.append((run.label, cell))
        return real(self, run, cell)

    monkeypatch.setattr(needle.NeedleRunner, "run_cell", killed_on_the_third)
    assert main(needle_args(paths)) == 130
    assert "kvx needle: interrupted" in capsys.readouterr().err and len(_rows(paths)) == 2
    monkeypatch.setattr(needle.NeedleRunner, "run_cell", real)
    assert main(needle_args(paths)) == 0
    keys = [needle._row_key(r) for r in _rows(paths)]
    assert len(keys) == 4 and len(set(keys)) == 4
    assert [(label, cell.depth) for label, cell in done] == [(r["policy"], r["depth"]) for r in _rows(paths)[:2]]


def test_fault_torn_and_foreign_rows_are_reported_by_line_and_not_counted(paths, capsys):
    assert main(needle_args(paths, "--depths", "0")) == 0
    results = Path(paths["out"], "results.jsonl")
    good = results.read_text().splitlines()
    bad_score = {**json.loads(good[1]), "score": 7}
    results.write_text("\n".join(good + ['{"policy": "dense", "len', "[1, 2]", '{"hello": "world"}',
                                         json.dumps(bad_score), good[1]]) + "\n")
    capsys.readouterr()
    assert main(needle_args(paths, "--depths", "0")) == 0
    err = capsys.readouterr().err
    for line, why in [(4, "not JSON"), (5, "not a result row .a JSON list"), (6, "not a result row of kvx needle .no policy"),
                      (7, "a result row with invalid variant or score"), (8, "repeats the cell of line 2")]:
        assert re.search(rf"kvx needle: warning: .*results.jsonl line {line}: {why}", err), (line, err)
    assert len(_rows(paths)) == 2
    summary = json.loads(Path(paths["out"], "summary.json").read_text())
    assert [s["cells"] for s in summary] == [1, 1]


def test_valid_resume_through_another_spelling_of_the_model_path(paths, capsys, monkeypatch):
    """The identity holds the resolved directory: a relative path to the same model resumes."""
    assert main(needle_args(paths)) == 0
    monkeypatch.chdir(Path(paths["model"]).parent)
    assert main(needle_args(paths, model="./model")) == 0
    assert len(_rows(paths)) == 4 and "warning" not in capsys.readouterr().err


def test_fault_resuming_with_other_settings_is_refused(paths, capsys):
    assert main(needle_args(paths)) == 0
    line = cli_error(needle_args(paths, "--max-new-tokens", "3"), capsys)
    assert "was written by another run (settings.max_new_tokens: 2 -> 3)" in line and "--fresh" in line


def test_fault_resuming_with_another_model_is_refused_then_fresh_starts_over(paths, capsys):
    assert main(needle_args(paths)) == 0
    line = cli_error(needle_args(paths, model="{other}"), capsys)
    assert re.search(r"another run \(model: .*model' -> .*other'; weights: '\w+' -> '\w+'\)", line)
    assert main(needle_args(paths, "--fresh", model="{other}")) == 0
    assert Path(paths["out"], "results-1.jsonl").exists() and len(_rows(paths)) == 4
    assert needle.read_results(Path(paths["out"], "results.jsonl")).identity["model"].endswith("other")


def test_fault_empty_results_file_starts_over(paths, capsys):
    """A results file killed before its first line holds nothing: the run starts it, no warning."""
    Path(paths["out"]).mkdir()
    Path(paths["out"], "results.jsonl").write_text("")
    assert main(needle_args(paths)) == 0
    assert len(_rows(paths)) == 4 and "warning" not in capsys.readouterr().err


def test_fault_results_without_identity_are_refused(paths, capsys):
    results = Path(paths["out"], "results.jsonl")
    results.parent.mkdir()
    results.write_text(json.dumps({"policy": "dense", "length": 200, "depth": 0, "variant": "single", "sample": 0,
                                   "score": 1.0, "kv_bytes": 1, "seconds": 0.1}) + "\n")
    line = cli_error(needle_args(paths), capsys)
    assert "records no run identity" in line and "--fresh" in line


def test_fault_a_smaller_rerun_reports_only_its_own_cells(paths, capsys):
    """Rows of cells outside this run's grid stay in the file but are not in its summary."""
    assert main(needle_args(paths)) == 0
    capsys.readouterr()
    assert main(needle_args(paths, "--depths", "100")) == 0
    summary = json.loads(Path(paths["out"], "summary.json").read_text())
    assert [s["cells"] for s in summary] == [1, 1] and len(_rows(paths)) == 4


def test_fault_read_only_out(paths, capsys, monkeypatch):
    """An --out the user cannot write to is refused by name before the model loads (the check is the
    permission test; as root a chmod alone would not stop writes, so os.access answers as for a user)."""
    out = Path(paths["out"])
    out.mkdir()
    out.chmod(0o555)
    real_access = __import__("os").access
    monkeypatch.setattr("kvx.cli.os.access", lambda p, mode: False if Path(p) == out else real_access(p, mode))
    try:
        line = cli_error(needle_args(paths), capsys)
    finally:
        out.chmod(0o755)
    assert re.search(r"--out .*out: the directory is not writable", line)


def test_fault_model_directory_missing_weights_via_api(dirs):
    with pytest.raises(ValueError, match=r"--model .*no_weights: no causal LM could be loaded"):
        needle.load_model(str(dirs["no_weights"]))


def test_fault_model_directory_missing_tokenizer_via_api(dirs):
    with pytest.raises(ValueError, match="no tokenizer could be loaded from .*no_tokenizer"):
        needle.load_model(str(dirs["no_tokenizer"]))


def test_fault_model_missing_tokenizer_works_with_tokenizer_flag(paths, capsys):
    """The remedy the error names: --tokenizer pointing at a directory that has one."""
    assert main(needle_args(paths, "--tokenizer", "{model}", "--depths", "0", model="{no_tokenizer}")) == 0
    assert len(_rows(paths)) == 2


# ---------------------------------------------------------------- the count
#
#   .venv/bin/python -m pytest --collect-only -q tests/test_bad_inputs.py | grep -oE "::test_(error|valid|fault)" | sort | uniq -c
