"""kvx's second shipped model (issue 17), which matches keys: it loads like any model, has the room
per-head and per-layer policies need (4 layers, 4 KV heads, GQA), answers multi-key prompts and
"none" dense, and shows what the needle demo is for: at the same KV bytes, SnapKV (scores from the
question) keeps multi-key accuracy where StreamingLLM and KNorm (query-agnostic) lose it."""

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvx.eval import needle

POLICIES = ["snapkv:budget=256,window=32", "streaming_llm:sink=4,window=252", "knorm:budget=256"]
GRID = dict(lengths=[1024], depths=[0, 25, 50, 75, 100], variants=["single", "multikey", "absent"], samples=2,
            distractors=3)


@pytest.fixture(scope="module")
def keys_model():
    return AutoModelForCausalLM.from_pretrained(needle.KEYS_MODEL).eval(), AutoTokenizer.from_pretrained(needle.KEYS_MODEL)


def test_loads_with_room_for_per_head_and_per_layer_policies(keys_model):
    model, tokenizer = keys_model
    config = model.config
    assert config.model_type == "llama" and config.num_hidden_layers >= 4 and config.num_key_value_heads >= 4
    assert config.num_key_value_heads < config.num_attention_heads  # GQA
    assert config.max_position_embeddings >= 8192
    assert (needle.KEYS_MODEL / "model.safetensors").stat().st_size < 20 * 2**20
    assert tokenizer("There were 12 birds .", add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def rows(keys_model, tmp_path_factory):
    model, tokenizer = keys_model
    config = needle.NeedleConfig(policies=needle.parse_policies(POLICIES, []), **GRID)
    return needle.NeedleRunner(model, tokenizer, config, tmp_path_factory.mktemp("keys")).run(progress=False)


def _accuracy(rows, policy, variant):
    mine = [r["score"] for r in rows if r["policy"] == policy and r["variant"] == variant]
    return sum(mine) / len(mine)


def test_dense_matches_keys_and_answers_none(rows):
    assert _accuracy(rows, "dense", "single") >= 0.9
    assert _accuracy(rows, "dense", "multikey") >= 0.7  # 3 distractor needles: chance is 0.25
    assert _accuracy(rows, "dense", "absent") >= 0.9


def test_query_aware_compression_keeps_keys_where_query_agnostic_loses_them(rows):
    snapkv = _accuracy(rows, POLICIES[0], "multikey")
    for agnostic in POLICIES[1:]:
        assert snapkv >= _accuracy(rows, agnostic, "multikey") + 0.4, agnostic
    assert _accuracy(rows, POLICIES[0], "single") == _accuracy(rows, "dense", "single")


def test_finds_the_needle_at_4k_and_8k(keys_model, tmp_path):
    """Served with Llama 3.1's RoPE scaling (its config), the model finds a single needle far past
    the lengths it lost it at before (0.75 at 4K, 0.375 at 8K over 40 prompts each)."""
    model, tokenizer = keys_model
    assert model.config.rope_parameters["rope_type"] == "llama3"
    config = needle.NeedleConfig(policies=needle.parse_policies([], []), lengths=[4096, 8192], depths=[0, 50],
                                 variants=["single"], samples=2)
    rows = needle.NeedleRunner(model, tokenizer, config, tmp_path).run(progress=False)
    assert len(rows) == 8 and sum(r["score"] for r in rows) >= 7
