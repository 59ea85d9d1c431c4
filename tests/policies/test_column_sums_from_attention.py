"""H2O's column sums come from the attention pass on CPU (one pass over the logits instead of two),
and a run that takes them from there keeps exactly what a run that computes them again keeps."""

import pytest
import torch
from conftest import greedy, left_pad, random_ids

import kvx
from kvx.compose import from_spec
from kvx.policies import h2o
from kvx.policy import Policy

SPECS = ["h2o:budget=24,recent=4,decode_interval=3", "pyramidkv:budget=24,window=4,scorer=h2o"]  # dense storage


def run(model, spec: str, ids, mask, chunk_size):
    with kvx.patched(model, from_spec(spec), chunk_size=chunk_size):
        seq, logits, cache = greedy(model, ids, mask, new_tokens=6)
        kept = [layer.kept_per_head().clone() for layer in cache.layers]
    return seq, logits, kept


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("padded", [False, True], ids=["one-row", "left-padded-batch"])
def test_sums_from_the_attention_pass_keep_what_a_second_pass_keeps(llama, spec, padded, monkeypatch):
    if padded:
        ids, mask = left_pad([random_ids(1, 70, seed=3)[0], random_ids(1, 51, seed=4)[0]])
    else:
        ids, mask = random_ids(1, 70, seed=3), None
    computed_by_policy = []
    real_sums = h2o.attention_column_sums
    monkeypatch.setattr(h2o, "attention_column_sums", lambda q, *a: computed_by_policy.append(q.shape[-2]) or real_sums(q, *a))
    joint = run(llama, spec, ids, mask, chunk_size=16)
    assert not computed_by_policy, "prefill, chunks and decode steps all take the attention pass's sums"
    monkeypatch.setattr(h2o.H2O, "reads_column_sums", Policy.reads_column_sums)
    computed_by_policy.clear()
    separate = run(llama, spec, ids, mask, chunk_size=16)
    assert any(n > 1 for n in computed_by_policy) and 1 in computed_by_policy, "the second run computes them itself"
    assert torch.equal(joint[0], separate[0])
    torch.testing.assert_close(joint[1], separate[1], rtol=1e-4, atol=1e-4)
    for a, b in zip(joint[2], separate[2]):
        assert torch.equal(a, b)
