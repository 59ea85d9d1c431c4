"""Quantized storage (int8, kivi): exact bytes, bounded error, attention over itself equal to
attention over its dequantized contents, a prompt kept exact until it ends, composition with
eviction in one cache, and rows that move with beam search."""

import pytest
import torch
from conftest import greedy, left_pad, random_ids

import kvx
from kvx.compose import from_spec
from kvx.kernels import quant, reference
from kvx.storage.quantized import QuantizedLayer, QuantSpec
from kvx.tiny import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")  # head dim 16, 2 KV heads, 4 query heads, fp32


# --- the layout --------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis,group", [("token", 16), ("channel", 32)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_round_trip_error_is_within_half_a_step(bits, axis, group, symmetric):
    x = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(bits)) * 4 + 1
    packed = quant.quantize(x, bits, group, axis, symmetric)
    error = (quant.dequantize(packed) - x).abs()
    assert bool((error <= quant.error_bound(x, bits, group, axis, symmetric)).all())
    levels = 2**bits - 1
    step = (x.amax() - x.amin()) / levels
    assert float(error.max()) <= float(step) * (1 if symmetric else 0.51)  # a real bound, not a vacuous one


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_packing_wastes_nothing(bits):
    x = torch.randn(1, 2, 64, 128)
    for axis, symmetric in [("token", False), ("channel", False), ("token", True)]:
        packed = quant.quantize(x, bits, 32, axis, symmetric)
        per_element = sum(t.numel() * t.element_size() for t in packed.tensors()) / x.numel()
        assert per_element == bits / 8 + (2 if symmetric else 4) / 32


def test_gathering_tokens_keeps_their_groups_scales():
    x = torch.randn(2, 2, 96, 16, generator=torch.Generator().manual_seed(3))
    packed = quant.quantize(x, 4, 32, "channel")
    keep = torch.rand(2, 2, 96, generator=torch.Generator().manual_seed(4)) < 0.4
    keep[..., :40] = False  # every token of the first group dropped: its scales must go too
    indices, slot_valid = kvx.policy.mask_to_indices(keep)
    gathered = quant.gather_tokens(packed, indices, slot_valid)
    full = quant.dequantize(packed)
    expected = full.gather(2, indices[..., None].expand(-1, -1, -1, 16))
    assert torch.equal(quant.dequantize(gathered)[slot_valid], expected[slot_valid])
    assert gathered.scale.shape[2] <= 2 and gathered.group_index.dtype == torch.int16


@pytest.mark.parametrize("axis,group,outliers", [("channel", 32, 0), ("token", 8, 0), ("channel", 8, 3)])
@pytest.mark.parametrize("evicted", [False, True])
def test_dequantizing_chosen_tokens_equals_dequantizing_all(axis, group, outliers, evicted):
    """What quest reads of packed storage: the chosen tokens alone, bit for bit as the whole view."""
    gen = torch.Generator().manual_seed(5)
    packed = quant.quantize(torch.randn(2, 3, 96, 16, generator=gen), 4, group, axis, outliers=outliers)
    if evicted:  # per-channel groups then indexed per token (group_index)
        keep = torch.rand(2, 3, 96, generator=gen) < 0.5
        keep[..., -40:] = True
        packed = quant.gather_tokens(packed, *kvx.policy.mask_to_indices(keep))
    chosen = torch.randint(0, packed.tokens, (2, 3, 21), generator=gen)  # any order, repeats
    full = quant.dequantize(packed, torch.bfloat16)
    assert torch.equal(quant.dequantize_tokens(packed, chosen, torch.bfloat16), reference.take_tokens(full, chosen))


def test_bad_layouts_are_refused_by_name():
    with pytest.raises(ValueError, match="bits must be one of 2, 4"):
        kvx.make_policy("kivi", bits=3)
    with pytest.raises(ValueError, match="bits must be one of 2, 4"):
        kvx.make_policy("kivi", bits=8)
    with pytest.raises(ValueError, match="group must be >= 1"):
        kvx.make_policy("int8", group=0)
    with pytest.raises(TypeError, match="symmetric must be true or false"):
        kvx.make_policy("int8", symmetric="yes")
    with pytest.raises(ValueError, match=r"group \(24\) must divide the head dim \(16\)"):
        QuantizedLayer(QuantSpec(8, 8, 24, "token", owner="int8")).update(torch.zeros(1, 1, 2, 16), torch.zeros(1, 1, 2, 16))
    with pytest.raises(ValueError, match="int8 and kivi both answer the storage axis"):
        kvx.compose("int8", "kivi")


def test_a_group_that_does_not_divide_the_head_dim_is_refused_at_patch(model):
    with pytest.raises(ValueError, match=r"int8: group \(32\) must divide the head dim \(16\)"):
        kvx.patch(model, "int8")
    assert not kvx.is_patched(model)
    with pytest.raises(ValueError, match=r"mixed: group \(32\) must divide the head dim \(16\)"):
        kvx.patch(model, "mikv", budget=64)


def test_a_window_that_holds_the_whole_budget_is_refused():
    with pytest.raises(ValueError, match=r"kivi: window \(128\) \+ sink \(0\) must be below the 64 tokens snapkv keeps"):
        kvx.compose(kvx.make_policy("snapkv", budget=64, window=8), "kivi")
    with pytest.raises(ValueError, match=r"int8: window \(40\) \+ sink \(0\) must be below the 40 tokens streaming_llm"):
        kvx.compose(kvx.make_policy("streaming_llm", sink=4, window=36), kvx.make_policy("int8", window=40))
    kvx.compose(kvx.make_policy("snapkv", budget=256, window=8), "kivi")  # fits
    kvx.compose(kvx.make_policy("streaming_llm", sink=4, window=252), "kivi")


def test_head_budgets_put_quantized_storage_in_its_ragged_form():
    composed = kvx.compose("head_budget", "kivi")
    assert composed.storage_part.ragged is True and composed.storage.endswith("ragged=true")
    assert kvx.compose("snapkv", "kivi").storage_part.ragged is False
    with pytest.raises(ValueError, match=r"head_budget needs ragged storage, not mixed \(mixed\)"):
        kvx.compose("head_budget", "mixed")


# --- the storage in a model --------------------------------------------------------------------


def _patched_greedy(model, spec, ids, mask=None, new_tokens=6, **kwargs):
    with kvx.patched(model, from_spec(spec), **kwargs):
        return greedy(model, ids, mask, new_tokens=new_tokens)


def test_int8_gives_the_dense_greedy_tokens(model):
    for seed in range(3):
        ids = random_ids(1, 90, seed=seed)
        dense_seq, dense_logits, _ = greedy(model, ids, new_tokens=6)
        seq, logits, cache = _patched_greedy(model, "int8:group=16", ids)
        assert torch.equal(seq, dense_seq)
        torch.testing.assert_close(logits, dense_logits, rtol=0, atol=2e-3)
        assert {s["kind"] for s in cache.stats()} == {"quantized"}


@pytest.mark.parametrize("spec,ratio", [
    ("int8:group=16", 1.25 / 4),  # 1 byte + a float16 scale and zero per 16 channels, against fp32
    ("kivi:bits=4,group=16,window=0", 0.75 / 4),
    ("kivi:bits=2,group=16,window=0", 0.5 / 4),
])
def test_bytes_are_exactly_the_packed_layout(model, spec, ratio):
    ids = random_ids(1, 96, seed=7)
    dense_bytes = 2 * 96 * model.config.num_key_value_heads * model.config.head_dim * 4  # k + v, fp32, per layer
    with kvx.patched(model, from_spec(spec)):
        cache = _last_cache(model, ids)  # the prompt ends: quantized now
    for layer in cache.stats():
        assert layer["seen"] == 96 and layer["kept_min"] == 96
        assert layer["kv_bytes"] == layer["nbytes"] == dense_bytes * ratio


def _last_cache(model, ids):
    """The cache of ``kvx.prefill`` over ``ids`` on the patched ``model``."""
    cache = kvx.KVCache(model.config, model._kvx_state.axes.storage)
    kvx.prefill(model, ids, chunk_size=None, cache=cache)
    return cache


def test_the_window_and_sinks_stay_at_full_precision(model):
    ids = random_ids(1, 77, seed=8)
    with kvx.patched(model, from_spec("kivi:bits=2,group=16,window=20,sink=4")):
        cache = _last_cache(model, ids)
    layer = cache.layers[0]
    # 4 sinks, then the oldest multiple of 16 of the rest beyond the window of 20 (48), 25 in the tail
    assert (layer.slots_of(layer.SINKS), layer.slots_of(layer.PACKED), layer.keys.shape[-2]) == (4, 48, 25)
    assert layer.segments[layer.SINKS].keys.dtype == layer.keys.dtype == torch.float32


def test_the_prompt_is_exact_until_it_ends(model):
    """Chunked prefill attends over earlier chunks at full precision: the prompt's logits are the
    dense model's, whatever the bits."""
    ids = random_ids(1, 70, seed=9)
    dense = model(ids).logits[:, -1]
    with kvx.patched(model, from_spec("kivi:bits=2,group=16,window=0")):
        out = kvx.prefill(model, ids, chunk_size=16)
    torch.testing.assert_close(out.logits[:, -1], dense, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spec", ["int8:group=16,window=5", "kivi:bits=4,group=16,window=8,sink=2"])
def test_decode_over_itself_equals_attention_over_its_dequantized_view(spec):
    """The read path (sinks, packed tokens through the decode kernel, the tail, merged) is attention
    over exactly what the storage holds."""
    g = torch.Generator().manual_seed(5)
    layer = from_spec(spec).make_layer()
    keys, values = torch.randn(2, 2, 61, 16, generator=g), torch.randn(2, 2, 61, 16, generator=g)
    layer.update(keys, values)
    layer.begin_step(None, 61, 8)
    layer.end_prompt()
    assert layer.slots_of(layer.PACKED) > 0
    new_key, new_value, query = (torch.randn(2, 2, 1, 16, generator=g), torch.randn(2, 2, 1, 16, generator=g),
                                 torch.randn(2, 8, 1, 16, generator=g))
    key, value = layer.update(new_key, new_value)
    mask = layer.begin_step(None, 1, 8)
    out = layer.attend(query, key, value, mask, 0.25, None)
    view_keys, view_values, valid = layer.dense_view()
    expected = reference.attention(query, view_keys, view_values, None, 0.25, None)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", ["kivi:bits=4,group=16,window=4", "int8:group=8,window=3"])
def test_a_row_in_a_padded_batch_is_quantized_as_the_row_alone(model, spec):
    rows = [random_ids(1, n, seed=n)[0] for n in (61, 38)]
    ids, mask = left_pad(rows)
    batch_seq, batch_logits, cache = _patched_greedy(model, spec, ids, mask, chunk_size=None)
    for i, row in enumerate(rows):
        alone_seq, alone_logits, _ = _patched_greedy(model, spec, row[None], chunk_size=None)
        assert torch.equal(batch_seq[i, -6:], alone_seq[0, -6:])
        torch.testing.assert_close(batch_logits[:, i], alone_logits[:, 0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("selection", ["snapkv:budget=40,window=4", "h2o:budget=40,recent=4,decode_interval=2",
                                       "streaming_llm:sink=4,window=36", "tova:budget=40"])
def test_eviction_and_quantization_in_one_cache(model, selection):
    """The selection keeps what it keeps on dense storage at the prompt (it scores full-precision
    keys), the kept tokens beyond the window are quantized, and bytes follow both."""
    ids = random_ids(1, 120, seed=12)
    _, _, dense_storage = _patched_greedy(model, selection, ids)
    seq, logits, cache = _patched_greedy(model, f"{selection}+kivi:bits=4,group=16,window=8", ids)
    for plain, mixed in zip(dense_storage.stats(), cache.stats()):
        assert (mixed["kept_min"], mixed["kept_max"]) == (plain["kept_min"], plain["kept_max"])
        assert mixed["kind"] == "quantized" and mixed["kv_bytes"] < 0.6 * plain["kv_bytes"]
    layer = cache.layers[0]
    assert layer.slots_of(layer.PACKED) >= 16 and layer.keys.shape[-2] < 8 + 16


def test_snapkv_prunes_the_prompt_before_anything_is_quantized(model, monkeypatch):
    ids = random_ids(1, 150, seed=13)
    quantized_tokens = []
    original = quant.quantize

    def counting(x, *args, **kwargs):
        quantized_tokens.append(x.shape[2])
        return original(x, *args, **kwargs)

    monkeypatch.setattr(quant, "quantize", counting)
    _patched_greedy(model, "snapkv:budget=48,window=4+kivi:bits=4,group=16,window=8", ids, new_tokens=2)
    # per layer, keys and values once each at the first decode step: 48 kept + 1 new - 8 window -> 32
    assert quantized_tokens and max(quantized_tokens) <= 48


def test_beam_search_moves_every_part_with_its_row(model):
    ids = random_ids(2, 60, seed=14)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False, pad_token_id=0,
                  num_beams=3, num_return_sequences=2)
    with kvx.patched(model, from_spec("int8:group=16")):
        beams = model.generate(ids, **kwargs)
    assert torch.equal(beams, model.generate(ids, **kwargs))  # int8 keeps the dense beams here
    layer = QuantizedLayer(QuantSpec(4, 4, 16, "channel", window=4, sink=2))
    g = torch.Generator().manual_seed(6)
    layer.update(torch.randn(3, 2, 40, 16, generator=g), torch.randn(3, 2, 40, 16, generator=g))
    layer.begin_step(None, 40, 4)
    layer.end_prompt()
    before = layer.dense_view()
    order = torch.tensor([2, 0, 0])
    layer.reorder_cache(order)
    after = layer.dense_view()
    for b, a in zip(before, after):
        assert torch.equal(b[order], a)


def test_kvcache_takes_a_storage_spec(model):
    cache = kvx.KVCache(model.config, storage="kivi:bits=2")
    assert cache.storage == "kivi:bits=2,group=32,window=128,sink=0,ragged=false"
    assert all(isinstance(layer, QuantizedLayer) and layer.spec.key_bits == 2 for layer in cache.layers)
    with pytest.raises(ValueError, match="is a selection policy; choose dense, or a storage policy"):
        kvx.KVCache(model.config, storage="snapkv")
    with pytest.raises(ValueError, match="unknown policy 'kiwi'"):
        kvx.KVCache(model.config, storage="kiwi")
    with pytest.raises(TypeError, match=r"needs the model's config \(model.config\), got NoneType"):
        kvx.KVCache(None)


@pytest.mark.parametrize("spec,limit", [("int8:window=128,sink=4", 0.57), ("kivi:bits=4,window=128,sink=4", 0.33),
                                        ("kivi:bits=2,window=128,sink=4", 0.20)])
def test_bytes_against_a_bfloat16_cache_at_32k(spec, limit):
    """Everything stored counted (codes, float16 scales and zero points, the 128-token window, 4
    sinks), at 32K tokens of head dim 128, against the same tokens in bfloat16."""
    tokens, dim = 32768, 128
    layer = from_spec(spec).make_layer()
    keys = torch.randn(1, 1, tokens, dim, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    layer.update(keys, keys.clone())
    layer.begin_step(None, tokens, 1)
    layer.end_prompt()
    stored = sum(t.numel() * t.element_size() for t in layer.held_tensors())
    assert stored == kvx.cache.layer_nbytes(layer)
    assert stored / (2 * tokens * dim * 2) <= limit
    assert all(seg.valid is None for seg in layer._present()) and layer.slots_of(layer.SINKS) == 4
    assert layer.keys.shape[-2] < 128 + 32


@pytest.mark.parametrize("model_type", ["gemma2", "qwen3", "mistral"])
def test_int8_keeps_the_dense_tokens_on_other_architectures(model_type):
    """Softcapped logits and sliding-window layers (gemma2), q/k norms (qwen3): the packed read
    path serves them as the dense one does."""
    model = tiny_model(model_type)
    ids = random_ids(1, 80, seed=30)
    dense_seq, dense_logits, _ = greedy(model, ids, new_tokens=6)
    seq, logits, cache = _patched_greedy(model, "int8:group=8,window=4,sink=2", ids)
    assert torch.equal(seq, dense_seq)
    torch.testing.assert_close(logits, dense_logits, rtol=0, atol=5e-3)
    assert "quantized" in {s["kind"] for s in cache.stats()}
