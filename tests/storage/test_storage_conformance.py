"""What every storage kind must do, whatever its layout. Run on dense storage and on every
registered storage policy (a new one is covered as soon as it is registered):

- it attends over exactly what it stores: each decode and extend step's output is attention over
  the storage's own scoring view;
- a lossless kind with a budget that keeps everything gives the dense model's outputs, and beam
  search re-orders it like dense storage; a lossy kind (quantized) stays close to them;
- its key/value bytes are those of the tokens it keeps (lossless), or fewer (lossy);
- a row in a padded batch gets what it gets alone.

Storage that takes its decisions from one selection only (mixed precision, from ``mikv``) runs the
first check with that selection (``WITH_THEIR_SELECTION``) and has its own tests for the rest.
"""

import pytest
import torch
from conftest import greedy, left_pad, on_storage, random_ids, storage_specs

import kvx
from kvx.compose import from_spec
from kvx.storage import STORAGE_KINDS, make_layer
from kvx.tiny import tiny_model

SPECS = storage_specs()
LOSSLESS = [spec for spec in SPECS if spec == "dense" or not getattr(from_spec(spec), "lossy", False)]
LOSSY = [spec for spec in SPECS if spec not in LOSSLESS]


def test_every_storage_kind_is_reached_by_a_policy():
    kinds = {"dense"} | {from_spec(spec).storage for spec in storage_specs(under_any_selection=False)[1:]}
    assert kinds == set(STORAGE_KINDS) and LOSSY  # (quantized storage is lossy)
    assert "mixed" not in {from_spec(spec).storage for spec in SPECS[1:]}  # it needs mikv: tests/storage/test_mixed.py


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


WITH_THEIR_SELECTION = [("mixed:group=8,window=4", "mikv:budget=24,window=4,decode_interval=3")]
"""Storage that needs a particular selection, with it (the rest run under h2o)."""


@pytest.mark.parametrize("spec,selection", [(spec, "h2o:budget=24,recent=4,decode_interval=3") for spec in SPECS]
                         + WITH_THEIR_SELECTION)
def test_it_attends_over_exactly_what_it_stores(model, spec, selection, monkeypatch):
    """Every patched attention call's output equals reference attention over the layer's scoring
    view after the call's new tokens were added (prefill, chunked extend, decode with evictions)."""
    from kvx.kernels import reference

    checked = []

    def check(storage, out, query, mask, scaling, softcap, column_sums=None):
        """Before the selection evicts: the output over the scoring view, and the sums handed over."""
        inputs = storage.scoring_inputs(query, mask)
        visible = inputs.valid[:, :, None, :].repeat_interleave(query.shape[1] // inputs.valid.shape[1], 1)
        q_len, stored = query.shape[-2], inputs.keys.shape[-2]
        causal = torch.ones(q_len, stored, dtype=torch.bool).tril(stored - q_len)
        expected = reference.attention(query, inputs.keys, inputs.values, visible & causal, scaling, softcap)
        checked.append((out, expected))
        if column_sums is not None:  # what the attention pass handed the policy (h2o on dense storage)
            sums = reference.attention_column_sums(query, inputs.keys, inputs.valid, scaling, softcap)
            checked.append((column_sums, sums))

    method_attend = kvx.methods.Dense.attend
    method_attend_with_sums = kvx.methods.Dense.attend_with_column_sums

    def recording(self, storage, query, key, value, mask, scaling, softcap, sinks):
        out = method_attend(self, storage, query, key, value, mask, scaling, softcap, sinks)
        check(storage, out, query, mask, scaling, softcap)
        return out

    def recording_with_sums(self, storage, query, key, value, mask, scaling, softcap):
        out, sums = method_attend_with_sums(self, storage, query, key, value, mask, scaling, softcap)
        check(storage, out, query, mask, scaling, softcap, sums)
        return out, sums

    monkeypatch.setattr(kvx.methods.Dense, "attend", recording)
    monkeypatch.setattr(kvx.methods.Dense, "attend_with_column_sums", recording_with_sums)
    policy = from_spec(selection if spec == "dense" else f"{selection}+{spec}")
    with kvx.patched(model, policy, chunk_size=16):
        greedy(model, random_ids(1, 60, seed=20), new_tokens=12)
    assert len(checked) > 20
    for out, expected in checked:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", LOSSLESS)
def test_full_budget_equals_dense(model, spec):
    ids = random_ids(1, 40, seed=21)
    dense_seq, dense_logits, _ = greedy(model, ids)
    with kvx.patched(model, on_storage(spec, "snapkv", budget=1024, window=8)):
        seq, logits, cache = greedy(model, ids)
    assert torch.equal(seq, dense_seq)
    torch.testing.assert_close(logits, dense_logits, rtol=1e-4, atol=1e-4)
    kind = "dense" if spec == "dense" else from_spec(spec).storage
    assert {s["kind"] for s in cache.stats()} == {STORAGE_KINDS[kind].kind}


@pytest.mark.parametrize("spec", LOSSY)
def test_a_lossy_kind_stays_close_to_dense(model, spec):
    ids = random_ids(1, 64, seed=21)
    _, dense_logits, _ = greedy(model, ids)
    with kvx.patched(model, on_storage(spec, "snapkv", budget=1024, window=8)):
        _, logits, cache = greedy(model, ids)
    assert float((logits - dense_logits).abs().max()) < 0.1 * float(dense_logits.abs().max())
    assert {s["kind"] for s in cache.stats()} == {make_layer(from_spec(spec)).kind}


@pytest.mark.parametrize("spec", SPECS)
def test_kv_bytes_are_the_kept_tokens(model, spec):
    ids = random_ids(1, 60, seed=22)
    with kvx.patched(model, on_storage(spec, "snapkv", budget=16, window=4)):
        _, _, cache = greedy(model, ids, new_tokens=3)
    config = model.config
    per_token = 2 * config.head_dim * 4  # a key and a value, fp32
    for layer in cache.stats():
        assert layer["kept_min"] == layer["kept_max"] == 16 + 2  # the budget, then two decoded tokens appended
        full = config.num_key_value_heads * layer["kept_max"] * per_token
        assert layer["kv_bytes"] == full if spec in LOSSLESS else layer["kv_bytes"] < full
        assert layer["nbytes"] >= layer["kv_bytes"]


@pytest.mark.parametrize("spec", SPECS)
def test_a_row_in_a_padded_batch_equals_the_row_alone(model, spec):
    rows = [random_ids(1, n, seed=n)[0] for n in (50, 29)]
    ids, mask = left_pad(rows)
    policy = on_storage(spec, "h2o", budget=12, recent=4, decode_interval=2)
    with kvx.patched(model, policy):  # (chunks would split a padded row elsewhere than the row alone)
        batch_seq, batch_logits, _ = greedy(model, ids, mask, new_tokens=5)
        for i, row in enumerate(rows):
            alone_seq, alone_logits, _ = greedy(model, row[None], new_tokens=5)
            assert torch.equal(batch_seq[i, -5:], alone_seq[0, -5:])
            torch.testing.assert_close(batch_logits[:, i], alone_logits[:, 0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spec", SPECS)
def test_beam_search_reorders_it(model, spec):
    """Beams over a lossless kind are those over dense storage; over a lossy kind, those of the
    same kind where every row is its own batch (so a wrong re-order would show)."""
    ids = random_ids(2, 30, seed=23)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=0,
                  num_beams=3, num_return_sequences=2)
    reference_spec = "dense" if spec in LOSSLESS else spec
    with kvx.patched(model, on_storage(reference_spec, "snapkv", budget=10, window=2)):
        expected = torch.cat([model.generate(ids[i : i + 1], **{**kwargs, "attention_mask": torch.ones_like(ids[:1])})
                              for i in range(2)])
    with kvx.patched(model, on_storage(spec, "snapkv", budget=10, window=2)):
        assert torch.equal(model.generate(ids, **kwargs), expected)
