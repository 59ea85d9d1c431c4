"""scripts/train_needle_model.py: a tiny preset trains in seconds, and a run stopped at a
checkpoint and resumed ends with the same weights, log and RNG as one that never stopped."""

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "train_needle_model.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_needle_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_presets_have_the_shapes_they_promise(script):
    keys = script.PRESETS["keys"]
    assert keys.model["num_hidden_layers"] >= 4 and keys.model["num_key_value_heads"] >= 4
    assert keys.model["num_attention_heads"] > keys.model["num_key_value_heads"]  # GQA
    assert max(st.max_len for st in keys.stages) >= 4096  # 2x length generalisation reaches 8K
    assert keys.stages[0].variant_weights[1:] == (0.0, 0.0, 0.0)  # a copy circuit before any distractor
    with_keys = [st for st in keys.stages if st.variant_weights[1] > 0]
    assert all(st.number_rate > 0 for st in with_keys)  # "copy the only number" never answers a multikey prompt
    lows = [st.distractors for st in keys.stages if st.variant_weights[1] > 0]
    assert lows[0] == (1, 1) and all(a[1] <= b[1] for a, b in zip(lows, lows[1:]))  # distractors rise slowly


@pytest.mark.parametrize("name", ["needle-llama", "keys", "tiny"])
def test_every_stage_fits_its_longest_prompt(script, name):
    """The shortest length of a stage holds its most needles, question and answer (else it fails hours in)."""
    tok = script.build_tokenizer()
    for stage in script.PRESETS[name].stages:
        for variant, weight in zip(script.VARIANTS, stage.variant_weights):
            if not weight:
                continue
            spec = script.make_needles(variant, random.Random(0), distractors=stage.distractors[1],
                                       values=stage.values[1])
            answer = len(tok(" " + spec.answer_text, add_special_tokens=False)["input_ids"]) + 1
            script.build_prompt(tok, stage.min_len - answer, 50, spec, random.Random(0))
    preset = script.PRESETS[name]
    for stage in preset.stages:  # the in-stage check runs at the stage's longest length
        for variant in preset.eval_variants:
            spec = script.make_needles(variant, random.Random(0), distractors=preset.eval_distractors, values=3)
            script.build_prompt(tok, stage.max_len - 12, 50, spec, random.Random(0))


def test_sample_batch_follows_the_stage(script):
    tok = script.build_tokenizer()
    stage = script.Stage(steps=1, min_len=70, max_len=70, batch=3, lr=1e-3, variant_weights=(0, 1, 0, 0),
                         distractors=(2, 2))
    ids, labels = script.sample_batch(tok, stage, random.Random(0))
    assert ids.shape == labels.shape == (3, 70)
    for row, lab in zip(ids, labels):
        text = tok.decode(row.tolist())
        assert text.count("magic number for") == 5  # 3 needles, the question, the answer prefix
        answer = lab[lab != -100].tolist()
        assert answer[-1] == tok.eos_token_id and row[-len(answer):].tolist() == answer


def test_repeated_paragraph_filler(script):
    """repeat_rate 1: every prompt's filler is one short paragraph repeated (the induction-head signal)."""
    tok = script.build_tokenizer()
    stage = script.Stage(steps=1, min_len=200, max_len=200, batch=2, lr=1e-3, variant_weights=(1, 0, 0, 0),
                         repeat_rate=1.0, repeat_sentences=(2, 2))
    ids, _ = script.sample_batch(tok, stage, random.Random(0))
    for row in ids:
        sentences = tok.decode(row.tolist()).split(" . ")
        filler = [x for x in sentences[1:-3] if "magic" not in x]
        assert len(filler) > 6 and len(set(filler)) <= 3  # two sentences, over and over (one cut by a needle)


def test_resume_continues_identically(script, tmp_path):
    tiny = script.PRESETS["tiny"]
    straight = script.train(tiny, tmp_path / "a", seed=3, checkpoint_dir=tmp_path / "ca", checkpoint_every=2,
                            verbose=False)
    # stopped after 5 steps (mid stage 1, between checkpoints), then the same command again
    script.train(tiny, tmp_path / "b", seed=3, checkpoint_dir=tmp_path / "cb", checkpoint_every=2,
                 stop_after=5, verbose=False)
    state = torch.load(tmp_path / "cb" / script.CHECKPOINT, weights_only=False)
    assert (state["stage"], state["step"]) == (1, 1) and state["optimizer"]["state"]
    resumed = script.train(tiny, tmp_path / "b", seed=3, checkpoint_dir=tmp_path / "cb", checkpoint_every=2,
                           verbose=False)
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = lambda d: [json.loads(x) for x in (d / "training_log.jsonl").read_text().splitlines()]  # noqa: E731
    strip = lambda r: {k: v for k, v in r.items() if k != "minutes"}  # noqa: E731
    a_rows, b_rows = rows(tmp_path / "a"), rows(tmp_path / "b")
    assert [strip(r) for r in b_rows if "resumed" not in r] == [strip(r) for r in a_rows]
    assert any("eval" in r and set(r["eval"]) == {"multikey", "absent"} for r in a_rows)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "README.md"):
        assert (tmp_path / "b" / name).exists()
    final = torch.load(tmp_path / "cb" / script.CHECKPOINT, weights_only=False)
    assert final["stage"] == len(tiny.stages)


def test_a_checkpoint_of_other_settings_is_refused_and_one_exports(script, tmp_path):
    tiny = script.PRESETS["tiny"]
    model = script.train(tiny, tmp_path / "m", seed=1, checkpoint_dir=tmp_path / "c", stop_after=1, verbose=False)
    script.export_checkpoint(tiny, tmp_path / "c", tmp_path / "x", seed=1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "x")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert len(AutoTokenizer.from_pretrained(tmp_path / "x")) == loaded.config.vocab_size
    with pytest.raises(SystemExit, match="seed"):
        script.train(tiny, tmp_path / "m", seed=2, checkpoint_dir=tmp_path / "c", verbose=False)
    edited = script.Preset(**{**script.asdict(tiny), "stages": tiny.stages[:1]})  # same name, other curriculum
    with pytest.raises(SystemExit, match="digest"):
        script.train(edited, tmp_path / "m", seed=1, checkpoint_dir=tmp_path / "c", verbose=False)
