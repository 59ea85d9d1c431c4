"""Finding the attention modules of any decoder, and refusing what kvx cannot patch, by name."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, BertConfig, BertLMHeadModel

import kvx
from kvx.api import DEFAULT_CHUNK_SIZE
from kvx.attention import kvx_attention
from kvx.patches import find_attention
from kvx.tiny import tiny_model
from kvx.tiny_zoo import tiny_model as zoo_model


def test_llama_modules_and_owner():
    model = tiny_model("llama")
    found = find_attention(model)
    assert [m.layer_idx for m in found.modules] == [0, 1]
    assert found.cache_owner is model.model and found.unmanaged == []


def test_opt_hooks_go_on_the_decoder_that_receives_the_cache():
    model = zoo_model("opt")
    assert find_attention(model).cache_owner is model.model.decoder


def test_bidirectional_bert_is_refused_with_the_fix():
    model = BertLMHeadModel(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                       intermediate_size=64, vocab_size=64))
    with pytest.raises(ValueError, match="bidirectional.*config.is_decoder=True"):
        kvx.patch(model, "snapkv")


def test_mla_is_refused_with_its_reason():
    with pytest.raises(ValueError, match="does not support model_type 'deepseek_v3': multi-head latent attention"):
        kvx.patch(zoo_model("deepseek_v3"), "snapkv")


def test_hybrid_only_models_are_refused():
    with pytest.raises(ValueError, match="none of its cache layers .* holds plain attention keys"):
        kvx.patch(zoo_model("falcon_h1"), "snapkv")


def test_hybrid_models_compress_only_their_attention_layers():
    model = zoo_model("qwen3_next")
    ids = torch.randint(3, 200, (1, 40), generator=torch.Generator().manual_seed(0))
    with kvx.patched(model, "streaming_llm", sink=2, window=6), torch.inference_mode():
        cache = kvx.cache_of(model(ids))
    kinds = [s["kind"] for s in cache.stats()]
    assert "compressed" in kinds and any(k.startswith("model(") for k in kinds)
    assert all(s["stored"] == 8 for s in cache.stats() if s["kind"] == "compressed")


def test_a_tensor_kwarg_kvx_cannot_honour_is_refused():
    model = tiny_model("llama")
    kvx.patch(model, "snapkv")
    q = torch.randn(1, 4, 3, 16)
    k = v = torch.randn(1, 2, 3, 16)
    with pytest.raises(ValueError, match="passes position_bias to its attention function, which kvx cannot honour"):
        kvx_attention(model.model.layers[0].self_attn, q, k, v, None, position_bias=torch.zeros(1, 4, 3, 3))


def test_chunked_prefill_is_off_by_default_where_generate_cannot_chunk():
    model = zoo_model("musicgen_melody")
    kvx.patch(model, "snapkv")
    assert model.generation_config.prefill_chunk_size is None
    with pytest.raises(ValueError, match="cannot prefill in chunks"):
        kvx.patch(model, "snapkv", chunk_size=DEFAULT_CHUNK_SIZE)
    llama = tiny_model("llama")
    kvx.patch(llama, "snapkv")
    assert llama.generation_config.prefill_chunk_size == DEFAULT_CHUNK_SIZE


def test_a_model_type_in_the_refused_table_names_its_reason():
    config = AutoConfig.for_model("doge", num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                  num_key_value_heads=1, intermediate_size=64, vocab_size=64)
    with pytest.raises(ValueError, match="does not support model_type 'doge': attention takes a per-head additive"):
        kvx.patch(AutoModelForCausalLM.from_config(config), "snapkv")
