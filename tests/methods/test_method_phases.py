"""A prefill method and a decode method composed (``vertical_slash+quest``): the composition names
itself in a canonical order, each method acts in its own phase alone (the prefill method on calls
with several new queries, the decode method on one-query steps), at their exact settings the pair
gives the dense model's outputs, below them ``cache.stats()`` reports both the blocks and the decode
keys really computed, and two methods serving one phase are refused by name."""

from typing import ClassVar

import pytest
import torch
from conftest import greedy, left_pad, random_ids

import kvx
import kvx.methods.block_sparse as block_sparse_module
import kvx.methods.quest as quest_module
from kvx.compose import from_spec
from kvx.eval.lm_eval_bridge import object_label
from kvx.methods import Method, method_class, register_method
from kvx.methods.by_phase import ByPhase
from kvx.tiny import tiny_model

PREFILL = "vertical_slash:density=0.3,min_length=0,block_size=16,last_queries=16"
DECODE = "quest:budget=48,page_size=8,sink=8,recent=8,dense_layers=0"


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture
def phases_seen(monkeypatch):
    """The query counts each part's sparse op ran on: ``{"prefill": [...], "decode": [...]}``."""
    seen = {"prefill": [], "decode": []}
    for module, name, phase in ((block_sparse_module, "block_sparse_attention", "prefill"),
                                (quest_module, "attend_tokens", "decode")):
        real = getattr(module, name)

        def spy(query, *args, _real=real, _phase=phase, **kwargs):
            seen[_phase].append(query.shape[-2])
            return _real(query, *args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    return seen


def test_builds_and_names_itself_prefill_first(model):
    for policy in (kvx.compose("vertical_slash", "quest"), kvx.compose("quest", "vertical_slash"),
                   from_spec("quest:budget=64+vertical_slash:density=0.2+kivi:bits=4")):
        assert policy.axes()["method"] == "vertical_slash+quest"
        assert [part.name for part in policy.parts if part.axis == "method"] == ["vertical_slash", "quest"]
    assert policy.name == "kivi+vertical_slash+quest"
    assert from_spec(object_label(policy)).describe() == policy.describe()  # results files read back
    with kvx.patched(model, from_spec(f"{PREFILL}+{DECODE}")):
        method = model._kvx_state.method
        assert isinstance(method, ByPhase)
        assert (method.prefill.name, method.decode.name) == ("vertical_slash", "quest")


@pytest.mark.parametrize("prefill,decode", [("vertical_slash", "quest"), ("a_shape", "tidal")])
@pytest.mark.parametrize("chunk_size", [None, 16])
def test_exact_parts_give_the_dense_model(model, prefill, decode, chunk_size):
    ids, mask = left_pad([random_ids(1, n, seed=n)[0] for n in (45, 30)])
    dense_seq, dense_logits, _ = greedy(model, ids, mask, new_tokens=4)
    policy = kvx.compose(method_class(prefill).exact(), method_class(decode).exact())
    with kvx.patched(model, policy, chunk_size=chunk_size):
        seq, logits, cache = greedy(model, ids, mask, new_tokens=4)
    assert torch.equal(seq, dense_seq)
    torch.testing.assert_close(logits, dense_logits, rtol=1e-5, atol=1e-5)
    for stats in cache.stats():  # each part counted its own phase, every pair computed
        assert stats["blocks_computed"] == stats["blocks_causal"] > 0
        assert stats["decode_keys_read"] == stats["decode_keys_total"] > 0


def test_each_part_acts_in_its_phase_alone_and_both_are_counted(model, phases_seen):
    ids = random_ids(1, 300, seed=5)
    with kvx.patched(model, from_spec(PREFILL)):
        _, prefill_logits, prefill_cache = greedy(model, ids, new_tokens=3)
    with kvx.patched(model, from_spec(DECODE)):
        _, _, decode_cache = greedy(model, ids, new_tokens=3)
    phases_seen["prefill"].clear()
    phases_seen["decode"].clear()
    with kvx.patched(model, from_spec(f"{PREFILL}+{DECODE}")):
        _, logits, cache = greedy(model, ids, new_tokens=3)
    layers = model.config.num_hidden_layers
    assert phases_seen == {"prefill": [300] * layers, "decode": [1] * 2 * layers}  # the first token is the prompt's
    torch.testing.assert_close(logits[0], prefill_logits[0], rtol=0, atol=0)  # the prompt: vertical_slash's alone
    assert (logits[1:] - prefill_logits[1:]).abs().max() > 1e-4  # decode: quest's, not vertical_slash's dense
    for stats, alone_prefill, alone_decode in zip(cache.stats(), prefill_cache.stats(), decode_cache.stats()):
        assert 0 < stats["blocks_computed"] < stats["blocks_causal"]
        assert 0 < stats["decode_keys_read"] < stats["decode_keys_total"]
        assert (stats["blocks_computed"], stats["blocks_causal"]) == (
            alone_prefill["blocks_computed"], alone_prefill["blocks_causal"])
        assert (stats["decode_keys_read"], stats["decode_keys_total"]) == (
            alone_decode["decode_keys_read"], alone_decode["decode_keys_total"])


@pytest.mark.parametrize("spec,first,second,phase", [
    ("vertical_slash+block_topk", "vertical_slash", "block_topk", "prefill"),
    ("a_shape:local=4+head_patterns", "a_shape", "head_patterns", "prefill"),
    ("quest+tidal", "quest", "tidal", "decode"),
    ("vertical_slash+quest+quest:budget=64", "quest", "quest", "decode"),
])
def test_two_methods_for_one_phase_are_refused_by_name(spec, first, second, phase):
    with pytest.raises(ValueError, match=(
            rf"kvx.compose: {first} and {second} both answer the method axis at {phase} .*compose at most one "
            r"prefill method \(a_shape, block_topk, head_patterns, vertical_slash\) with one decode method "
            r"\(quest, tidal\)")):
        from_spec(spec)


def test_tidal_keeps_its_checks_beside_a_prefill_method():
    with pytest.raises(ValueError, match=r"kvx.compose: tidal cannot compose with snapkv"):
        from_spec("vertical_slash+tidal+snapkv:budget=64")
    assert from_spec("vertical_slash+tidal+kivi:bits=4").axes() == {
        "selection": "dense", "storage": "kivi", "method": "vertical_slash+tidal"}


def test_a_method_must_say_a_known_phase():
    class Both(Method):
        name: ClassVar[str] = "both_phases"
        summary: ClassVar[str] = "a bad method (tests)"
        serves: ClassVar[str] = "both"

    with pytest.raises(ValueError, match=r"method 'both_phases' serves 'both'; choose one of prefill, decode, all"):
        register_method(Both)
