"""Bad input gets a clear error that names the problem and the valid choices."""

import pytest
import torch
from transformers import BloomConfig, BloomForCausalLM, GPT2Config, GPT2LMHeadModel

import kvx


def test_unknown_policy_lists_the_known_ones(llama):
    with pytest.raises(ValueError, match="unknown policy 'snapkvv'.*snapkv.*streaming_llm"):
        kvx.patch(llama, "snapkvv")
    assert not kvx.is_patched(llama)


@pytest.mark.parametrize("budget", [0, -5])
def test_budget_must_be_positive(llama, budget):
    with pytest.raises(ValueError, match="budget must be >= 1"):
        kvx.patch(llama, "snapkv", budget=budget)


def test_budget_must_be_an_int():
    with pytest.raises(TypeError, match="budget must be an int"):
        kvx.policies.SnapKV(budget=0.5)


def test_window_larger_than_budget():
    with pytest.raises(ValueError, match=r"window \(64\) must not exceed budget \(32\)"):
        kvx.make_policy("snapkv", budget=32, window=64)


@pytest.mark.parametrize(
    "options,match",
    [
        ({"pooling": "median"}, "pooling must be one of avg, max, none"),
        ({"gqa_reduce": "sum"}, "gqa_reduce must be one of mean, max"),
        ({"kernel_size": 4}, "kernel_size must be odd"),
    ],
)
def test_snapkv_option_choices(options, match):
    with pytest.raises(ValueError, match=match):
        kvx.policies.SnapKV(**options)


def test_streaming_llm_window_must_be_positive():
    with pytest.raises(ValueError, match="window must be >= 1"):
        kvx.policies.StreamingLLM(window=0)


def test_unknown_option_lists_the_valid_ones(llama):
    with pytest.raises(TypeError, match="unknown option.*'budgett'.*valid options: budget, ratio, decode_interval, window"):
        kvx.patch(llama, "snapkv", budgett=3)


def test_options_with_a_policy_object_are_refused(llama):
    with pytest.raises(TypeError, match="set them on the object"):
        kvx.patch(llama, kvx.policies.SnapKV(), budget=3)


def test_legacy_attention_code_is_refused_with_its_reason():
    model = BloomForCausalLM(BloomConfig(n_layer=1, hidden_size=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="does not support model_type 'bloom'.*attention interface"):
        kvx.patch(model, "snapkv")


def test_gpt2_is_found_without_an_adapter():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    kvx.patch(model, "snapkv")
    kvx.unpatch(model)


def test_unpatching_an_unpatched_model(llama):
    with pytest.raises(ValueError, match="not patched"):
        kvx.unpatch(llama)


def test_kvx_attention_without_patch_explains(llama):
    from kvx.attention import kvx_attention

    q = torch.zeros(1, 4, 2, 16)
    with pytest.raises(RuntimeError, match="kvx.patch"):
        kvx_attention(torch.nn.Linear(1, 1), q, q[:, :2], q[:, :2], None)
