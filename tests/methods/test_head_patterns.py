"""The head_patterns method: with a pattern file each query head computes the blocks of its own
pattern and size (the same lists as the single-pattern method at that setting), a file at full size
equals dense attention, without a file it is vertical_slash, and a file for another model, another
schema version, a missing file or a mismatch of heads or settings is a clear error."""

import json

import pytest
import torch
from conftest import greedy, random_ids
from safetensors.torch import load_file, save_file

import kvx
import kvx.methods.block_sparse as block_sparse_method
from kvx.compose import from_spec
from kvx.kernels.block_index import block_index, first_real_block, pooled_query_scores, vertical_slash_scores
from kvx.kernels.reference import block_grid
from kvx.methods._pattern_file import PATTERNS, PatternFile, load_patterns
from kvx.methods.a_shape import EVERY_BLOCK
from kvx.methods.head_patterns import head_lists
from kvx.policies._head_scores import HeadScores, model_identity
from kvx.tiny import tiny_model

A, VS, TOPK = (PATTERNS.index(p) for p in ("a_shape", "vertical_slash", "block_topk"))
OPTS = "block_size=16,min_length=0"


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")  # 2 layers, 4 query heads, 2 KV heads


def pattern_file(model, pattern, local, density, block_size=16, sink=1, shared_local=2) -> PatternFile:
    """A pattern file for ``model`` with the given ``[L, H]`` choices (as a search would write it)."""
    pattern, local = torch.tensor(pattern, dtype=torch.int32), torch.tensor(local, dtype=torch.int32)
    density = torch.tensor(density, dtype=torch.float64)
    recall = torch.ones(pattern.shape)
    settings = {"block_size": block_size, "sink": sink, "local": shared_local, "density": 0.3,
                "candidates": ["made by hand"]}
    return PatternFile(pattern, local, density, recall, recall.clone(), recall[..., None], recall[..., None],
                       model_identity(model), settings)


@pytest.fixture
def lists(monkeypatch):
    """The block lists ``index [B, H, Qb, K]`` of every block-sparse op call, in call order (the
    layers of a forward in turn)."""
    calls = []
    real = block_sparse_method.block_sparse_attention

    def spy(query, keys, values, index, *args, **kwargs):
        calls.append(index)
        return real(query, keys, values, index, *args, **kwargs)

    monkeypatch.setattr(block_sparse_method, "block_sparse_attention", spy)
    return calls


def as_mask(index: torch.Tensor, num_kb: int) -> torch.Tensor:
    """``[..., Qb, Nb]`` bool of the blocks in lists ``index [..., Qb, K]``."""
    mask = torch.zeros(*index.shape[:-1], num_kb + 1, dtype=torch.bool)
    mask.scatter_(-1, index.long().clamp(min=-1) % (num_kb + 1), True)  # -1 lands in the spare column
    return mask[..., :num_kb]


def test_each_head_gets_the_lists_of_its_own_pattern_and_size():
    gen = torch.Generator().manual_seed(0)
    query, keys = torch.randn(2, 4, 200, 16, generator=gen), torch.randn(2, 2, 200, 16, generator=gen)
    valid = torch.ones(2, 2, 200, dtype=torch.bool)
    valid[1, :, :37] = False  # a left-padded row
    num_qb, num_kb, _ = block_grid(200, 200, 16)
    first = first_real_block(valid, 2, 4, 200, 16, query.device)
    pattern, local = torch.tensor([A, VS, TOPK, VS]), torch.tensor([3, 2, 2, 2])
    density = torch.tensor([0.0, 0.3, 0.4, 0.6], dtype=torch.float64)
    index = head_lists(pattern, local, density, query, keys, valid, 0.25, None, 16, 1, 32, num_qb, num_kb, first)
    vs = vertical_slash_scores(query, keys, valid, 0.25, 16, 32)
    topk = pooled_query_scores(query, keys, valid, 0.25, 16)
    expected = [block_index(None, num_qb, num_kb, first, 1, 3),
                block_index(vs, num_qb, num_kb, first, 1, 2, 0.3),
                block_index(topk, num_qb, num_kb, first, 1, 2, 0.4),
                block_index(vs, num_qb, num_kb, first, 1, 2, 0.6)]
    for h, alone in enumerate(expected):
        assert torch.equal(as_mask(index[:, h], num_kb), as_mask(alone[:, h], num_kb)), h
    sizes = as_mask(index, num_kb).sum(-1)[0, :, -1]  # blocks of the last query block per head
    assert sizes.tolist() == [4, 4, 6, 8]  # sink + 3 local; ceil(d x 13 visible)


def test_a_pattern_file_changes_which_blocks_each_head_computes(model, tmp_path, lists):
    path = pattern_file(model, [[A, A, VS, VS], [TOPK, A, VS, TOPK]], [[2, 4, 2, 2], [2, 3, 2, 2]],
                        [[0, 0, 0.3, 0.3], [0.3, 0, 0.5, 0.3]]).save(tmp_path / "p.safetensors")
    ids = random_ids(1, 300, seed=3)
    with kvx.patched(model, from_spec(f"head_patterns:patterns={path},{OPTS}")):
        _, searched, cache = greedy(model, ids, new_tokens=1)
    with kvx.patched(model, from_spec(f"vertical_slash:density=0.3,{OPTS}")):
        _, online, _ = greedy(model, ids, new_tokens=1)
    num_kb = 19  # 300 tokens in blocks of 16
    assert len(lists) == 4  # two prefills of two layers (decode is dense)
    by_layer = {layer: as_mask(index, num_kb)[0] for layer, index in enumerate(lists[:2])}  # [H, Qb, Nb]
    last = by_layer[0][:, -1]  # the last query block sees all 19 blocks
    assert last.sum(-1).tolist() == [3, 5, 6, 6]  # a_shape 1 + 2, 1 + 4; vertical_slash ceil(0.3 x 19) = 6
    assert last[0].nonzero().flatten().tolist() == [0, 17, 18]
    assert last[1].nonzero().flatten().tolist() == [0, 15, 16, 17, 18]
    assert by_layer[1][:, -1].sum(-1).tolist() == [6, 4, 10, 6]
    online_lists = {layer: as_mask(index, num_kb)[0] for layer, index in enumerate(lists[2:4])}
    assert not torch.equal(online_lists[0], by_layer[0])  # the file, not the online estimate, chose
    assert (searched - online).abs().max() > 1e-4
    stats = cache.stats()
    assert [s["blocks_computed"] for s in stats] == [int(by_layer[layer].sum()) for layer in (0, 1)]


def test_a_file_at_full_size_equals_dense_attention(model, tmp_path):
    full = pattern_file(model, [[A, VS, TOPK, A], [VS, TOPK, A, VS]], [[EVERY_BLOCK, 2, 2, EVERY_BLOCK],
                                                                     [2, 2, EVERY_BLOCK, 2]],
                        [[0, 1.0, 1.0, 0], [1.0, 1.0, 0, 1.0]]).save(tmp_path / "full.safetensors")
    ids = random_ids(1, 150, seed=4)
    with kvx.patched(model, "snapkv", budget=4096):
        dense_seq, dense, _ = greedy(model, ids, new_tokens=4)
    with kvx.patched(model, from_spec(f"head_patterns:patterns={full},{OPTS}")):
        seq, logits, cache = greedy(model, ids, new_tokens=4)
    assert torch.equal(seq, dense_seq)
    torch.testing.assert_close(logits, dense, rtol=1e-4, atol=1e-4)
    assert all(s["blocks_computed"] == s["blocks_causal"] for s in cache.stats())


def test_without_a_file_it_is_vertical_slash(model):
    ids = random_ids(1, 200, seed=5)
    with kvx.patched(model, from_spec(f"head_patterns:density=0.2,last_queries=16,{OPTS}")):
        _, ours, _ = greedy(model, ids, new_tokens=2)
    with kvx.patched(model, from_spec(f"vertical_slash:density=0.2,last_queries=16,{OPTS}")):
        _, theirs, _ = greedy(model, ids, new_tokens=2)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert kvx.make_policy("head_patterns").describe().startswith("head_patterns(")


def test_bad_pattern_files_are_clear_errors(model, tmp_path):
    good = pattern_file(model, [[A] * 4] * 2, [[2] * 4] * 2, [[0.0] * 4] * 2)
    path = good.save(tmp_path / "good.safetensors")
    with pytest.raises(ValueError, match="pattern file .*missing.safetensors: no such file; make one with "
                                         "`kvx search-patterns"):
        kvx.make_policy("head_patterns", patterns=str(tmp_path / "missing.safetensors"))
    tensors, metadata = load_file(path), load_patterns(path)
    meta = {"schema_version": "99", "kind": "block_patterns", "model": json.dumps(metadata.model),
            "settings": json.dumps(metadata.settings)}
    save_file(tensors, str(tmp_path / "v99.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="schema version '99' is not one this kvx reads \\(1\\)"):
        kvx.make_policy("head_patterns", patterns=str(tmp_path / "v99.safetensors"))
    scores = HeadScores(torch.zeros(2, 2), torch.zeros(2, 4), model_identity(model)).save(tmp_path / "heads.safetensors")
    with pytest.raises(ValueError, match="not a `kvx search-patterns` file \\(a `kvx profile-heads` scores file\\?\\)"):
        kvx.make_policy("head_patterns", patterns=str(scores))
    (tmp_path / "junk.safetensors").write_text("not tensors")
    with pytest.raises(ValueError, match="not a safetensors file"):
        kvx.make_policy("head_patterns", patterns=str(tmp_path / "junk.safetensors"))

    three_layers = tiny_model("llama", num_hidden_layers=3)
    with pytest.raises(ValueError, match="holds 2 layers x 4 query heads, but the model has 3 layers x 4 query heads "
                                         "\\(head count mismatch"):
        kvx.patch(three_layers, "head_patterns", patterns=str(path), block_size=16)
    wider = tiny_model("llama", hidden_size=128)
    with pytest.raises(ValueError, match="searched on another model .*hidden_size: pattern 64, model 128"):
        kvx.patch(wider, "head_patterns", patterns=str(path), block_size=16)
    other_weights = tiny_model("llama", seed=1)
    with pytest.warns(UserWarning, match="searched on a model with other weights"):
        kvx.patch(other_weights, "head_patterns", patterns=str(path), block_size=16)
    kvx.unpatch(other_weights)

    with pytest.raises(ValueError, match="block_size=64 but pattern file .* was searched with block_size=16"):
        kvx.make_policy("head_patterns", patterns=str(path))
    with pytest.raises(ValueError, match="density=0.2 with patterns=.*the file sets each head's density"):
        kvx.make_policy("head_patterns", patterns=str(path), block_size=16, density=0.2)
    method = kvx.make_policy("head_patterns", patterns=str(path), block_size=16)
    with pytest.raises(ValueError, match="holds 2 layers x 4 query heads, but layer 0 has 8 query heads"):
        method.pattern_file().check_heads(0, 8, path)
