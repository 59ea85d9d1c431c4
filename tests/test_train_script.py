"""scripts/train_needle_model.py: a tiny preset trains in seconds, and a run stopped at a
checkpoint and resumed ends with the same weights, log and RNG as one that never stopped."""

import importlib.util
import json
import random
import re
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


@pytest.mark.parametrize("name", ["needle-llama", "keys", "keys-gpu", "keys-large", "keys-rope", "tiny"])
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


def test_rehearsal_draws_that_share_of_batches_from_the_other_stage(script):
    """rehearsal_rate 0.5: about half the batches have the rehearsal stage's length and batch size;
    0 draws nothing (the batches of a stage without rehearsal stay what they were)."""
    tok = script.build_tokenizer()
    short = script.Stage(steps=1, min_len=60, max_len=60, batch=5, lr=1e-3, variant_weights=(1, 0, 0, 0))
    long = script.Stage(steps=1, min_len=150, max_len=150, batch=2, lr=1e-3, variant_weights=(1, 0, 0, 0),
                        rehearsal=short, rehearsal_rate=0.5)
    shapes = [tuple(script.sample_batch(tok, long, random.Random(i))[0].shape) for i in range(40)]
    assert set(shapes) == {(5, 60), (2, 150)} and 10 <= shapes.count((5, 60)) <= 30
    plain = script.Stage(steps=1, min_len=150, max_len=150, batch=2, lr=1e-3, variant_weights=(1, 0, 0, 0))
    unused = script.Stage(steps=1, min_len=150, max_len=150, batch=2, lr=1e-3, variant_weights=(1, 0, 0, 0),
                          rehearsal=short, rehearsal_rate=0.0)
    assert torch.equal(script.sample_batch(tok, plain, random.Random(3))[0],
                       script.sample_batch(tok, unused, random.Random(3))[0])
    with pytest.raises(ValueError, match="rehearsal stage"):
        script.Stage(steps=1, min_len=60, max_len=60, batch=1, lr=1e-3, rehearsal_rate=0.2)


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
    strip = lambda r: {k: v for k, v in r.items() if k not in ("minutes", "data_wait")}  # timings  # noqa: E731
    a_rows, b_rows = rows(tmp_path / "a"), rows(tmp_path / "b")
    assert [strip(r) for r in b_rows if "resumed" not in r] == [strip(r) for r in a_rows]
    assert any("eval" in r and set(r["eval"]) == {"multikey", "absent", "induction"} for r in a_rows)
    assert all(0 <= r["data_wait"] <= 1 for r in a_rows if "loss" in r)  # the share of time spent waiting for batches
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


def test_further_questions_follow_the_runners_prompt(script):
    """questions (n, n): the runner's prompt and its answer, then n more questions about other keys of the
    context (their value) or absent keys ("none"), each answered and ended by EOS; rows padded at the end."""
    tok = script.build_tokenizer()
    stage = script.Stage(steps=1, min_len=120, max_len=120, batch=6, lr=1e-3, variant_weights=(0, 1, 0, 1),
                         distractors=(3, 3), questions=(3, 3))
    ids, labels = script.sample_batch(tok, stage, random.Random(4))
    assert ids.shape == labels.shape and ids.shape[1] > 120
    kinds = set()
    for row, lab in zip(ids.tolist(), labels.tolist()):
        end = len(row) - (row[::-1].index(tok.eos_token_id))  # after the last EOS: padding only
        assert all(t == tok.pad_token_id for t in row[end:]) and all(x == -100 for x in lab[end:])
        first_eos = row.index(tok.eos_token_id)
        head = tok.decode(row[:first_eos + 1])
        assert head.count("Question") == 1  # the first 120 tokens and the answer: the runner's prompt, answered
        needles = dict(re.findall(r"magic number for (\w+) is (\d \d \d \d) \.", head.split("Question")[0]))
        qas = re.findall(r"magic number for (\w+) \? Answer : The special magic number for \1 is ([\d ]+|none) \.",
                         tok.decode(row[first_eos:end]))
        assert len(qas) == 3 and len({k for k, _ in qas}) == 3
        asked = re.search(r"magic number for (\w+) \?", head).group(1)
        for key, answer in qas:
            assert key != asked and answer == needles.get(key, "none")
            kinds.add("value" if key in needles else "none")
        answers = [t for t, x in zip(row, lab) if x != -100]
        assert answers == [x for x in lab if x != -100] and answers.count(tok.eos_token_id) == 4
    assert kinds == {"value", "none"}


def test_padding_is_left_out_of_the_loss(script):
    tok = script.build_tokenizer()
    torch.manual_seed(0)
    model = script.build_model(tok, script.PRESETS["tiny"]).eval()
    stage = script.Stage(steps=1, min_len=60, max_len=60, batch=1, lr=1e-3, variant_weights=(0, 1, 0, 0),
                         distractors=(1, 1), questions=(1, 1))
    ids, labels = script.sample_batch(tok, stage, random.Random(0))
    padded = torch.cat([ids, torch.full((1, 7), tok.pad_token_id)], 1)
    padded_labels = torch.cat([labels, torch.full((1, 7), -100)], 1)
    with torch.no_grad():
        a = script.training_loss(model, ids, labels, 0.2, tok.pad_token_id)
        b = script.training_loss(model, padded, padded_labels, 0.2, tok.pad_token_id)
    assert torch.allclose(a, b, atol=1e-5)


def test_answer_exact_counts_whole_answers(script):
    """answer_acc is token level; answer_exact counts an answer only when every token of it is right:
    a wrong first digit (the key missed, the rest copied) costs one token but the whole answer."""

    class Fixed(torch.nn.Module):
        def __init__(self, predicted):
            super().__init__()
            self.predicted = predicted

        def forward(self, ids):
            logits = torch.nn.functional.one_hot(self.predicted, 20).float()
            return type("Out", (), {"logits": logits})()

    ids = torch.tensor([[1, 2, 5, 6, 7, 8, 3, 4, 9, 9]])
    labels = torch.tensor([[-100, -100, 5, 6, 7, 8, -100, -100, 9, 9]])  # two answers: 5 6 7 8 and 9 9
    predicted = torch.roll(ids, -1, 1).clone()  # right everywhere
    predicted[0, 1] = 0  # the first answer's first token wrong
    acc, exact = script.answer_accuracy(Fixed(predicted), ids, labels)
    assert acc == pytest.approx(5 / 6) and exact == 0.5


def test_warm_start_from_a_saved_model_at_a_later_stage(script, tmp_path):
    tiny = script.PRESETS["tiny"]
    first = script.build_model(script.build_tokenizer(), tiny)
    first.save_pretrained(tmp_path / "a")
    warm = script.train(tiny, tmp_path / "b", seed=0, init_from=tmp_path / "a", start_stage=1,
                        checkpoint_dir=tmp_path / "c", verbose=False)
    rows = [json.loads(x) for x in (tmp_path / "b" / "training_log.jsonl").read_text().splitlines()]
    assert rows[0]["init_from"] == str(tmp_path / "a") and rows[0]["start_stage"] == 1
    assert {r["stage"] for r in rows[1:]} == {1}  # stage 0 not run again
    assert not all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), warm.state_dict().values()))
    assert torch.load(tmp_path / "c" / script.CHECKPOINT, weights_only=False)["stage"] == len(tiny.stages)
    with pytest.raises(SystemExit, match="start-stage"):
        script.train(tiny, tmp_path / "d", start_stage=len(tiny.stages), verbose=False)


def test_induction_probe_reads_two_gram_copying(script):
    """A model that copies the repeated paragraph scores 1; one that never predicts it, 0."""
    tok = script.build_tokenizer()

    class Oracle(torch.nn.Module):  # copies the token one paragraph back (perfect induction)
        def forward(self, ids):
            out = torch.zeros(*ids.shape, len(tok))
            for b, row in enumerate(ids.tolist()):
                period = next(p for p in range(1, len(row)) if row[p:] == row[:-p])
                for t in range(period - 1, len(row) - 1):
                    out[b, t, row[t + 1 - period]] = 1
            return type("Out", (), {"logits": out})()

    assert script.induction_accuracy(Oracle(), tok, 2, 0, "cpu", length=100) == 1.0

    class Never(torch.nn.Module):
        def forward(self, ids):
            return type("Out", (), {"logits": torch.zeros(*ids.shape, len(tok))})()  # always token 0 (<pad>)

    assert script.induction_accuracy(Never(), tok, 2, 0, "cpu", length=100) == 0.0


def test_init_from_loads_weights_only_under_the_presets_config(script, tmp_path):
    tiny = script.PRESETS["tiny"]
    tok = script.build_tokenizer()
    script.build_model(tok, tiny).save_pretrained(tmp_path / "m")  # RoPE base 1e4
    other = script.Preset(**{**script.asdict(tiny), "model": {**tiny.model, "rope_theta": 500.0}})
    loaded = script.build_model(tok, other, init_from=tmp_path / "m")
    from transformers import LlamaForCausalLM

    saved = LlamaForCausalLM.from_pretrained(tmp_path / "m")
    assert loaded.config.rope_parameters["rope_theta"] == 500.0
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), loaded.state_dict().values()))


def test_gpu_presets_reach_8k_and_fit_the_size_limit(script):
    for name in ("keys-gpu", "keys-large"):
        preset = script.PRESETS[name]
        assert max(st.max_len for st in preset.stages) >= 8192
        model = script.build_model(script.build_tokenizer(), preset)
        assert sum(p.numel() for p in model.parameters()) * 4 < 20e6  # shipped in fp32 under 20 MB
    # the GPU curriculum continues the keys model: same shape, stages 4.. are its length stages
    assert script.PRESETS["keys-gpu"].model == script.PRESETS["keys"].model
    assert script.PRESETS["keys-gpu"].stages[4].min_len > script.PRESETS["keys-gpu"].stages[3].max_len


def test_time_shares_follow_planned_tokens(script):
    stages = [script.Stage(steps=10, min_len=100, max_len=100, batch=2, lr=1e-3),
              script.Stage(steps=10, min_len=300, max_len=500, batch=1, lr=1e-3)]
    assert script.time_shares(stages, 0, 0) == pytest.approx([2000 / 6000, 4000 / 6000])
    assert script.time_shares(stages, 0, 5) == pytest.approx([1000 / 5000, 4000 / 5000])  # resumed mid stage 0
    assert script.time_shares(stages, 1, 0) == pytest.approx([0.0, 1.0])


def test_batches_are_the_same_from_workers(script, monkeypatch):
    """Batches are seeded per step: drawn by worker processes (ahead of the loop) they are the ones
    drawn here, so --workers changes the speed and nothing else."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # spawned workers import the script by its name
    tok = script.build_tokenizer()
    stage = script.PRESETS["tiny"].stages[1]
    here = script.batches(tok, stage, 5, 1, 3)
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(2, initializer=script._start_worker) as pool:
        there = script.batches(tok, stage, 5, 1, 3, pool, ahead=3)
        for _ in range(4):
            (a_ids, a_lab), (b_ids, b_lab) = next(here), next(there)
            assert torch.equal(a_ids, b_ids) and torch.equal(a_lab, b_lab)
    first, second = next(script.batches(tok, stage, 5, 1, 3)), next(script.batches(tok, stage, 5, 1, 4))
    assert not torch.equal(first[0], second[0])  # each step its own batch


def test_a_time_box_ends_each_stage_by_its_time(script, tmp_path):
    """A time box shorter than one step: every stage runs exactly one step (its time is spent, and a
    stage always takes one), its learning rate from the time spent; the log says so."""
    tiny = script.PRESETS["tiny"]
    script.train(tiny, tmp_path / "m", seed=0, minutes=1e-7, verbose=False)
    rows = [json.loads(x) for x in (tmp_path / "m" / "training_log.jsonl").read_text().splitlines()]
    assert {"minutes_box": 1e-7, "workers": 0} in rows
    assert [r["steps_done"] for r in rows if r.get("done")] == [1] * len(tiny.stages)
    assert max(st.steps for st in tiny.stages) > 1


@pytest.mark.parametrize("flag, value", [("--minutes", "0"), ("--minutes", "-2"), ("--workers", "-1")])
def test_bad_time_box_or_workers_are_refused_by_name(script, tmp_path, monkeypatch, capsys, flag, value):
    monkeypatch.setattr(sys, "argv", ["train_needle_model.py", "--preset", "tiny", "--out", str(tmp_path / "m"),
                                      flag, value])
    with pytest.raises(SystemExit) as stop:
        script.main()
    assert stop.value.code == 2
    assert f"{flag} must be" in capsys.readouterr().err and not (tmp_path / "m").exists()


def test_profile_reports_where_a_step_goes_and_saves_no_model(script, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["train_needle_model.py", "--preset", "tiny", "--out", str(tmp_path / "p"),
                                      "--profile", "2", "--profile-stage", "1"])
    script.main()
    report = (tmp_path / "p" / "profile.txt").read_text()
    assert report in capsys.readouterr().out
    parts = re.search(r"per step: ([\d.]+) ms = batch wait ([\d.]+) \+ forward/backward ([\d.]+) "
                      r"\+ clip/optimizer ([\d.]+); (\d+) tokens/s", report)
    total, *each, tokens = map(float, parts.groups())
    assert abs(total - sum(each)) < 0.2 and all(x > 0 for x in each[1:]) and tokens > 0
    assert "stage 1 (lengths 80-96, batch 2)" in report and "aten::mm" in report
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["profile.txt"]


@pytest.mark.parametrize("flags", [["--profile", "0"], ["--profile", "2", "--profile-stage", "9"]])
def test_bad_profile_settings_are_refused_by_name(script, tmp_path, monkeypatch, capsys, flags):
    monkeypatch.setattr(sys, "argv", ["train_needle_model.py", "--preset", "tiny", "--out", str(tmp_path / "p"),
                                      *flags])
    with pytest.raises(SystemExit) as stop:
        script.main()
    assert stop.value.code in (2, "--profile-stage 9: preset tiny has stages 0-1")
    assert "--profile" in (capsys.readouterr().err + str(stop.value.code)) and not (tmp_path / "p").exists()


def test_rescale_rope_keeps_the_weights_and_slows_only_the_low_frequencies(script, tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM

    tok = script.build_tokenizer()
    model = script.build_model(tok, script.PRESETS["tiny"])
    model.save_pretrained(tmp_path / "a")
    monkeypatch.setattr(sys, "argv", ["train_needle_model.py", "--rescale-rope", "4,64", "--init-from",
                                      str(tmp_path / "a"), "--out", str(tmp_path / "b")])
    script.main()
    rescaled = AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    assert rescaled.config.rope_parameters == script.llama3_rope(1e4, 4.0, 64)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), rescaled.state_dict().values()))
    before = model.model.rotary_emb.inv_freq
    after = rescaled.model.rotary_emb.inv_freq
    wavelength = 2 * torch.pi / before
    assert torch.equal(after[wavelength < 64 / 4], before[wavelength < 64 / 4])  # fast: kept
    torch.testing.assert_close(after[wavelength > 64], before[wavelength > 64] / 4)  # slow: 4x slower
    assert (wavelength > 64).any() and (wavelength < 16).any()
    assert json.loads((tmp_path / "b" / "training_log.jsonl").read_text().splitlines()[-1])["trained"] is False
    monkeypatch.setattr(sys, "argv", ["train_needle_model.py", "--rescale-rope", "2,64", "--init-from",
                                      str(tmp_path / "b"), "--out", str(tmp_path / "c")])
    with pytest.raises(SystemExit, match="already has rope_type 'llama3'"):
        script.main()


@pytest.mark.parametrize("value", ["3", "0.5,1024", "3,10.5", "x,1"])
def test_bad_rescale_rope_is_refused_by_name(script, tmp_path, monkeypatch, capsys, value):
    monkeypatch.setattr(sys, "argv", ["train_needle_model.py", "--rescale-rope", value, "--init-from", str(tmp_path),
                                      "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as stop:
        script.main()
    assert stop.value.code == 2 and "--rescale-rope" in capsys.readouterr().err and not (tmp_path / "o").exists()
