"""``Policy.wants_view``: where a policy says it will not read the view, kvx skips building it,
so the promise must hold (``select_mask`` returns None and touches no statistics)."""

import pytest
import torch
from conftest import random_ids

import kvx
from kvx import cache_kwargs, cache_of
from kvx.policy import CompressionView, make_policy
from kvx.storage import RaggedLayer
from kvx.tiny import tiny_model

# small budgets so every policy would evict whenever it is allowed to
CONFIGS = [
    ("streaming_llm", {"sink": 2, "window": 4}),
    ("snapkv", {"budget": 6, "window": 2}),
    ("snapkv", {"budget": 6, "window": 2, "decode_interval": 1}),
    ("h2o", {"budget": 6, "recent": 2}),
    ("h2o", {"budget": 6, "recent": 2, "decode_interval": 0}),
    ("tova", {"budget": 6}),
    ("keyformer", {"budget": 6, "recent": 2, "window": 2}),
    ("knorm", {"budget": 6, "recent": 2}),
    ("pyramidkv", {"budget": 6, "window": 2}),
    ("pyramidkv", {"budget": 6, "window": 2, "scorer": "h2o"}),
    ("head_budget", {"budget": 6, "window": 2}),
    ("head_budget", {"budget": 6, "window": 2, "scorer": "keyformer"}),
]


def _view(phase: str) -> CompressionView:
    g = torch.Generator().manual_seed(7)
    q_len = 1 if phase == "decode" else 5
    return CompressionView(
        query=torch.randn(1, 4, q_len, 8, generator=g),
        keys=torch.randn(1, 2, 20, 8, generator=g),
        values=torch.randn(1, 2, 20, 8, generator=g),
        valid=torch.ones(1, 2, 20, dtype=torch.bool),
        attention_mask=None,
        phase=phase,
        layer_idx=0,
        scaling=8**-0.5,
        num_seen=20,
        num_layers=2,
    )


@pytest.mark.parametrize("name,options", CONFIGS, ids=lambda c: str(c))
@pytest.mark.parametrize("phase", ["prefill", "extend", "decode"])
def test_a_policy_that_declines_the_view_would_not_have_used_it(name, options, phase):
    policy = make_policy(name, **options)
    view = _view(phase)
    if policy.wants_view(phase):
        return  # nothing promised
    assert policy.select_mask(view) is None
    assert view.state == {}


def test_every_policy_declines_somewhere_or_observes():
    # the configurations above exercise both answers, so the promise is actually tested
    answers = {make_policy(n, **o).wants_view("decode") for n, o in CONFIGS}
    assert answers == {True, False}


def test_ragged_decode_skips_the_dense_view_unless_the_policy_needs_it(monkeypatch):
    calls = []
    original = RaggedLayer.dense_view

    def counting(self):
        calls.append(self)
        return original(self)

    monkeypatch.setattr(RaggedLayer, "dense_view", counting)
    model = tiny_model("llama")
    ids = random_ids(1, 40, seed=3)
    for options, decode_views in (({"decode_interval": 0}, 0), ({"decode_interval": 2}, 2 * 4)):
        # one view per layer and step where the policy may compress; a compression reuses it
        with kvx.patched(model, "head_budget", budget=8, window=2, **options), torch.inference_mode():
            cache = cache_of(model(ids, use_cache=True))
            calls.clear()
            token = ids[:, -1:]
            for _ in range(4):
                token = model(token, **cache_kwargs(cache), use_cache=True).logits[:, -1:].argmax(-1)
        assert len(calls) == decode_views  # 2 layers x 4 steps when compressing while decoding


def test_a_custom_policy_with_its_own_trigger_still_compresses_while_decoding():
    """The default promise only covers the library's own decisions: a subclass that decides itself
    when to compress (here: in every phase) is always given the view."""
    from dataclasses import dataclass
    from typing import ClassVar

    from kvx.policy import EvictionPolicy, capacity_tensor

    @dataclass
    class NewestOnly(EvictionPolicy):
        name: ClassVar[str] = "newest_only_test"
        summary: ClassVar[str] = "test policy"
        budget: int = 8

        def capacity(self, view):
            return capacity_tensor(view, self.budget)

        def triggered(self, view, real, capacity):
            return real > capacity  # prefill, extend and decode alike

        def score(self, view):
            return torch.arange(view.num_stored, dtype=torch.float).expand(view.valid.shape)

    assert NewestOnly().wants_view("decode")
    model = tiny_model("llama")
    with kvx.patched(model, NewestOnly()), torch.inference_mode():
        out = model.generate(random_ids(1, 20, seed=5), max_new_tokens=6, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True)
    assert {s["stored"] for s in cache_of(out).stats()} == {8}
