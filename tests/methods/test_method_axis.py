"""The method axis: a method policy composed with a selection computes attention for every
patched layer, through the storage, and changes nothing the selection keeps."""

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from conftest import greedy, random_ids

import kvx
from kvx.methods import Dense, Method
from kvx.policy import MethodPolicy
from kvx.tiny import tiny_model


class CountingDense(Method):
    """Dense attention that counts its calls by number of new queries."""

    name: ClassVar[str] = "counting_dense"
    summary: ClassVar[str] = "dense, counted (tests)"

    def __init__(self):
        self.calls: dict[int, int] = {}

    def attend(self, storage, query, key, value, mask, scaling, softcap, sinks):
        self.calls[query.shape[-2]] = self.calls.get(query.shape[-2], 0) + 1
        return storage.attend(query, key, value, mask, scaling, softcap, sinks)


@dataclass
class CountingPolicy(MethodPolicy):
    name: ClassVar[str] = "counting"
    summary: ClassVar[str] = "a method policy for tests"

    def __post_init__(self):
        self.method = CountingDense()

    def make_method(self) -> Method:
        return self.method


@pytest.mark.parametrize("storage", [None, "ragged"])
def test_a_composed_method_computes_every_layer_and_keeps_the_selection(storage):
    model = tiny_model("llama")
    ids = random_ids(1, 50, seed=31)
    selection = dict(budget=16, window=4)
    with kvx.patched(model, "snapkv", **selection):
        expected_seq, expected_logits, _ = greedy(model, ids, new_tokens=4)
    counting = CountingPolicy()
    parts = [kvx.make_policy("snapkv", **selection), counting] + ([storage] if storage else [])
    with kvx.patched(model, kvx.compose(*parts)) as policy:
        seq, logits, cache = greedy(model, ids, new_tokens=4)
    assert policy.name == "snapkv" + ("+ragged" if storage else "") + "+counting"  # axis order
    assert torch.equal(seq, expected_seq)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    layers = model.config.num_hidden_layers
    assert counting.method.calls == {50: layers, 1: 3 * layers}  # the prompt, then three decode steps
    assert {s["stored"] for s in cache.stats()} == {16 + 3}


def test_dense_is_the_method_unless_a_policy_brings_one():
    model = tiny_model("llama")
    with kvx.patched(model, "snapkv"):
        assert isinstance(model._kvx_state.method, Dense)
    with pytest.raises(ValueError, match="counting and counting both answer the method axis"):
        kvx.compose(CountingPolicy(), CountingPolicy())
