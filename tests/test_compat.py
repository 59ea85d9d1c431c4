"""kvx/compat.py: the same calls work, without deprecation warnings, on every supported release."""

import warnings

import pytest
import torch
from conftest import random_ids

import kvx
from kvx import compat
from kvx.cache import SlidingWindowLayer
from kvx.storage import DenseLayer
from kvx.tiny import tiny_model


def test_installed_release_is_supported():
    assert compat.TRANSFORMERS_VERSION >= compat.MIN_VERSION
    compat.check_version()


def test_cache_kwargs_and_cache_of_round_trip(llama):
    ids = random_ids(1, 12)
    with kvx.patched(llama, "snapkv", budget=4, window=2):
        out = llama(ids)
        cache = kvx.cache_of(out)
        assert isinstance(cache, kvx.KVCache)
        again = llama(ids[:, :1], **kvx.cache_kwargs(cache))
    assert kvx.cache_of(again) is cache
    assert cache.get_seq_length() == 13


def test_the_deprecated_cache_name_still_reaches_kvx(llama):
    """A caller still writing ``past_key_values=`` (deprecated from 5.24) gets its cache used."""
    ids = random_ids(1, 12)
    with kvx.patched(llama, "snapkv", budget=4, window=2), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cache = kvx.KVCache(llama.config)
        llama(ids, past_key_values=cache)
    assert cache.get_seq_length() == 12 and {s["stored"] for s in cache.stats()} == {4}


def test_generate_output_carries_the_kvx_cache(llama):
    ids = random_ids(1, 20)
    with kvx.patched(llama, "streaming_llm", sink=2, window=6):
        out = llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                             return_dict_in_generate=True, pad_token_id=0)
    assert {s["stored"] for s in kvx.cache_of(out).stats()} == {8}


def test_default_cache_layers_follow_the_model_layer_types():
    config = tiny_model("gemma3_text").config
    layers = kvx.KVCache(config).layers
    assert [type(layer) for layer in layers] == [SlidingWindowLayer, DenseLayer]
    assert len(compat.default_cache_layers(config)) == config.num_hidden_layers


def test_cache_argument_name_reads_the_signature():
    def new(input_ids=None, cache=None): ...
    def old(input_ids=None, past_key_values=None): ...
    def none(input_ids=None): ...
    assert compat.cache_argument_name(new) == "cache"
    assert compat.cache_argument_name(old) == "past_key_values"
    assert compat.cache_argument_name(none) is None


def test_too_old_a_release_is_named(monkeypatch):
    monkeypatch.setattr(compat, "TRANSFORMERS_VERSION", compat.Version("5.2.0"))
    with pytest.raises(ImportError, match=r"kvx needs transformers>=5\.3\.0, but .* is installed"):
        compat.check_version()
