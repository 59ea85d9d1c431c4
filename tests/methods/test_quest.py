"""quest (decode page selection): at density 1 it gives the dense model's outputs on every verified
architecture; below it, the pages read are the top ones by the query's upper bound (against a
plain loop), the bounds kept beside the cache equal bounds rebuilt from scratch (also after a
selection evicts at decode), a padded row reads what the row alone reads, ``cache.stats()`` counts
exactly the keys attended, and bad options are refused by name."""

import pytest
import torch
from conftest import MODEL_TYPES, QUANTIZED_READERS, greedy, left_pad, random_ids

import kvx
import kvx.methods.quest as quest_module
from kvx.compose import from_spec
from kvx.kernels import pages as pages_ops
from kvx.kernels import reference
from kvx.storage.base import ViewReader
from kvx.tiny import tiny_model

SPARSE = "quest:budget=48,page_size=8,sink=8,recent=8,dense_layers=0"


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture
def attended(monkeypatch):
    """Every (keys, real) the method attends over at decode (the gathered keys, which tokens are real)."""
    calls = []
    real_fn = pages_ops.attend_gathered

    def spy(query, keys, values, real, *args):
        calls.append((keys, real))
        return real_fn(query, keys, values, real, *args)

    monkeypatch.setattr(pages_ops, "attend_gathered", spy)  # what attend_tokens attends with
    return calls


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_density_one_equals_the_dense_model(model_type):
    model = tiny_model(model_type)
    ids, mask = left_pad([random_ids(1, n, seed=n)[0] for n in (40, 23)])
    dense_seq, dense_logits, _ = greedy(model, ids, mask, new_tokens=5)
    with kvx.patched(model, "quest", density=1.0, dense_layers=0, page_size=4):
        seq, logits, cache = greedy(model, ids, mask, new_tokens=5)
    assert torch.equal(seq, dense_seq)
    torch.testing.assert_close(logits, dense_logits, rtol=1e-4, atol=1e-4)
    counted = [s for s in cache.stats() if "decode_keys_total" in s]
    assert counted and all(s["decode_keys_read"] == s["decode_keys_total"] > 0 for s in counted)


def _keys_and_padding(batch=2, kv_heads=3, stored=77, dim=24, seed=0, holes=False, real=((77, 60, 41), (13, 77, 5))):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, kv_heads, stored, dim, generator=gen)
    real = torch.tensor(real)[:batch, :kv_heads]
    valid = torch.arange(stored) >= (stored - real)[..., None]  # left padding per (row, head)
    if holes:  # padding between two runs of real tokens (a quantized prefix and its tail)
        valid[..., 20:26] = False
        valid[..., 60:62] = False
    return keys, valid


@pytest.mark.parametrize("reduce", ["max", "sum"])
@pytest.mark.parametrize("holes", [False, True])
def test_pages_read_are_the_top_by_upper_bound(reduce, holes):
    keys, valid = _keys_and_padding(holes=holes)
    query = torch.randn(2, 3 * 4, 1, 24, generator=torch.Generator().manual_seed(1))  # G = 4
    index = pages_ops.build_page_index(keys, valid, 8)
    count = torch.minimum(torch.full((2, 3), 3), -(-index.real // 8))
    pages, chosen = pages_ops.top_pages(pages_ops.page_upper_bounds(query, index, reduce), count)
    got = torch.zeros(2, 3, 77, dtype=torch.bool)
    got.scatter_(2, torch.where(chosen, pages, 77 - 1), chosen)  # page numbers as a mask over [0, 77)
    expected = pages_ops.quest_reference(query, keys, valid, 8, 3, reduce)
    assert torch.equal(got, expected)
    slots, read = pages_ops.page_tokens(index, pages, chosen)
    for b in range(2):
        for h in range(3):
            real_slots = valid[b, h].nonzero()[:, 0]
            want = {int(real_slots[r]) for p in expected[b, h].nonzero()[:, 0] for r in range(p * 8, min(p * 8 + 8, len(real_slots)))}
            assert set(slots[b, h][read[b, h]].tolist()) == want


def test_bounds_extended_in_place_equal_bounds_rebuilt():
    keys, valid = _keys_and_padding(real=((77, 60, 41), (28, 77, 33)))  # every slot from 50 on real
    index = pages_ops.build_page_index(keys[:, :, :50], valid[:, :, :50], 8, spare=1)
    for stop in range(51, 78):
        index.extend(keys[:, :, stop - 1:stop])
        rebuilt = pages_ops.build_page_index(keys[:, :, :stop], valid[:, :, :stop], 8)
        pages = rebuilt.num_pages
        assert torch.equal(index.real, rebuilt.real) and index.stored == stop
        assert torch.equal(index.mins[:, :, :pages], rebuilt.mins) and torch.equal(index.maxs[:, :, :pages], rebuilt.maxs)


def test_every_page_through_the_sparse_path_equals_dense_attention():
    keys, valid = _keys_and_padding(stored=77)
    values = torch.randn_like(keys)
    query = torch.randn(2, 6, 1, 24)
    index = pages_ops.build_page_index(keys, valid, 8)
    have = -(-index.real // 8)
    pages, chosen = pages_ops.top_pages(pages_ops.page_upper_bounds(query, index), have)
    slots, read = pages_ops.page_tokens(index, pages, chosen)
    out = pages_ops.attend_tokens(query, ViewReader(keys, values, valid), slots, read, 0.3, None, None)
    mask = reference.expand_kv_heads(valid, 2)[:, :, None]
    torch.testing.assert_close(out, reference.attention(query, keys, values, mask, 0.3), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("storage", ["", "+kivi:group=8,window=4", "+snapkv:budget=100,window=8",
                                     "+h2o:budget=90,recent=8,decode_interval=2"])
def test_a_padded_row_reads_what_the_row_alone_reads_and_stats_count_it(model, storage, attended):
    rows = [random_ids(1, n, seed=n)[0] for n in (300, 211)]
    ids, mask = left_pad(rows)
    with kvx.patched(model, from_spec(SPARSE + storage)):
        seq, logits, cache = greedy(model, ids, mask, new_tokens=4)
        read = sum(int(real.sum()) for _, real in attended)
        alone = [greedy(model, row[None], new_tokens=4) for row in rows]
    for i, (row_seq, row_logits, _) in enumerate(alone):
        assert torch.equal(seq[i, -4:], row_seq[0, -4:])
        torch.testing.assert_close(logits[:, i], row_logits[:, 0], rtol=1e-4, atol=1e-4)
    stats = cache.stats()
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    assert sum(s["decode_keys_read"] for s in stats) == read * groups  # exactly what was attended
    for s in stats:  # 3 decode steps of 6 pages of 8 (the newest partial) per (row, head): well under the total
        assert 0 < s["decode_keys_read"] <= 3 * 2 * 2 * 48 * groups < s["decode_keys_total"]


def test_sparse_reads_change_the_outputs(model):
    """The comparisons above can fail: reading a few pages changes the logits."""
    ids = random_ids(1, 300, seed=5)
    _, dense, _ = greedy(model, ids, new_tokens=3)
    with kvx.patched(model, from_spec(SPARSE)):
        _, sparse, _ = greedy(model, ids, new_tokens=3)
    assert (dense[1:] - sparse[1:]).abs().max() > 1e-3
    torch.testing.assert_close(dense[0], sparse[0])  # the prompt attends densely


@pytest.fixture
def checked_bounds(monkeypatch):
    """Every page index quest uses, checked against one rebuilt from the step's keys; the stored counts."""
    checked = []
    real_index = quest_module.Quest.page_index

    def checking(self, storage, reader):
        index = real_index(self, storage, reader)
        fresh = pages_ops.build_page_index(reader.keys(), reader.valid, self.page_size)
        pages = fresh.num_pages
        assert torch.equal(index.real, fresh.real) and index.stored == fresh.stored
        assert torch.equal(index.mins[:, :, :pages], fresh.mins) and torch.equal(index.maxs[:, :, :pages], fresh.maxs)
        ranks = torch.arange(int(fresh.real.max())).expand(*fresh.real.shape, -1)
        real = ranks < fresh.real[..., None]
        assert torch.equal(index.token_slots(ranks)[real], fresh.token_slots(ranks)[real])  # rank -> slot too
        checked.append(reader.stored)
        return index

    monkeypatch.setattr(quest_module.Quest, "page_index", checking)
    return checked


def test_bounds_stay_equal_to_rebuilt_ones_as_a_selection_evicts(model, checked_bounds):
    checked = checked_bounds
    spec = SPARSE + "+h2o:budget=90,recent=8,decode_interval=3"
    with kvx.patched(model, from_spec(spec)):
        greedy(model, random_ids(1, 200, seed=9), new_tokens=8)
    assert len(checked) == 7 * model.config.num_hidden_layers
    assert len(set(checked)) > 1 and max(checked) > 90  # grown past the budget, then evicted


def test_the_first_layers_attend_densely_and_are_counted(model, attended):
    with kvx.patched(model, from_spec(SPARSE.replace("dense_layers=0", "dense_layers=1"))):
        _, _, cache = greedy(model, random_ids(1, 200, seed=3), new_tokens=3)
    first, second = cache.stats()
    assert first["decode_keys_read"] == first["decode_keys_total"]
    assert second["decode_keys_read"] < second["decode_keys_total"]
    assert len(attended) == 2  # two decode steps, layer 1 alone


@pytest.mark.parametrize("spec,error,message", [
    ("quest:page_size=12", ValueError, r"quest: page_size must be a power of two .*got 12"),
    ("quest:page_size=0", ValueError, r"quest: page_size must be >= 1, got 0"),
    ("quest:budget=0", ValueError, r"quest: budget must be >= 1, got 0"),
    ("quest:budget=-5", ValueError, r"quest: budget must be >= 1, got -5"),
    ("quest:density=0", ValueError, r"quest: density must be a number in \(0, 1\], got 0"),
    ("quest:density=1.5", ValueError, r"quest: density must be a number in \(0, 1\], got 1.5"),
    ("quest:reduce=mean", ValueError, r"quest: reduce must be one of max, sum; got 'mean'"),
    ("quest:sink=-1", ValueError, r"quest: sink must be >= 0, got -1"),
    ("quest:budget=1.5", TypeError, r"quest: budget must be an int, got float 1.5"),
])
def test_bad_options_are_refused_by_name(spec, error, message):
    with pytest.raises(error, match=message):
        from_spec(spec)


def test_dense_layers_must_leave_a_sparse_layer(model):
    with pytest.raises(ValueError, match=r"quest: dense_layers \(2\) must be below the model's 2 layers"):
        kvx.patch(model, "quest")  # Quest's default skips two layers: a 2-layer model has none left
    assert not kvx.is_patched(model)


def test_composes_with_selections_and_storage_and_is_listed():
    assert from_spec("quest+kivi:bits=4").axes() == {"selection": "dense", "storage": "kivi", "method": "quest"}
    assert from_spec("quest+snapkv").axes()["selection"] == "snapkv"
    listed = {p["name"]: p for p in kvx.list_policies()}["quest"]
    assert listed["axis"] == "method"
    assert {o["name"] for o in listed["options"]} >= {"budget", "density", "page_size", "sink", "recent"}
    assert all(o["help"] for o in listed["options"])


def test_beam_search_rebuilds_the_bounds_of_reordered_rows(model, checked_bounds):
    ids = random_ids(2, 150, seed=12)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=0,
                  num_beams=3, num_return_sequences=2)
    with kvx.patched(model, from_spec(SPARSE)), torch.inference_mode():
        model.generate(ids, **kwargs)
    assert len(checked_bounds) == 4 * model.config.num_hidden_layers  # every step's bounds equal rebuilt ones


RAGGED = ["head_budget:budget=100,window=8", "snapkv:budget=120,window=8+ragged"]


def _transient(monkeypatch):
    """Quantized and ragged storage read as before: quest over the transient dense view (rebuilt
    every step)."""
    from kvx.storage.base import Storage
    from kvx.storage.quantized import QuantizedLayer
    from kvx.storage.ragged import RaggedLayer

    monkeypatch.setattr(QuantizedLayer, "decode_reader", Storage.decode_reader)
    monkeypatch.setattr(RaggedLayer, "decode_reader", Storage.decode_reader)


@pytest.mark.parametrize("storage", QUANTIZED_READERS + RAGGED)
def test_on_quantized_and_ragged_storage_equals_quest_over_the_dense_view(model, storage, monkeypatch):
    """Reading only the chosen slots of packed segments (dequantizing those alone) or of a ragged
    prefix, with page bounds kept across steps (refreshed as tokens leave a quantized window), gives
    exactly what quest over the whole (dequantized) dense view gives, which reads every token; keys
    counted alike."""
    rows = [random_ids(1, n, seed=n)[0] for n in (300, 211)]
    ids, mask = left_pad(rows)
    builds = []
    real_build = quest_module.build_page_index
    monkeypatch.setattr(quest_module, "build_page_index", lambda *a, **k: builds.append(1) or real_build(*a, **k))
    with kvx.patched(model, from_spec(f"{SPARSE}+{storage}")):
        seq, logits, cache = greedy(model, ids, mask, new_tokens=20)
    assert len(builds) == model.config.num_hidden_layers  # built once per layer, then extended and refreshed
    with monkeypatch.context() as patch:
        _transient(patch)
        with kvx.patched(model, from_spec(f"{SPARSE}+{storage}")):
            ref_seq, ref_logits, ref_cache = greedy(model, ids, mask, new_tokens=20)
    assert len(builds) == model.config.num_hidden_layers * 20  # the reference rebuilt them every step
    assert torch.equal(seq, ref_seq) and torch.equal(logits, ref_logits)
    counts = [(s["decode_keys_read"], s["decode_keys_total"]) for s in cache.stats()]
    assert counts == [(s["decode_keys_read"], s["decode_keys_total"]) for s in ref_cache.stats()]
    assert all(0 < read < total for read, total in counts)


@pytest.mark.parametrize("storage", QUANTIZED_READERS[:2] + RAGGED[:1])
def test_chosen_reads_are_the_dense_views_tokens_and_bounds_stay_rebuilt_ones(model, storage, checked_bounds,
                                                                             monkeypatch):
    """Each step's gathered keys and values equal the transient dense view's at the same slots; the
    bounds kept equal bounds rebuilt from it (``checked_bounds``), through moves out of the window."""
    from kvx.storage.quantized import QuantizedLayer
    from kvx.storage.ragged import RaggedLayer, RaggedReader
    from kvx.storage.segments import SegmentsReader

    gathers = []
    for layer_class, reader_class in ((QuantizedLayer, SegmentsReader), (RaggedLayer, RaggedReader)):
        real_reader, real_gather = layer_class.decode_reader, reader_class.gather

        def reader(self, mask, _real=real_reader, _class=reader_class):
            found = _real(self, mask)
            if isinstance(found, _class):
                found.view = self.dense_view()
            return found

        def gather(self, slots, _real=real_gather):
            keys, values = _real(self, slots)
            if hasattr(self, "view"):
                assert torch.equal(keys, reference.take_tokens(self.view[0], slots))
                assert torch.equal(values, reference.take_tokens(self.view[1], slots))
                gathers.append(slots.shape[-1])
            return keys, values

        monkeypatch.setattr(layer_class, "decode_reader", reader)
        monkeypatch.setattr(reader_class, "gather", gather)
    ids, mask = left_pad([random_ids(1, n, seed=n)[0] for n in (200, 151)])
    with kvx.patched(model, from_spec(f"{SPARSE}+{storage}")):
        greedy(model, ids, mask, new_tokens=18)
    assert len(checked_bounds) == 17 * model.config.num_hidden_layers
    assert len(gathers) >= 17 * model.config.num_hidden_layers  # every step (and each refresh) read through it
