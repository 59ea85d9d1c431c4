"""kvx search-patterns: the recall it measures is the share of dense attention inside the blocks the
method computes (checked by brute force), a planted local head gets a_shape and a planted vertical
head a dynamic pattern, the budget holds, and the command writes a file head_patterns reads."""

import math

import pytest
import torch

import kvx
from kvx.cli import main
from kvx.eval import search_patterns as sp
from kvx.eval.haystack import build_tokenizer
from kvx.kernels.block_index import first_real_block
from kvx.kernels.reference import block_grid
from kvx.methods._pattern_file import PATTERNS, load_patterns
from kvx.methods.head_patterns import head_lists
from kvx.policies._head_scores import model_identity
from kvx.tiny import tiny_model

N = 16  # block size
T = 256  # tokens: 16 blocks
COLUMNS = (40, 100, 170)  # the vertical head's keys (blocks 2, 6, 10)


def planted_heads() -> tuple[torch.Tensor, torch.Tensor]:
    """``query [1, 2, T, 8]``, ``keys [1, 2, T, 8]`` (one query head per KV head): head 0 attends to
    the last few tokens (``q_i . k_j = c cos(theta (i - j))``, sharp at ``j = i``), head 1 to the
    keys in :data:`COLUMNS` whichever the query (a vertical pattern)."""
    pos = torch.arange(T, dtype=torch.float32)
    theta = math.pi / T
    query, keys = torch.zeros(1, 2, T, 8), torch.zeros(1, 2, T, 8)
    query[0, 0, :, 0], query[0, 0, :, 1] = 3000 * torch.cos(theta * pos), 3000 * torch.sin(theta * pos)
    keys[0, 0, :, 0], keys[0, 0, :, 1] = torch.cos(theta * pos), torch.sin(theta * pos)
    query[0, 1, :, 2] = 1.0
    keys[0, 1, list(COLUMNS), 2] = 60.0
    return query, keys


def brute_force_recall(query, keys, index) -> torch.Tensor:
    """``[H]`` the share of each head's dense causal attention (a ``T x T`` softmax in float64) inside
    the blocks of ``index [1, H, Qb, K]``, with the blocks expanded to a token mask by hand."""
    logits = query[0].double() @ keys[0].double().transpose(-1, -2) * query.shape[-1] ** -0.5  # [H, T, T]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    probs = torch.softmax(logits.masked_fill(~causal, -torch.inf), -1)
    shares = []
    for h in range(query.shape[1]):
        kept = torch.zeros(T, T, dtype=torch.bool)
        for qb in range(index.shape[2]):
            for kb in index[0, h, qb].tolist():
                if kb >= 0:
                    kept[qb * N:(qb + 1) * N, kb * N:(kb + 1) * N] = True
        shares.append(float((probs[h] * kept).sum() / T))
    return torch.tensor(shares, dtype=torch.float64)


@pytest.fixture(scope="module")
def planted():
    query, keys = planted_heads()
    settings = sp.SearchSettings(density=0.5, block_size=N, lengths=(T,), depths=(0,), sizes=(1,), queries="all")
    cands = sp.candidates(settings)
    recall, computed = sp.candidate_stats(query, keys, 8 ** -0.5, None, settings, cands)
    return query, keys, settings, cands, recall, computed


def test_recall_is_the_share_of_dense_attention_in_the_methods_blocks(planted):
    query, keys, settings, cands, recall, computed = planted
    num_qb, num_kb, _ = block_grid(T, T, N)
    first = first_real_block(None, 1, 2, T, N, query.device)
    causal = num_kb * (num_kb + 1) // 2
    for c, cand in enumerate(cands):
        kind = torch.full((2,), PATTERNS.index(cand.pattern))
        index = head_lists(kind, torch.full((2,), cand.local), torch.full((2,), cand.density), query, keys, None,
                           8 ** -0.5, None, N, settings.sink, settings.last_queries, num_qb, num_kb, first)
        torch.testing.assert_close(recall[:, c].double(), brute_force_recall(query, keys, index), atol=1e-5, rtol=0)
        torch.testing.assert_close(computed[:, c], (index >= 0).sum((-1, -2))[0].float() / causal)


def test_the_mass_is_the_same_in_query_chunks_and_counts_the_last_queries_alone_with_queries_last(planted):
    query, keys = planted[:2]
    mass = sp.attention_mass(query, keys, 8 ** -0.5, None, N)
    torch.testing.assert_close(sp.attention_mass(query, keys, 8 ** -0.5, None, N, chunk_elements=2 * 37 * T), mass)
    assert torch.allclose(mass.sum((-1, -2)), torch.tensor(float(T)))
    last = sp.attention_mass(query, keys, 8 ** -0.5, None, N, last=40)
    torch.testing.assert_close(last[:, :, -2:], mass[:, :, -2:])  # the last 2 query blocks (32 queries)
    assert torch.allclose(last.sum((-1, -2)), torch.tensor(40.0)) and last[:, :, :-3].abs().sum() == 0


def test_a_local_head_gets_a_shape_and_a_vertical_head_a_dynamic_pattern(planted):
    query, keys, settings, cands, recall, computed = planted
    labels = [c.label for c in cands]
    assert labels == ["a_shape:local=3", "vertical_slash:density=0.5", "block_topk:density=0.5"]
    assert recall[0].min() > 0.99  # the local head: every pattern keeps it
    assert recall[1, 0] < 0.5 < 0.85 < recall[1, 1:].min()  # the vertical head: a_shape misses its columns
    chosen = sp.choose_patterns(recall[None], computed[None], cands, settings, {"model_type": "planted"})
    assert chosen.names() == [["a_shape", "vertical_slash"]]  # the local head at the cheaper, equal recall
    assert chosen.local[0, 0] == 3 and chosen.density[0, 1] == 0.5
    torch.testing.assert_close(chosen.recall[0], torch.stack([recall[0, 0], recall[1, 1]]))


def test_sizes_spread_a_budget_over_heads_by_recall():
    """Two heads, each at density d or 2d: the one that gains more from 2d gets it, within budget."""
    recall = torch.tensor([[0.50, 0.90], [0.80, 0.82], [0.70, 0.75]])  # [heads, (d, 2d)]
    computed = torch.tensor([[0.1, 0.2], [0.1, 0.2], [0.1, 0.2]])
    assert sp.allocate(recall, computed, 0.1).tolist() == [0, 0, 0]
    assert sp.allocate(recall, computed, 0.14).tolist() == [1, 0, 0]  # head 0 gains 0.4 for 0.1
    assert sp.allocate(recall, computed, 0.17).tolist() == [1, 0, 1]  # then head 2 (0.05 > 0.02)
    assert sp.allocate(recall, computed, 1.0).tolist() == [1, 1, 1]
    assert sp.allocate(recall, computed, 0.01).tolist() == [0, 0, 0]  # unreachable: the cheapest


def test_the_search_on_a_tiny_model_matches_the_recall_of_each_layer(monkeypatch):
    """The file's recall tables are the per-layer recalls of the captured queries and keys, averaged
    over the prompts; each choice is the allocation of those tables; the budget holds."""
    tokenizer = build_tokenizer()
    model = tiny_model("llama", vocab_size=len(tokenizer), num_hidden_layers=2)
    settings = sp.SearchSettings(density=0.3, block_size=N, lengths=(160, 200), depths=(50,), sizes=(0.5, 1, 2))
    captured = {}

    class Capture(sp.RecallProbe):
        def select_mask(self, view):
            captured.setdefault(view.layer_idx, []).append((view.query.clone(), view.keys.clone(), view.scaling))
            return super().select_mask(view)

    monkeypatch.setattr(sp, "RecallProbe", Capture)
    result = sp.search_patterns(model, tokenizer, settings, progress=False)
    cands = sp.candidates(settings)
    for layer, calls in captured.items():
        stats = [sp.candidate_stats(q, k, s, None, settings, cands) for q, k, s in calls]
        torch.testing.assert_close(result.candidate_recall[layer], sum(r for r, _ in stats) / len(stats))
        torch.testing.assert_close(result.candidate_computed[layer], sum(c for _, c in stats) / len(stats))
    flat = result.candidate_recall.reshape(-1, len(cands))
    computed = result.candidate_computed.reshape(-1, len(cands))
    choice = sp.allocate(flat, computed, result.settings["budget"])
    assert [[PATTERNS.index(cands[c].pattern) for c in choice.tolist()]] == [result.pattern.flatten().tolist()]
    assert float(result.computed.mean()) <= result.settings["budget"] + 1e-6
    assert result.model == model_identity(model)


def test_cli_writes_a_pattern_file_that_head_patterns_runs(tmp_path, capsys):
    tokenizer = build_tokenizer()
    model = tiny_model("llama", vocab_size=len(tokenizer))
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "patterns.safetensors"
    assert main(["search-patterns", str(model_dir), "--out", str(out), "--block-size", "16", "--lengths", "200",
                 "--depths", "0,100", "--density", "0.3", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "layer 1: h0 " in printed and f"wrote {out}" in printed and "head_patterns:patterns=" in printed
    patterns = load_patterns(out)
    assert patterns.pattern.shape == (2, 4) and patterns.settings["prompts"] == 2
    assert patterns.settings["block_size"] == 16 and patterns.model["model_type"] == "llama"
    assert main(["needle", "--model", str(model_dir), "--lengths", "200", "--depths", "50", "--no-dense",
                 "--policy", f"head_patterns:patterns={out},block_size=16,min_length=0", "--out",
                 str(tmp_path / "needle"), "--no-progress"]) == 0
    text = tmp_path / "calibration.txt"
    text.write_text(" ".join(["The old river crossed the stone near the bridge ."] * 40))
    assert main(["search-patterns", str(model_dir), "--out", str(tmp_path / "text.safetensors"), "--block-size",
                 "16", "--lengths", "128", "--samples", "2", "--text", str(text), "--no-progress"]) == 0
    assert load_patterns(tmp_path / "text.safetensors").settings["prompts"] == 2
    capsys.readouterr()
    assert main(["search-patterns", str(model_dir), "--out", str(tmp_path / "t.safetensors"), "--block-size", "16",
                 "--lengths", "1k", "--text", str(text), "--no-progress"]) == 2
    assert "tokens, fewer than the longest --lengths (1024)" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--out", "p.txt"], "give a .safetensors file name"),
    (["--density", "0"], "density must be"),
    (["--block-size", "24"], "block_size"),
    (["--candidates", "a_shape,h2o"], "candidate patterns must be among a_shape, vertical_slash, block_topk; got h2o"),
    (["--lengths", "16"], "shorter than two blocks"),
    (["--text", "missing.txt"], "--text missing.txt: no such file"),
    (["--queries", "first"], "invalid choice: 'first'"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    base = ["search-patterns", "--out", "p.safetensors"]
    assert main(base + args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_help_explains_the_command(capsys):
    with pytest.raises(SystemExit):
        kvx.cli.build_parser().parse_args(["search-patterns", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for phrase in ("recall", "share of the attention mass", "head_patterns:patterns=OUT", "--sizes", "--text",
                   "schema version"):
        assert phrase in text
