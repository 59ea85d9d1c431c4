"""The needle generator: exact lengths, depth placement, variants, seeds, scoring."""

import random

import pytest

from kvx.eval.haystack import (
    KEYS,
    NEEDLE,
    PromptTemplate,
    build_prompt,
    build_tokenizer,
    extract_values,
    make_needles,
    score_answer,
)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.mark.parametrize("length", [97, 512, 1000, 2048])
@pytest.mark.parametrize("variant", ["single", "multikey", "multivalue", "absent"])
def test_length_is_exact_in_tokens(tok, length, variant):
    rng = random.Random(length)
    prompt = build_prompt(tok, length, 40, make_needles(variant, rng), rng)
    assert prompt.length == length == len(prompt.ids)


@pytest.mark.parametrize("depth", [0, 10, 25, 50, 75, 90, 100])
def test_needle_lands_at_the_requested_depth(tok, depth):
    rng = random.Random(7)
    spec = make_needles("single", rng)
    prompt = build_prompt(tok, 1024, depth, spec, rng)
    needle_ids = tok(" " + NEEDLE.format(key=spec.key, value=spec.expected[0]), add_special_tokens=False)["input_ids"]
    start = prompt.needle_positions[0]
    assert prompt.ids[start : start + len(needle_ids)] == needle_ids
    context = 1024 - len(needle_ids) - 30  # roughly: prompt minus question
    assert abs(start - depth / 100 * context) <= 20  # nearest sentence boundary (sentences are ~10 tokens)


def test_multikey_has_distractors_and_absent_has_no_needle(tok):
    rng = random.Random(3)
    multikey = make_needles("multikey", rng, distractors=3)
    assert len(multikey.needles) == 4 and len({k for k, _ in multikey.needles}) == 4
    absent = make_needles("absent", rng, distractors=2)
    assert absent.expected == ["none"] and all(k != absent.key for k, _ in absent.needles)
    prompt = build_prompt(tok, 400, 50, absent, rng)
    text = tok.decode(prompt.ids)
    assert text.count(f"for {absent.key} is") == 1  # only in the answer prefix, not in the context


def test_multivalue_expects_every_value_in_order(tok):
    spec = make_needles("multivalue", random.Random(4), values=3)
    assert len(spec.expected) == 3 and all(k == spec.key for k, _ in spec.needles)
    prompt = build_prompt(tok, 300, 20, spec, random.Random(4))
    assert "magic numbers for" in tok.decode(prompt.ids[-20:])


def test_seeds_reproduce_prompts(tok):
    a = build_prompt(tok, 500, 30, make_needles("multikey", random.Random(9)), random.Random(9))
    b = build_prompt(tok, 500, 30, make_needles("multikey", random.Random(9)), random.Random(9))
    c = build_prompt(tok, 500, 30, make_needles("multikey", random.Random(10)), random.Random(10))
    assert a.ids == b.ids and a.ids != c.ids


def test_filler_contains_digits(tok):
    rng = random.Random(1)
    prompt = build_prompt(tok, 2000, 50, make_needles("single", rng), rng)
    digits = set(tok.convert_tokens_to_ids([str(d) for d in range(10)]))
    outside = [t for i, t in enumerate(prompt.ids) if t in digits and not 0 <= i - prompt.needle_positions[0] < 15]
    assert len(outside) > 20


def test_user_haystack_text(tok):
    rng = random.Random(2)
    prompt = build_prompt(tok, 300, 50, make_needles("single", rng), rng, haystack_text="the old river crossed the road .")
    assert prompt.length == 300 and "old river crossed" in tok.decode(prompt.ids)


def test_chat_template_wraps_context_and_opens_the_answer(tok):
    tok = build_tokenizer()
    tok.chat_template = "{% for m in messages %}<s> {{ m['content'] }} </s>{% endfor %}{% if add_generation_prompt %} Answer :{% endif %}"
    spec = make_needles("single", random.Random(5))
    prompt = build_prompt(tok, 256, 50, spec, random.Random(5), template=PromptTemplate(tok, use_chat_template=True))
    text = tok.decode(prompt.ids)
    assert prompt.length == 256 and text.rstrip().endswith(f"Answer : The special magic number for {spec.key} is")
    assert "</s>" in tok.decode(prompt.ids[-20:], skip_special_tokens=False)


@pytest.mark.parametrize("length,depth,match", [(20, 50, "too short"), (512, 101, r"within \[0, 100\]"), (512, -1, "within")])
def test_bad_input(tok, length, depth, match):
    rng = random.Random(0)
    with pytest.raises(ValueError, match=match):
        build_prompt(tok, length, depth, make_needles("multikey", rng), rng)


def test_unknown_variant():
    with pytest.raises(ValueError, match="unknown needle variant 'double'.*single, multikey, multivalue, absent"):
        make_needles("double", random.Random(0))


@pytest.mark.parametrize(
    "answer,expected,score",
    [
        ("4 8 2 1 .", ["4821"], 1.0),
        ("4821.", ["4821"], 1.0),
        ("4 8 2 2 .", ["4821"], 0.0),
        ("the number is 4821", ["4821"], 1.0),
        ("12 4821", ["4821"], 0.0),  # the first number given is the answer
        ("none .", ["none"], 1.0),
        ("4821 .", ["none"], 0.0),
        ("1 1 1 1 , 2 2 2 2 .", ["1111", "2222", "3333"], 2 / 3),
        ("", ["4821"], 0.0),
    ],
)
def test_scoring(answer, expected, score):
    assert score_answer(answer, expected) == pytest.approx(score)


def test_extract_values_joins_spaced_digits():
    assert extract_values("1 2 3 4 , 5 6 7 8 .") == ["1234", "5678"]
    assert all(k.isalpha() for k in KEYS)


def test_multihop_chains_two_needles_among_distractors(tok):
    rng = random.Random(5)
    spec = make_needles("multihop", rng, distractors=2)
    (key, hop_text), (hop, value), *others = spec.needles
    assert key == spec.key and hop_text == f"the special magic number for {hop}" and hop != key
    assert spec.expected == [value] and value.isdigit() and len(others) == 2
    assert len({k for k, _ in spec.needles}) == 4 and spec.question.endswith(f"for {key} ?")
    prompt = build_prompt(tok, 300, 60, spec, rng)
    assert prompt.length == 300 and tok.unk_token_id not in prompt.ids  # the tokenizer needs no new word
    text = tok.decode(prompt.ids)
    assert f"for {key} is the special magic number for {hop} ." in text
    assert f"for {hop} is {' '.join(value)} ." in text
    assert score_answer(f" {' '.join(value)} .", spec.expected) == 1.0
    assert make_needles("multihop", random.Random(1), distractors=0).needles.__len__() == 2


def test_existing_variants_draw_the_same_needles_as_before(tok):
    """Adding multihop changed no other variant's random draws (prompts of earlier runs stay the same)."""
    drawn = {v: make_needles(v, random.Random(11), distractors=2).needles
             for v in ("single", "multikey", "multivalue", "absent")}
    assert drawn == {  # as drawn before multihop existed
        "single": [("macaw", "8629")],
        "multikey": [("macaw", "8629"), ("stork", "8402"), ("toucan", "9320")],
        "multivalue": [("macaw", "8629"), ("macaw", "8402"), ("macaw", "9320")],
        "absent": [("stork", "8629"), ("toucan", "8402")],
    }
