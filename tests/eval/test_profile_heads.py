"""kvx profile-heads: it finds copy heads planted by hand in a tiny model, and the retrieval head of
the shipped needle model; with that pattern, retrieval_heads keeps the needle at about half the bytes."""

import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import kvx
from kvx.cli import main
from kvx.eval import needle
from kvx.eval.haystack import build_tokenizer
from kvx.eval.profile_heads import ProfileSettings, copy_prompt, profile_heads, ranked_heads
from kvx.policies._head_scores import load_scores
from kvx.tiny import tiny_model

PLANTED = [(1, 1), (2, 0)]  # (layer, KV head) made to copy
HEAD_DIM = 16
CONTENT_DIMS = [5, 6, 7, 13, 14, 15]  # RoPE pairs 5-7: rotate < 0.2 rad over 1K tokens at theta 1e6


def plant_copy_heads(tokenizer) -> torch.nn.Module:
    """A 3-layer tiny llama where the heads in :data:`PLANTED` are induction (copy) heads, by hand:

    - embeddings: the 10 digits and ``is`` are +-e_i on residual dims 0-5 (identity), every token has
      1 on dim 63 (a constant) and other tokens 1 on one of dims 32-62 (so all have the same norm);
    - layer 0, KV head 0 (query heads 0, 1) attends to the previous token by position alone: keys
      are the constant, queries the constant rotated back by one position in RoPE pairs 0-3; its
      value copies the identity, and query head 0's output writes it to dims 16-21 ("previous token");
    - each planted head's query reads the current token's identity and its key the previous token's,
      in low-frequency RoPE pairs, so it attends to the token after an earlier occurrence of the current
      one: the next needle token, the one being copied.

    MLPs and every other head's output are zeroed; the other heads keep their random q/k."""
    model = tiny_model("llama", num_hidden_layers=3, vocab_size=len(tokenizer),
                       rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    special = tokenizer.convert_tokens_to_ids([str(d) for d in range(10)] + ["is"])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        emb = torch.zeros(len(tokenizer), 64)
        emb[:, 63] = 1
        emb[torch.arange(len(tokenizer)), 32 + torch.randint(0, 31, (len(tokenizer),), generator=gen)] = 1
        for i, token in enumerate(special):
            emb[token, 32:63] = 0
            emb[token, i % 6] = 1 if i < 6 else -1
        model.model.embed_tokens.weight.copy_(emb)
        theta = 1e6 ** (-torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.zero_()
            layer.self_attn.o_proj.weight.zero_()
        attn0 = model.model.layers[0].self_attn
        for f in range(4):  # previous-token head: q . k = 4 sum_f cos(theta_f (i - j - 1)), largest at j = i - 1
            attn0.k_proj.weight[f].zero_()
            attn0.k_proj.weight[f, 63] = 2.0
            for head in (0, 1):
                attn0.q_proj.weight[head * HEAD_DIM + f].zero_()
                attn0.q_proj.weight[head * HEAD_DIM + f + 8].zero_()
                attn0.q_proj.weight[head * HEAD_DIM + f, 63] = 2.0 * math.cos(theta[f])
                attn0.q_proj.weight[head * HEAD_DIM + f + 8, 63] = -2.0 * math.sin(theta[f])
        attn0.v_proj.weight[:6].zero_()
        attn0.v_proj.weight[:6, :6] = torch.eye(6) / 5.66  # undo RMSNorm's scale: identity of size 1
        attn0.o_proj.weight[16:22, :6] = torch.eye(6)
        for layer_idx, kv_head in PLANTED:
            attn = model.model.layers[layer_idx].self_attn
            for i, dim in enumerate(CONTENT_DIMS):
                attn.k_proj.weight[kv_head * HEAD_DIM + dim].zero_()
                attn.k_proj.weight[kv_head * HEAD_DIM + dim, 16 + i] = 2.0
                for head in (2 * kv_head, 2 * kv_head + 1):
                    attn.q_proj.weight[head * HEAD_DIM + dim].zero_()
                    attn.q_proj.weight[head * HEAD_DIM + dim, i] = 2.0
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_copy_prompt_targets_are_the_needle_value(tokenizer):
    prompt = copy_prompt(tokenizer, 300, 50, random.Random(0), 0.25)
    start, stop = prompt.needle
    value = tokenizer.decode(prompt.targets).replace(" ", "")
    assert len(value) == 4 and value in tokenizer.decode(prompt.ids[start:stop]).replace(" ", "")
    assert prompt.ids[-3:] == prompt.targets[:3] and len(prompt.ids) == 300 + 3


def test_profiler_ranks_planted_copy_heads_first(tokenizer):
    model = plant_copy_heads(tokenizer)
    settings = ProfileSettings(lengths=(256, 512), depths=(0, 50, 100), samples=2, number_rate=0.0)
    scores = profile_heads(model, tokenizer, settings, progress=False)
    assert set(ranked_heads(scores.scores)[:2]) == set(PLANTED)
    planted = torch.tensor([scores.scores[layer, head] for layer, head in PLANTED])
    others = [scores.scores[layer, head] for layer in range(3) for head in range(2) if (layer, head) not in PLANTED]
    assert planted.min() >= 0.5 and max(others) <= 0.25, scores.scores


@pytest.fixture(scope="module")
def shipped():
    model = AutoModelForCausalLM.from_pretrained(needle.DEFAULT_MODEL).eval()
    return model, AutoTokenizer.from_pretrained(needle.DEFAULT_MODEL)


def test_cli_profiles_the_shipped_model_and_its_last_layer_retrieves(tmp_path, capsys):
    out = tmp_path / "needle.safetensors"
    assert main(["profile-heads", str(needle.DEFAULT_MODEL), "--out", str(out), "--lengths", "512,1k",
                 "--depths", "0,50,100", "--samples", "1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "top 6: L2." in printed and out.with_suffix(".png").stat().st_size > 1000
    scores = load_scores(out)
    assert scores.settings["lengths"] == [512, 1024] and scores.model["num_hidden_layers"] == 3
    best = ranked_heads(scores.scores)[0]
    assert best[0] == 2 and scores.scores[best] >= 0.5  # the model card: the copy happens in the last layer
    assert scores.scores[:2].max() < scores.scores[best] / 2


def test_half_retrieval_heads_keep_the_needle_at_about_half_the_bytes(shipped, tmp_path):
    model, tokenizer = shipped
    pattern = profile_heads(model, tokenizer, ProfileSettings(lengths=(512,), depths=(0, 50, 100), samples=1),
                            progress=False).save(tmp_path / "heads.safetensors")
    runs = needle.parse_policies([f"retrieval_heads:pattern={pattern},ratio=0.5,sink=64,recent=256"], [])
    config = needle.NeedleConfig(lengths=[2048], depths=[0, 60], samples=1, policies=runs)
    rows = needle.NeedleRunner(model, tokenizer, config, tmp_path / "run").run(progress=False)
    dense, compressed = ([r for r in rows if r["policy"] == run.label] for run in runs)
    assert len(dense) == len(compressed) == 2
    assert [r["answer"] for r in compressed] == [r["answer"] for r in dense]
    assert all(r["score"] == 1.0 for r in compressed)
    ratio = sum(r["kv_bytes"] for r in compressed) / sum(r["kv_bytes"] for r in dense)
    assert ratio <= (3 * 2048 + 3 * (64 + 256 + 16)) / (6 * 2048) + 0.01  # 3 of 6 heads keep everything


def test_duo_gates_keep_the_shipped_models_retrieval_head_open(tmp_path, capsys):
    out = tmp_path / "duo.safetensors"
    assert main(["profile-heads", "--method", "duo", "--out", str(out), "--lengths", "256", "--steps", "12",
                 "--sink", "16", "--recent", "48", "--lr", "0.15", "--no-progress"]) == 0
    scores = load_scores(out)
    assert scores.method == "duo" and scores.settings["steps"] == 12
    gates = scores.scores
    assert ((gates >= 0) & (gates <= 1)).all()
    assert gates[2, 0] > 0.5 > gates[2, 1]  # the last layer's copy head stays full; its neighbour streams


def test_bad_inputs_are_clear_errors(tokenizer, shipped, tmp_path, capsys):
    from test_bad_inputs import cli_error

    assert "give a .safetensors file name" in cli_error(["profile-heads", "--out", str(tmp_path / "x.txt")], capsys)
    planted = profile_heads(plant_copy_heads(tokenizer), tokenizer, ProfileSettings((128,), (50,), 1, number_rate=0.0),
                            progress=False).save(tmp_path / "planted.safetensors")
    with pytest.raises(ValueError, match="profiled on another model.*hidden_size: pattern 64, model 128"):
        kvx.patch(shipped[0], "retrieval_heads", pattern=str(planted))
    base = ["needle", "--lengths", "512", "--depths", "50", "--out", str(tmp_path / "run"), "--no-progress"]
    assert "profiled on another model" in cli_error(base + ["--policy", f"retrieval_heads:pattern={planted}"], capsys)
    assert "ratio must be a number in (0, 1]" in cli_error(base + ["--policy", "retrieval_heads:ratio=1.5"], capsys)
