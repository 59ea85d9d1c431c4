"""What every attention method must do when configured to compute every pair (``Method.exact()``):
give the dense model's outputs on every storage kind, at prefill, in chunked prefill, at decode and
for each row of a padded batch, and leave what the selection keeps untouched. A new method is
covered as soon as it is registered (``@register_method``)."""

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from conftest import greedy, left_pad, random_ids

import kvx
from kvx.methods import Method, method_class, method_names
from kvx.policy import MethodPolicy
from kvx.storage import STORAGE_KINDS
from kvx.tiny import tiny_model


@dataclass
class Exact(MethodPolicy):
    """The method policy that puts ``method_class(method).exact()`` under a patch."""

    name: ClassVar[str] = "exact_method"
    summary: ClassVar[str] = "a registered method at its exact setting (tests)"
    method: str = "dense"

    def make_method(self) -> Method:
        return method_class(self.method).exact()


def _composed(method: str, kind: str, selection: str = "snapkv", **options):
    parts = [kvx.make_policy(selection, **(options or {"budget": 1024, "window": 8})), Exact(method)]
    return kvx.compose(*parts, *(["ragged"] if kind == "ragged" else []))


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def test_dense_is_registered():
    assert "dense" in method_names()


@pytest.mark.parametrize("kind", sorted(STORAGE_KINDS))
@pytest.mark.parametrize("method", method_names())
@pytest.mark.parametrize("chunk_size", [None, 16])
def test_exact_method_equals_dense(model, method, kind, chunk_size):
    ids = random_ids(1, 45, seed=41)
    dense_seq, dense_logits, _ = greedy(model, ids, new_tokens=5)
    with kvx.patched(model, _composed(method, kind), chunk_size=chunk_size):
        assert type(model._kvx_state.method) is method_class(method)
        prefilled = kvx.prefill(model, ids, chunk_size=chunk_size)  # chunks: several queries over stored keys
        seq, logits, _ = greedy(model, ids, new_tokens=5)
    torch.testing.assert_close(prefilled.logits[:, -1], dense_logits[0], rtol=1e-4, atol=1e-4)
    assert torch.equal(seq, dense_seq)
    torch.testing.assert_close(logits, dense_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", sorted(STORAGE_KINDS))
@pytest.mark.parametrize("method", method_names())
def test_exact_method_keeps_the_selection_and_padded_rows_equal_rows_alone(model, method, kind):
    rows = [random_ids(1, n, seed=n)[0] for n in (48, 31)]
    ids, mask = left_pad(rows)
    options = dict(budget=12, recent=4, decode_interval=2)
    with kvx.patched(model, kvx.compose(kvx.make_policy("h2o", **options), *(["ragged"] if kind == "ragged" else []))):
        plain_seq, plain_logits, plain_cache = greedy(model, ids, mask, new_tokens=4)
    with kvx.patched(model, _composed(method, kind, "h2o", **options)):
        seq, logits, cache = greedy(model, ids, mask, new_tokens=4)
        alone = [greedy(model, row[None], new_tokens=4) for row in rows]
    assert torch.equal(seq, plain_seq)
    torch.testing.assert_close(logits, plain_logits, rtol=1e-4, atol=1e-4)
    assert [(s["kept_min"], s["kept_max"]) for s in cache.stats()] == [
        (s["kept_min"], s["kept_max"]) for s in plain_cache.stats()]
    for i, (row_seq, row_logits, _) in enumerate(alone):
        assert torch.equal(seq[i, -4:], row_seq[0, -4:])
        torch.testing.assert_close(logits[:, i], row_logits[:, 0], rtol=1e-4, atol=1e-4)
