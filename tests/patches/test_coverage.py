"""Every causal-LM model type of the installed transformers: verified (keep-everything equivalence
for SnapKV and StreamingLLM, and evicting runs that stay bounded), refused with a reason, or not
buildable tiny here. Anything else fails, above all a silently different output.

``make test`` checks a fast subset (the architectures kvx is most used on, plus a hybrid, an MLA
and an attention-sink model, and a decoder-only OPT); ``make coverage`` (``KVX_COVERAGE=all``)
checks every type and prints the counts.
"""

import os

import pytest
from conftest import COVERAGE_FAST

from kvx.compat import causal_lm_model_types
from kvx.patches import coverage


def _has_linear_attention_cache_layers() -> bool:
    """Whether this transformers release keeps hybrid models' linear-attention state in a cache layer
    of its own (5.9 on); before, those models use cache classes of their own, which kvx refuses."""
    from kvx.compat import default_cache_layers, is_dense_layer
    from kvx.tiny_zoo import tiny_config

    config = tiny_config("qwen3_next")
    kinds = dict(zip(config.layer_types, default_cache_layers(config)))
    return not is_dense_layer(kinds["linear_attention"])


@pytest.mark.parametrize("model_type", sorted(COVERAGE_FAST))
def test_fast_subset(model_type):
    if model_type not in causal_lm_model_types():
        pytest.skip(f"{model_type} is not in this transformers release")
    outcome = coverage.check_model_type(model_type)
    if model_type == "qwen3_next" and not _has_linear_attention_cache_layers():
        assert outcome.status == coverage.REFUSED and "has no cache layer for its 'linear_attention'" in outcome.reason
        return
    assert outcome.status == COVERAGE_FAST[model_type], outcome.reason
    if outcome.status == coverage.REFUSED:
        assert "kvx does not support model_type" in outcome.reason


def test_a_model_whose_layers_are_all_sliding_is_also_verified_compressing():
    """Mistral's tiny default config has a sliding window on every layer, which kvx leaves to the
    model: the check also runs it with the window removed, where kvx compresses every layer."""
    outcome = coverage.check_model_type("mistral")
    assert outcome.status == coverage.VERIFIED
    assert outcome.notes == ["no layer to compress: every attention layer has the model's own sliding window",
                             "with its windows removed: verified, compressing every attention layer"]


@pytest.mark.skipif(os.environ.get("KVX_COVERAGE") != "all", reason="the full sweep runs with KVX_COVERAGE=all")
def test_every_causal_lm_model_type():
    outcomes = coverage.check_all(progress=False)
    counts = coverage.summary(outcomes)
    print("\n" + coverage.format_table(outcomes))
    print(f"\ncounts: {counts}")
    failed = [o for o in outcomes if o.status == coverage.FAILED]
    assert not failed, "\n".join(f"{o.model_type}: {o.reason}" for o in failed)
    assert counts[coverage.VERIFIED] >= 125
    for outcome in outcomes:
        if outcome.status in (coverage.REFUSED, coverage.NOT_BUILT):
            assert outcome.reason, outcome.model_type
