"""tidal (TidalDecode): at density 1 it gives the dense model's outputs on every verified
architecture; below it, the selection layer picks the top tokens by its attention (against a plain
computation), the layers after it read exactly those positions until the next selection layer, the
selection lives on the cache for one forward, a padded row reads what the row alone reads,
``cache.stats()`` counts what was read, and bad options or compositions are refused by name."""

import pytest
import torch
from conftest import MODEL_TYPES, QUANTIZED_READERS, greedy, left_pad, random_ids

import kvx
import kvx.methods.tidal as tidal_module
from kvx.compose import from_spec
from kvx.methods import Tidal
from kvx.tiny import tiny_model

SPARSE = "tidal:budget=40,select_layer=0,reselect_layer=-1"


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", num_hidden_layers=3)


@pytest.fixture
def selections(monkeypatch):
    """Every selection made, with the scores a plain computation gives from the layer's inputs."""
    made = []
    real_select = Tidal.select

    def spy(self, storage, query, keys, valid, real, layer_idx, scaling, softcap):
        chosen = real_select(self, storage, query, keys, valid, real, layer_idx, scaling, softcap)
        made.append((layer_idx, chosen, query, keys, valid, scaling))
        return chosen

    monkeypatch.setattr(Tidal, "select", spy)
    return made


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_density_one_equals_the_dense_model(model_type):
    model = tiny_model(model_type)
    ids, mask = left_pad([random_ids(1, n, seed=n)[0] for n in (40, 23)])
    dense_seq, dense_logits, _ = greedy(model, ids, mask, new_tokens=5)
    with kvx.patched(model, "tidal", density=1.0, select_layer=0, reselect_layer=-1):
        seq, logits, cache = greedy(model, ids, mask, new_tokens=5)
    assert torch.equal(seq, dense_seq)
    torch.testing.assert_close(logits, dense_logits, rtol=1e-4, atol=1e-4)
    counted = [s for s in cache.stats() if "decode_keys_total" in s]
    assert counted and all(s["decode_keys_read"] == s["decode_keys_total"] > 0 for s in counted)


def _plain_top(query, keys, valid, scaling, budget):
    """Per (row, KV head): the ``budget`` real slots with the highest attention probability of the
    query, max over the KV head's query heads."""
    batch, heads = query.shape[:2]
    kv_heads = keys.shape[1]
    groups = heads // kv_heads
    picked = []
    for b in range(batch):
        for h in range(kv_heads):
            real = torch.ones(keys.shape[2], dtype=torch.bool) if valid is None else valid[b, h]
            probs = torch.stack([torch.softmax((keys[b, h][real] @ query[b, g, 0]) * scaling, -1)
                                 for g in range(h * groups, (h + 1) * groups)]).amax(0)
            slots = real.nonzero()[:, 0]
            picked.append(set(slots[probs.topk(min(budget, len(slots))).indices].tolist()))
    return picked


@pytest.mark.parametrize("storage", ["", "+kivi:group=8,window=4"])
def test_layers_read_the_top_tokens_of_the_selection_layer(model, selections, storage, monkeypatch):
    read = []
    real_attend = tidal_module.attend_tokens

    def spy(query, reader, slots, chosen, *args):
        read.append([set(slots[b, h][chosen[b, h]].tolist()) for b in range(slots.shape[0]) for h in range(slots.shape[1])])
        return real_attend(query, reader, slots, chosen, *args)

    monkeypatch.setattr(tidal_module, "attend_tokens", spy)
    rows = [random_ids(1, n, seed=n)[0] for n in (300, 211)]
    ids, mask = left_pad(rows)
    with kvx.patched(model, from_spec(SPARSE + storage)):
        seq, logits, cache = greedy(model, ids, mask, new_tokens=4)
    assert [layer for layer, *_ in selections] == [0, 0, 0]  # one selection per decode step
    assert len(read) == 3 * 2  # layers 1 and 2 of each step read it
    for step, (_, chosen, query, keys, valid, scaling) in enumerate(selections):
        expected = _plain_top(query, keys, valid, scaling, 40)
        assert read[2 * step] == read[2 * step + 1] == expected
    stats = cache.stats()
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    assert stats[0]["decode_keys_read"] == stats[0]["decode_keys_total"]  # the selection layer: dense
    for s in stats[1:]:
        assert s["decode_keys_read"] == 3 * 2 * 2 * 40 * groups < s["decode_keys_total"]
    assert cache.method_state["tidal"].layer == 0  # on the cache, not on the policy or a global


def test_a_padded_row_reads_what_the_row_alone_reads(model):
    rows = [random_ids(1, n, seed=n)[0] for n in (300, 211)]
    ids, mask = left_pad(rows)
    with kvx.patched(model, from_spec(SPARSE)):
        seq, logits, _ = greedy(model, ids, mask, new_tokens=4)
        alone = [greedy(model, row[None], new_tokens=4) for row in rows]
    _, dense, _ = greedy(model, ids, mask, new_tokens=4)
    assert (dense[1:] - logits[1:]).abs().max() > 1e-3  # reading 40 tokens changes the outputs
    for i, (row_seq, row_logits, _) in enumerate(alone):
        assert torch.equal(seq[i, -4:], row_seq[0, -4:])
        torch.testing.assert_close(logits[:, i], row_logits[:, 0], rtol=1e-4, atol=1e-4)


def test_reselection_layer_selects_again(selections):
    model = tiny_model("llama", num_hidden_layers=4)
    with kvx.patched(model, from_spec("tidal:budget=40,select_layer=1,reselect_layer=2")):
        _, _, cache = greedy(model, random_ids(1, 200, seed=4), new_tokens=3)
    assert [layer for layer, *_ in selections] == [1, 2, 1, 2]
    stats = cache.stats()
    assert [s["decode_keys_read"] == s["decode_keys_total"] for s in stats] == [True, True, True, False]


def test_default_layers_follow_the_paper():
    assert Tidal().selection_layers(32) == (2, 13)  # Llama-3-8B: dense 0-1, select at 2, re-select at 13
    assert Tidal().selection_layers(3) == (2,)
    assert Tidal(reselect_layer=-1).selection_layers(32) == (2,)


@pytest.mark.parametrize("options,message", [
    ({"select_layer": 3}, r"tidal: select_layer \(3\) is not a layer of this model: it has 3 layers \(0-2\)"),
    ({"select_layer": 0, "reselect_layer": 5}, r"tidal: reselect_layer \(5\) is not a layer of this model"),
])
def test_layers_out_of_the_model_are_refused_at_patch(model, options, message):
    with pytest.raises(ValueError, match=message):
        kvx.patch(model, "tidal", **options)
    assert not kvx.is_patched(model)


@pytest.mark.parametrize("spec,error,message", [
    ("tidal:budget=0", ValueError, r"tidal: budget must be >= 1, got 0"),
    ("tidal:density=0", ValueError, r"tidal: density must be a number in \(0, 1\], got 0"),
    ("tidal:density=2", ValueError, r"tidal: density must be a number in \(0, 1\], got 2"),
    ("tidal:select_layer=-1", ValueError, r"tidal: select_layer must be >= 0, got -1"),
    ("tidal:select_layer=4,reselect_layer=3", ValueError, r"tidal: reselect_layer \(3\) must come after select_layer"),
    ("tidal:reselect_layer=-2", ValueError, r"tidal: reselect_layer must be >= -1, got -2"),
    ("tidal:reduce=mean", ValueError, r"tidal: reduce must be one of max, sum; got 'mean'"),
])
def test_bad_options_are_refused_by_name(spec, error, message):
    with pytest.raises(error, match=message):
        from_spec(spec)


def test_compositions_with_a_selection_are_refused_storage_ones_accepted():
    with pytest.raises(ValueError, match=r"kvx.compose: tidal cannot compose with snapkv: .*every layer to store the "
                                         r"same tokens.*compose tidal with a storage policy alone"):
        from_spec("tidal+snapkv:budget=64")
    assert from_spec("tidal+kivi:bits=4").axes() == {"selection": "dense", "storage": "kivi", "method": "tidal"}
    listed = {p["name"]: p for p in kvx.list_policies()}["tidal"]
    assert listed["axis"] == "method" and all(o["help"] for o in listed["options"])


@pytest.mark.parametrize("storage", QUANTIZED_READERS)
def test_on_quantized_storage_reads_only_the_chosen_slots_and_equals_the_dense_view(model, storage, monkeypatch):
    """On packed segments the sparse layers read (dequantize) only the chosen slots, through the
    storage's reader, and give exactly what tidal over the whole dequantized view gives (which reads
    every token); keys counted alike."""
    from kvx.storage.base import Storage
    from kvx.storage.quantized import QuantizedLayer
    from kvx.storage.segments import SegmentsReader

    gathered = []
    real_gather = SegmentsReader.gather
    monkeypatch.setattr(SegmentsReader, "gather", lambda self, slots: gathered.append(slots.shape) or
                        real_gather(self, slots))
    ids, mask = left_pad([random_ids(1, n, seed=n)[0] for n in (300, 211)])
    with kvx.patched(model, from_spec(f"{SPARSE}+{storage}")):
        seq, logits, cache = greedy(model, ids, mask, new_tokens=12)
    # layers 1-2 of each decode step but the first (the prompt is quantized as that step ends: it reads the tail)
    assert len(gathered) == 10 * 2 and all(shape[-1] == 40 for shape in gathered)
    with monkeypatch.context() as patch:
        patch.setattr(QuantizedLayer, "decode_reader", Storage.decode_reader)  # the transient dense view
        with kvx.patched(model, from_spec(f"{SPARSE}+{storage}")):
            ref_seq, ref_logits, ref_cache = greedy(model, ids, mask, new_tokens=12)
    assert torch.equal(seq, ref_seq) and torch.equal(logits, ref_logits)
    counts = [(s["decode_keys_read"], s["decode_keys_total"]) for s in cache.stats()]
    assert counts == [(s["decode_keys_read"], s["decode_keys_total"]) for s in ref_cache.stats()]
    assert all(read < total for read, total in counts[1:])
