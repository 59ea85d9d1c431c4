"""What every attention method must do when configured to compute every pair (``Method.exact()``):
give what dense attention gives on every storage policy (the dense model's outputs on lossless
storage), at prefill, in chunked prefill, at decode and for each row of a padded batch, and leave
what the selection keeps untouched. A new method is covered as soon as it is registered
(``@register_method``), a new storage policy as soon as it is registered."""

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from conftest import COVERAGE_FAST, greedy, left_pad, random_ids, storage_specs

import kvx
from kvx.compose import from_spec
from kvx.methods import Method, method_class, method_names
from kvx.patches import coverage
from kvx.policy import MethodPolicy
from kvx.tiny import tiny_model


@dataclass
class Exact(MethodPolicy):
    """The method policy that puts ``method_class(method).exact()`` under a patch."""

    name: ClassVar[str] = "exact_method"
    summary: ClassVar[str] = "a registered method at its exact setting (tests)"
    method: str = "dense"

    def make_method(self) -> Method:
        return method_class(self.method).exact()


def _composed(spec: str, selection: str = "snapkv", method: str | None = None, **options):
    """``selection`` (full budget unless ``options``) on storage ``spec``, with ``method`` at its exact
    setting (None: no method policy, so dense attention)."""
    parts = [kvx.make_policy(selection, **(options or {"budget": 1024, "window": 8}))]
    parts += [] if spec == "dense" else [from_spec(spec)]
    parts += [] if method is None else [Exact(method)]
    return kvx.compose(*parts)


SPECS = storage_specs()


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def test_dense_is_registered():
    assert "dense" in method_names()


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("method", method_names())
@pytest.mark.parametrize("chunk_size", [None, 16])
def test_exact_method_equals_dense_attention(model, method, spec, chunk_size):
    ids = random_ids(1, 45, seed=41)
    with kvx.patched(model, _composed(spec), chunk_size=chunk_size):
        expected_prefill = kvx.prefill(model, ids, chunk_size=chunk_size)
        expected_seq, expected_logits, _ = greedy(model, ids, new_tokens=5)
    with kvx.patched(model, _composed(spec, method=method), chunk_size=chunk_size):
        assert type(model._kvx_state.method) is method_class(method)
        prefilled = kvx.prefill(model, ids, chunk_size=chunk_size)  # chunks: several queries over stored keys
        seq, logits, _ = greedy(model, ids, new_tokens=5)
    torch.testing.assert_close(prefilled.logits, expected_prefill.logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(seq, expected_seq)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("method", method_names())
def test_exact_method_keeps_the_selection_and_padded_rows_equal_rows_alone(model, method, spec):
    rows = [random_ids(1, n, seed=n)[0] for n in (48, 31)]
    ids, mask = left_pad(rows)
    options = dict(budget=12, recent=4, decode_interval=2)
    with kvx.patched(model, _composed(spec, "h2o", **options)):
        plain_seq, plain_logits, plain_cache = greedy(model, ids, mask, new_tokens=4)
    with kvx.patched(model, _composed(spec, "h2o", method, **options)):
        seq, logits, cache = greedy(model, ids, mask, new_tokens=4)
        alone = [greedy(model, row[None], new_tokens=4) for row in rows]
    assert torch.equal(seq, plain_seq)
    torch.testing.assert_close(logits, plain_logits, rtol=1e-4, atol=1e-4)
    assert [(s["kept_min"], s["kept_max"]) for s in cache.stats()] == [
        (s["kept_min"], s["kept_max"]) for s in plain_cache.stats()]
    for i, (row_seq, row_logits, _) in enumerate(alone):
        assert torch.equal(seq[i, -4:], row_seq[0, -4:])
        torch.testing.assert_close(logits[:, i], row_logits[:, 0], rtol=1e-4, atol=1e-4)


ARCHITECTURES = sorted(t for t, outcome in COVERAGE_FAST.items()
                       if outcome == coverage.VERIFIED and t not in ("llama", "qwen3_next"))
"""Verified architectures of the coverage check's fast subset, beyond llama (the fixture above) and
qwen3_next (verified only on releases with linear-attention cache layers): softcapping (gemma2),
sliding-window layers mixed with full ones (gemma3_text), attention sinks (gpt_oss), a decoder
called directly (opt)."""


@pytest.mark.parametrize("model_type", ARCHITECTURES)
@pytest.mark.parametrize("method", [m for m in method_names() if m != "dense"])
def test_exact_method_equals_the_dense_model_on_verified_architectures(model_type, method):
    """Every method at its exact setting gives the unpatched model's outputs, prefill in chunks and
    decode, on each verified architecture of the fast subset (lossless storage, nothing evicted)."""
    from kvx.compat import causal_lm_model_types
    from kvx.tiny_zoo import tiny_model as zoo_model

    if model_type not in causal_lm_model_types():
        pytest.skip(f"{model_type} is not in this transformers release")
    model = zoo_model(model_type, windows=False)  # no sliding windows: the method runs on every layer
    ids = random_ids(1, 40, seed=43, vocab=min(128, model.config.vocab_size))
    expected_seq, expected_logits, _ = greedy(model, ids, new_tokens=4)
    with kvx.patched(model, kvx.compose(Exact(method)), chunk_size=16):
        seq, logits, cache = greedy(model, ids, new_tokens=4)
    counted = [layer.attention_blocks or layer.decode_keys for layer in cache.layers if hasattr(layer, "decode_keys")]
    assert any(counted), "the method ran (it counted what it computed)"
    assert torch.equal(seq, expected_seq)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)
