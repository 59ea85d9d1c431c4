"""kvx's shipped needle model: loads like any model, retrieves the needle dense, and SnapKV with a
budget that keeps the needle's neighbourhood scores as dense (StreamingLLM, which drops it, does not)."""

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvx.eval import needle

GRID = dict(lengths=[1024], depths=[0, 25, 50, 75, 100], variants=["single"], samples=2)


@pytest.fixture(scope="module")
def shipped():
    model = AutoModelForCausalLM.from_pretrained(needle.DEFAULT_MODEL).eval()
    tokenizer = AutoTokenizer.from_pretrained(needle.DEFAULT_MODEL)
    return model, tokenizer


def test_loads_like_any_model(shipped):
    model, tokenizer = shipped
    assert model.config.model_type == "llama" and model.config.num_key_value_heads < model.config.num_attention_heads
    assert (needle.DEFAULT_MODEL / "model.safetensors").stat().st_size < 20 * 2**20
    assert tokenizer("There were 12 birds .", add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def rows(shipped, tmp_path_factory):
    model, tokenizer = shipped
    policies = needle.parse_policies(["snapkv:budget=256,window=32", "streaming_llm:sink=4,window=252"], [])
    config = needle.NeedleConfig(policies=policies, **GRID)
    return needle.NeedleRunner(model, tokenizer, config, tmp_path_factory.mktemp("shipped")).run(progress=False)


def _accuracy(rows, policy):
    mine = [r["score"] for r in rows if r["policy"] == policy]
    return sum(mine) / len(mine)


def test_dense_scores_at_least_95_percent_at_1k(rows):
    assert _accuracy(rows, "dense") >= 0.95


def test_snapkv_keeping_the_needle_scores_as_dense(rows):
    assert _accuracy(rows, "snapkv:budget=256,window=32") == _accuracy(rows, "dense")
    snap = [r for r in rows if r["policy"].startswith("snapkv")]
    dense = [r for r in rows if r["policy"] == "dense"]
    assert all(s["kv_bytes"] < d["kv_bytes"] / 3 for s, d in zip(snap, dense))


def test_streaming_llm_loses_needles_it_evicts(rows):
    """A policy that drops the needle's tokens fails visibly: the accuracy tests mean something."""
    lost = [r for r in rows if r["policy"].startswith("streaming") and 0 < r["depth"] < 100]
    assert sum(r["score"] for r in lost) / len(lost) < 0.5
