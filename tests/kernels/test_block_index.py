"""The block index builder and the block scores it ranks by: checked against brute force on small
shapes (loops over tiles), and a row of a left-padded batch gets the row alone's lists."""

import math

import pytest
import torch

from kvx.kernels import reference
from kvx.kernels.block_index import (
    block_index,
    final_block_scores,
    first_real_block,
    pooled_block_scores,
    pooled_query_scores,
    vertical_slash_scores,
)


def _qk(batch, kv_heads, groups, q_len, kv_len, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, kv_heads * groups, q_len, dim, generator=g),
            torch.randn(batch, kv_heads, kv_len, dim, generator=g))


def _grid_slots(kv_len, n):
    """Key block of each slot of the end-aligned grid."""
    pad = reference.block_grid(1, kv_len, n)[2]
    return (torch.arange(kv_len) + pad) // n


def test_pooled_scores_are_a_softmax_of_mean_pooled_blocks_over_causal_real_blocks():
    query, key = _qk(2, 1, 2, 70, 100, 16)
    valid = torch.ones(2, 1, 100, dtype=torch.bool)
    valid[1, :, :41] = False  # row 1: padding, then 59 real tokens
    n = 16
    got = pooled_block_scores(query, key, valid, 0.25, n)
    num_qb, num_kb, _ = reference.block_grid(70, 100, n)
    key_block, query_block = _grid_slots(100, n), _grid_slots(100, n)[30:]
    for b in range(2):
        for h in range(2):
            real = valid[b, 0]
            keys = torch.stack([key[b, 0][(key_block == kb) & real].mean(0) if ((key_block == kb) & real).any()
                                else torch.zeros(16) for kb in range(num_kb)])
            for j in range(num_qb):
                rows = (query_block == num_kb - num_qb + j) & real[30:]
                if not rows.any():
                    assert not got[b, h, j].any()
                    continue
                logits = keys @ query[b, h][rows].mean(0) * 0.25
                seen = torch.tensor([kb <= num_kb - num_qb + j and bool(((key_block == kb) & real).any())
                                     for kb in range(num_kb)])
                want = torch.softmax(logits.masked_fill(~seen, -math.inf), 0)
                torch.testing.assert_close(got[b, h, j], want, rtol=1e-5, atol=1e-6)


def test_vertical_slash_scores_are_line_masses_spread_over_tiles():
    """Brute force: the last queries' attention, per tile the mass of its columns plus, for each
    diagonal, its mass times the share of that diagonal's cells the tile holds."""
    query, key = _qk(1, 1, 2, 50, 90, 16, seed=1)
    n, last = 16, 8
    got = vertical_slash_scores(query, key, None, 0.25, n, last)
    num_qb, num_kb, pad = reference.block_grid(50, 90, n)
    mask = reference.causal_mask(last, 90, query.device)
    probs = reference.window_attention_probs(query[:, :, -last:], key, mask, 0.25).reshape(2, last, 90) / last
    column = probs.sum(1)  # [H, S]
    diagonal = torch.zeros(2, 90)
    for i in range(last):
        for k in range(90 - last + i + 1):
            diagonal[:, 90 - last + i - k] += probs[:, i, k]
    for j in range(num_qb):
        own = num_kb - num_qb + j
        for kb in range(num_kb):
            if kb > own:
                assert not got[:, :, j, kb].any()
                continue
            want = column[:, [s for s in range(90) if (s + pad) // n == kb]].sum(-1)
            for d in range(90):  # cells (a, c) of the tile with (own * n + a) - (kb * n + c) = d
                cells = sum(1 for a in range(n) for c in range(n) if (own - kb) * n + a - c == d)
                want = want + diagonal[:, d] * cells / n
            torch.testing.assert_close(got[0, :, j, kb], want, rtol=1e-5, atol=1e-6)


def test_block_index_keeps_sinks_locals_and_a_density_share_of_the_visible_blocks():
    scores = torch.rand(2, 3, 6, 9, generator=torch.Generator().manual_seed(2))
    first = torch.tensor([[0, 0, 0], [4, 4, 4]])  # row 1 starts at block 4
    index = block_index(scores, 6, 9, first, sink=1, local=2, density=0.5)
    for b in range(2):
        for h in range(3):
            for j in range(6):
                own = 3 + j
                chosen = sorted(int(x) for x in index[b, h, j] if x >= 0)
                visible = list(range(int(first[b, h]), own + 1))
                assert len(set(chosen)) == len(chosen) and set(chosen) <= set(visible)
                forced = {x for x in visible if x < first[b, h] + 1 or x > own - 2}
                assert forced <= set(chosen)
                assert len(chosen) == max(len(forced), math.ceil(0.5 * len(visible)))
                rest = [x for x in visible if x not in forced]
                picked = [x for x in chosen if x not in forced]
                dropped = [x for x in rest if x not in picked]
                if picked and dropped:  # what is kept scores at least what is dropped
                    assert min(scores[b, h, j, picked]) >= max(scores[b, h, j, dropped])


def test_block_index_by_threshold_keeps_the_fewest_blocks_that_reach_it():
    scores = torch.softmax(torch.randn(1, 2, 4, 8, generator=torch.Generator().manual_seed(4)) * 3, -1)
    first = torch.zeros(1, 2, dtype=torch.long)
    index = block_index(scores, 4, 8, first, sink=0, local=1, threshold=0.8)
    for h in range(2):
        for j in range(4):
            own = 4 + j
            visible = scores[0, h, j, : own + 1] / scores[0, h, j, : own + 1].sum()
            chosen = [int(x) for x in index[0, h, j] if x >= 0]
            mass = visible[chosen].sum()
            assert own in chosen and mass >= 0.8 - 1e-6
            # dropping the lowest-scored non-local block would fall below the threshold
            others = sorted((x for x in chosen if x != own), key=lambda x: float(visible[x]))
            if others:
                assert mass - visible[others[0]] < 0.8 or visible[own] >= 0.8


def test_a_shape_lists_are_the_sinks_and_the_window():
    first = torch.zeros(1, 1, dtype=torch.long)
    index = block_index(None, 5, 5, first, sink=1, local=2)
    assert [sorted(int(x) for x in row if x >= 0) for row in index[0, 0]] == [[0], [0, 1], [0, 1, 2], [0, 2, 3],
                                                                               [0, 3, 4]]


@pytest.mark.parametrize("estimate", ["pooled", "keys", "keys_exact", "vertical_slash"])
def test_a_padded_row_gets_the_lists_of_the_row_alone(estimate):
    """The grid is aligned to the end and sinks count from a row's first real block: a row of a
    left-padded batch selects the same real tokens as the row alone."""
    n, length, width = 16, 75, 120
    query, key = _qk(1, 1, 2, length, length, 16, seed=3)
    padded_q = torch.cat([torch.randn(1, 2, width - length, 16), query], 2)
    padded_k = torch.cat([torch.randn(1, 1, width - length, 16), key], 2)
    valid = torch.arange(width)[None, None] >= width - length

    def lists(q, k, valid):
        score = (pooled_block_scores(q, k, valid, 0.25, n) if estimate == "pooled"
                 else pooled_query_scores(q, k, valid, 0.25, n) if estimate == "keys"
                 else pooled_query_scores(q, k, valid, 0.25, n, last_queries=24) if estimate == "keys_exact"
                 else vertical_slash_scores(q, k, valid, 0.25, n, 16))
        num_qb, num_kb, _ = reference.block_grid(q.shape[2], k.shape[2], n)
        first = first_real_block(valid, 1, 2, k.shape[2], n, q.device)
        return block_index(score, num_qb, num_kb, first, 1, 1, density=0.4)

    alone, batch = lists(query, key, None), lists(padded_q, padded_k, valid)
    shift = batch.shape[2] - alone.shape[2]  # extra query (and key) blocks in front
    for h in range(2):
        for j in range(alone.shape[2]):
            want = sorted(int(x) + shift for x in alone[0, h, j] if x >= 0)
            assert sorted(int(x) for x in batch[0, h, j + shift] if x >= 0) == want


def test_pooled_query_scores_are_the_block_mass_of_each_mean_query_over_every_key():
    query, key = _qk(2, 1, 2, 70, 100, 16, seed=9)
    valid = torch.ones(2, 1, 100, dtype=torch.bool)
    valid[1, :, :41] = False
    n = 16
    got = pooled_query_scores(query, key, valid, 0.25, n, chunk_elements=700)  # several chunks
    num_qb, num_kb, _ = reference.block_grid(70, 100, n)
    key_block, query_block = _grid_slots(100, n), _grid_slots(100, n)[30:]
    for b in range(2):
        for h in range(2):
            real = valid[b, 0]
            for j in range(num_qb):
                rows = (query_block == num_kb - num_qb + j) & real[30:]
                mean = query[b, h][rows].mean(0) if rows.any() else torch.zeros(16)
                seen = real & (key_block <= num_kb - num_qb + j)
                probs = torch.softmax((key[b, 0] @ mean * 0.25).masked_fill(~seen, -math.inf), 0).nan_to_num(0.0)
                want = torch.zeros(num_kb).index_add_(0, key_block, probs)
                torch.testing.assert_close(got[b, h, j], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("last", [16, 8, 40, 90])
def test_final_block_scores_are_the_mean_block_mass_of_the_last_queries(last):
    """Brute force, GQA and a left-padded row: each of the last real queries' causal softmax over
    the real keys, summed per key block, averaged over those queries in each query block they
    fall in (8: half the final block; 40: two and a half blocks; 90 > the 60 queries: all)."""
    query, key = _qk(2, 2, 2, 60, 100, 16, seed=11)
    valid = torch.ones(2, 2, 100, dtype=torch.bool)
    valid[1, :, :55] = False  # row 1: 45 real tokens, its first query blocks partly padding
    n = 16
    got = final_block_scores(query, key, valid, 0.25, n, last, chunk_elements=1000)  # a KV head per chunk
    num_qb, num_kb, pad = reference.block_grid(60, 100, n)
    width = min(last, 60)
    rows = -(-width // n)
    assert got.shape == (2, 4, rows, num_kb)
    key_block = _grid_slots(100, n)
    for b in range(2):
        for h in range(4):
            real = valid[b, h // 2]
            for r in range(rows):
                own = num_kb - rows + r
                slots = [s for s in range(100 - width, 100) if key_block[s] == own and real[s]]
                want = torch.zeros(num_kb)
                for s in slots:
                    seen = real & (torch.arange(100) <= s)
                    logits = (key[b, h // 2] @ query[b, h, s - 40] * 0.25).masked_fill(~seen, -math.inf)
                    want.index_add_(0, key_block, torch.softmax(logits, 0))
                want = want / max(len(slots), 1)
                torch.testing.assert_close(got[b, h, r], want, rtol=1e-5, atol=1e-6)


def test_pooled_query_scores_score_the_blocks_of_the_last_queries_from_them():
    query, key = _qk(1, 1, 2, 70, 100, 16, seed=12)
    pooled = pooled_query_scores(query, key, None, 0.25, 16)
    mixed = pooled_query_scores(query, key, None, 0.25, 16, last_queries=20)  # the last two query blocks
    torch.testing.assert_close(mixed[:, :, :-2], pooled[:, :, :-2])
    torch.testing.assert_close(mixed[:, :, -2:], final_block_scores(query, key, None, 0.25, 16, 20))
    assert not torch.allclose(mixed[:, :, -2:], pooled[:, :, -2:])


def test_the_final_block_keeps_a_key_block_only_its_last_query_reads():
    """A needle: one key that only the last query matches, while the block's other queries read a
    decoy. Their mean asks for the decoy alone; the block's own queries ask for both, and its list
    keeps the needle's block too."""
    n, length, dim = 16, 160, 16
    g = torch.Generator().manual_seed(13)
    query, key = torch.randn(1, 1, length, dim, generator=g) * 0.1, torch.randn(1, 1, length, dim, generator=g) * 0.1
    needle, decoy = torch.eye(dim)[0], torch.eye(dim)[1]
    key[0, 0, 37], key[0, 0, 90] = needle * 8, decoy * 8  # key blocks 2 and 5
    query[0, 0, -16:-1] += decoy * 8 - needle * 0.6  # the final block's queries read the decoy ...
    query[0, 0, -1] = needle * 8  # ... but its last one the needle
    first = torch.zeros(1, 1, dtype=torch.long)

    def last_list(scores):
        index = block_index(scores, 10, 10, first, sink=1, local=1, density=0.4)  # 4 blocks: 2 scored
        return {int(x) for x in index[0, 0, -1] if x >= 0}

    pooled = last_list(pooled_query_scores(query, key, None, 1.0, n))
    assert {0, 5, 9} <= pooled and 2 not in pooled
    assert last_list(pooled_query_scores(query, key, None, 1.0, n, last_queries=16)) == {0, 2, 5, 9}
