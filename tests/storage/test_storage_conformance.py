"""What every storage kind must do, whatever its layout: a budget that keeps everything gives the
dense model's outputs, its key/value bytes are those of the tokens it keeps, a row in a padded
batch gets what it gets alone, and beam search re-orders it like dense storage. A new kind is
covered as soon as it is in ``kvx.storage.STORAGE_KINDS`` with a storage policy that names it."""

import pytest
import torch
from conftest import greedy, left_pad, random_ids

import kvx
from kvx.policy import StoragePolicy, list_policies, make_policy
from kvx.storage import STORAGE_KINDS
from kvx.tiny import tiny_model


def _storage_policies() -> dict[str, str]:
    """Storage kind -> the registered storage policy that selects it."""
    found = {}
    for entry in list_policies():
        policy = make_policy(entry["name"])
        if isinstance(policy, StoragePolicy):
            found[policy.storage] = entry["name"]
    return found


def _on(kind: str, selection: str, **options):
    """``selection`` with ``options``, stored in ``kind``."""
    policy = make_policy(selection, **options)
    return policy if kind == "dense" else kvx.compose(policy, _storage_policies()[kind])


def test_every_kind_but_dense_has_a_storage_policy():
    assert set(_storage_policies()) | {"dense"} == set(STORAGE_KINDS)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.mark.parametrize("kind", sorted(STORAGE_KINDS))
def test_full_budget_equals_dense(model, kind):
    ids = random_ids(1, 40, seed=21)
    dense_seq, dense_logits, _ = greedy(model, ids)
    with kvx.patched(model, _on(kind, "snapkv", budget=1024, window=8)):
        seq, logits, cache = greedy(model, ids)
    assert torch.equal(seq, dense_seq)
    torch.testing.assert_close(logits, dense_logits, rtol=1e-4, atol=1e-4)
    assert {s["kind"] for s in cache.stats()} == {STORAGE_KINDS[kind].kind}


@pytest.mark.parametrize("kind", sorted(STORAGE_KINDS))
def test_kv_bytes_are_the_kept_tokens(model, kind):
    ids = random_ids(1, 60, seed=22)
    with kvx.patched(model, _on(kind, "snapkv", budget=16, window=4)):
        _, _, cache = greedy(model, ids, new_tokens=3)
    config = model.config
    per_token = 2 * config.head_dim * 4  # a key and a value, fp32
    for layer in cache.stats():
        assert layer["kept_min"] == layer["kept_max"] == 16 + 2  # the budget, then two decoded tokens appended
        assert layer["kv_bytes"] == config.num_key_value_heads * layer["kept_max"] * per_token
        assert layer["nbytes"] >= layer["kv_bytes"]


@pytest.mark.parametrize("kind", sorted(STORAGE_KINDS))
def test_a_row_in_a_padded_batch_equals_the_row_alone(model, kind):
    rows = [random_ids(1, n, seed=n)[0] for n in (50, 29)]
    ids, mask = left_pad(rows)
    policy = _on(kind, "h2o", budget=12, recent=4, decode_interval=2)
    with kvx.patched(model, policy):  # (chunks would split a padded row elsewhere than the row alone)
        batch_seq, batch_logits, _ = greedy(model, ids, mask, new_tokens=5)
        for i, row in enumerate(rows):
            alone_seq, alone_logits, _ = greedy(model, row[None], new_tokens=5)
            assert torch.equal(batch_seq[i, -5:], alone_seq[0, -5:])
            torch.testing.assert_close(batch_logits[:, i], alone_logits[:, 0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", sorted(STORAGE_KINDS))
def test_beam_search_reorders_it_like_dense_storage(model, kind):
    ids = random_ids(2, 30, seed=23)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=0,
                  num_beams=3, num_return_sequences=2)
    with kvx.patched(model, "snapkv", budget=10, window=2):
        dense = model.generate(ids, **kwargs)
    with kvx.patched(model, _on(kind, "snapkv", budget=10, window=2)):
        assert torch.equal(model.generate(ids, **kwargs), dense)
