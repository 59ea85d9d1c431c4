"""Needle-in-a-haystack prompts, built in a model's own tokens.

One generator serves the ``kvx needle`` runner and the training script of the shipped model, so
the model is trained on exactly the task it is measured on.

A prompt is ``context + question``: the context is filler text (generated here, or a user's text
file) with needles inserted, and the question asks for the value of one key::

    ... The special magic number for falcon is 4821 . ...
    Question : What is the special magic number for falcon ? Answer : The special magic number for falcon is

(the answer prefix opens the assistant turn when a chat template is used).

Variants:
- ``single``: one needle;
- ``multikey``: the needle plus distractor needles with other keys and values;
- ``multivalue``: several needles with the same key; every value is expected, in order;
- ``absent``: only distractors; the expected answer is ``none``.
- ``multihop``: the asked key's needle names another key instead of a value (``The special magic
  number for falcon is the special magic number for otter .``); that key's needle holds the value
  expected, among distractor needles (a two-hop chain, as in RULER's variable tracking).

Filler contains numbers too, so a model cannot find the needle by looking for digits.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

VARIANTS = ("single", "multikey", "multivalue", "absent", "multihop")

FILLER_NOUNS = (
    "river stone forest cloud meadow village harbor garden mountain valley bridge tower road lantern window "
    "market kitchen orchard candle basket letter painting mirror carpet wagon ladder fountain temple island "
    "desert castle shadow morning evening winter summer autumn spring farmer sailor baker teacher child "
    "traveler merchant poet soldier doctor student"
).split()
FILLER_ADJECTIVES = "old quiet bright small large warm cold green golden silent distant gentle busy narrow wide".split()
FILLER_VERBS = "watched crossed followed reached painted carried found passed visited opened remembered described".split()
FILLER_PREPOSITIONS = "near behind across beyond under above beside through".split()
KEYS = (
    "falcon otter badger heron lynx marten osprey puffin quail raven salmon tapir urchin viper walrus yak zebra "
    "bison cobra dingo egret ferret gecko hyena ibis jackal koala lemur macaw newt ocelot panda python rhino "
    "shrike toucan vole wombat alpaca beetle cicada donkey emu finch gopher hornet iguana jaguar kiwi llama "
    "moth narwhal oriole pelican robin stork turkey"
).split()
TEMPLATE_WORDS = "the special magic number numbers for is are question what answer none there were and".split()
PUNCTUATION = [".", ",", "?", ":"]

NEEDLE = "The special magic number for {key} is {value} ."
QUESTION = "Question : What is the special magic number for {key} ?"
ANSWER_PREFIX = "The special magic number for {key} is"
MULTIVALUE_QUESTION = "Question : What are all the special magic numbers for {key} ?"
MULTIVALUE_ANSWER_PREFIX = "The special magic numbers for {key} are"
ABSENT_ANSWER = "none"
HOP = "the special magic number for {key}"  # a multihop needle's value: another key's needle to read


def vocabulary() -> list[str]:
    """Every word the generator can emit (digits and punctuation included), for building a tokenizer."""
    words = set(FILLER_NOUNS + FILLER_ADJECTIVES + FILLER_VERBS + FILLER_PREPOSITIONS + KEYS + TEMPLATE_WORDS)
    words |= {"The", "Question", "What", "Answer", "There", "all"}
    return sorted(words) + [str(d) for d in range(10)] + PUNCTUATION


SPECIAL_TOKENS = {"pad_token": "<pad>", "eos_token": "</s>", "bos_token": "<s>", "unk_token": "<unk>"}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: words and punctuation split on whitespace, every digit its own token."""
    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS.values()) + vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins tokens with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    return fast


def filler_sentences(rng: random.Random, count: int, number_rate: float = 0.25) -> list[str]:
    """Plain sentences with nouns and adjectives; ``number_rate`` of them carry a small number."""
    out = []
    for _ in range(count):
        noun, other = rng.choice(FILLER_NOUNS), rng.choice(FILLER_NOUNS)
        if rng.random() < number_rate:
            out.append(f"There were {rng.randint(2, 999)} {rng.choice(FILLER_ADJECTIVES)} {noun} {rng.choice(FILLER_PREPOSITIONS)} the {other} .")
        else:
            out.append(
                f"The {rng.choice(FILLER_ADJECTIVES)} {noun} {rng.choice(FILLER_VERBS)} the {other} "
                f"{rng.choice(FILLER_PREPOSITIONS)} the {rng.choice(FILLER_NOUNS)} ."
            )
    return out


def random_value(rng: random.Random) -> str:
    return str(rng.randint(1000, 9999))


@dataclass
class NeedleSpec:
    """What to hide: the key asked about, the needles (key, value) and the expected answer."""

    variant: str
    key: str
    needles: list[tuple[str, str]]  # (key, value); the first is placed at the requested depth
    expected: list[str]  # values in order, or ["none"]

    @property
    def question(self) -> str:
        template = MULTIVALUE_QUESTION if self.variant == "multivalue" else QUESTION
        return template.format(key=self.key)

    @property
    def answer_prefix(self) -> str:
        template = MULTIVALUE_ANSWER_PREFIX if self.variant == "multivalue" else ANSWER_PREFIX
        return template.format(key=self.key)

    @property
    def answer_text(self) -> str:
        return " , ".join(self.expected) + " ."


def make_needles(variant: str, rng: random.Random, distractors: int = 2, values: int = 3) -> NeedleSpec:
    """A random needle set of one variant."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown needle variant {variant!r}; choose from {', '.join(VARIANTS)}")
    keys = rng.sample(KEYS, 1 + max(distractors, 1) + (variant == "multihop"))
    key, others = keys[0], keys[1:]
    if variant == "single":
        needles = [(key, random_value(rng))]
    elif variant == "multikey":
        needles = [(key, random_value(rng))] + [(k, random_value(rng)) for k in others[:distractors]]
    elif variant == "multivalue":
        needles = [(key, random_value(rng)) for _ in range(values)]
    elif variant == "multihop":  # key -> hop key -> value, then the distractors
        hop = others[-1]
        needles = [(key, HOP.format(key=hop)), (hop, random_value(rng))]
        needles += [(k, random_value(rng)) for k in others[:distractors]]
        return NeedleSpec(variant, key, needles, [needles[1][1]])
    else:  # absent: only distractors; the asked key appears nowhere
        needles = [(k, random_value(rng)) for k in others[: max(distractors, 1)]]
    expected = [ABSENT_ANSWER] if variant == "absent" else [v for k, v in needles if k == key]
    return NeedleSpec(variant, key, needles, expected)


@dataclass
class Prompt:
    """A built prompt: token ids and where each needle landed."""

    ids: list[int]
    spec: NeedleSpec
    depth: float
    needle_positions: list[int] = field(default_factory=list)  # token index where each needle starts
    question_start: int = 0  # ids[:question_start] is the context (template head included)

    @property
    def length(self) -> int:
        return len(self.ids)


def _sentence_starts(ids: list[int], period_ids: set[int]) -> list[int]:
    return [0] + [i + 1 for i, t in enumerate(ids) if t in period_ids]


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class PromptTemplate:
    """What surrounds the context: plain (BOS, context, question, answer prefix) or a chat template.

    With a chat template, the context and question form the user turn and the answer prefix
    starts the assistant turn. Token ids are concatenated, never re-tokenized, so a prompt is
    exactly as long as asked.
    """

    PLACEHOLDER = "<<KVX_CONTEXT>>"

    def __init__(self, tokenizer: Any, use_chat_template: bool = False):
        self.tokenizer = tokenizer
        self.chat = bool(use_chat_template and getattr(tokenizer, "chat_template", None))

    def parts(self, spec: NeedleSpec) -> tuple[list[int], list[int]]:
        """``(prefix_ids, suffix_ids)`` that go before and after the context."""
        tok = self.tokenizer
        if not self.chat:
            bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
            return bos, _encode(tok, f" {spec.question} Answer : {spec.answer_prefix}")
        messages = [{"role": "user", "content": f"{self.PLACEHOLDER}\n{spec.question}"}]
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        head, tail = text.split(self.PLACEHOLDER)
        return _encode(tok, head), _encode(tok, tail + spec.answer_prefix)


def build_prompt(
    tokenizer: Any,
    length: int,
    depth: float,
    spec: NeedleSpec,
    rng: random.Random,
    haystack_text: str | None = None,
    template: PromptTemplate | None = None,
    number_rate: float = 0.25,
) -> Prompt:
    """Exactly ``length`` tokens: template prefix + context with needles + question and answer prefix.

    The first needle starts at the sentence boundary nearest to ``depth`` percent of the context;
    further needles (distractors, extra values) go at random boundaries, in the order given.
    ``number_rate``: share of generated filler sentences that contain a number (0 makes the task
    easy: the needle's value is then the only number; the training curriculum starts there).
    """
    if not 0 <= depth <= 100:
        raise ValueError(f"depth must be within [0, 100] percent, got {depth}")
    prefix, suffix = (template or PromptTemplate(tokenizer)).parts(spec)
    needles = [_encode(tokenizer, " " + NEEDLE.format(key=k, value=v)) for k, v in spec.needles]
    room = length - len(prefix) - len(suffix) - sum(len(n) for n in needles)
    if room < 0:
        raise ValueError(
            f"length {length} is too short: the question and needles alone take "
            f"{length - room} tokens in this tokenizer"
        )
    filler = _filler_ids(tokenizer, room, rng, haystack_text, number_rate)
    period_ids = set(_encode(tokenizer, " .")) | set(_encode(tokenizer, "."))
    starts = _sentence_starts(filler, period_ids)
    target = round(depth / 100 * room)
    first = min(starts, key=lambda s: (abs(s - target), s))
    others = sorted(rng.choice(starts) for _ in needles[1:])
    insert_at = [first] + others  # positions in filler, needle i goes before filler[insert_at[i]]
    order = sorted(range(len(needles)), key=lambda i: (insert_at[i], i))
    ids, positions, cursor = list(prefix), [0] * len(needles), 0
    for i in order:
        ids += filler[cursor : insert_at[i]]
        cursor = insert_at[i]
        positions[i] = len(ids)
        ids += needles[i]
    ids += filler[cursor:]
    question_start = len(ids)
    ids += suffix
    assert len(ids) == length, (len(ids), length)
    return Prompt(ids, spec, depth, positions, question_start)


def _filler_ids(
    tokenizer: Any, count: int, rng: random.Random, haystack_text: str | None, number_rate: float = 0.25
) -> list[int]:
    """``count`` tokens of filler: the user's text repeated as needed, or generated sentences."""
    if count == 0:
        return []
    ids: list[int] = []
    if haystack_text is not None:
        text_ids = _encode(tokenizer, haystack_text)
        if not text_ids:
            raise ValueError("the haystack text file is empty")
        while len(ids) < count:
            ids += text_ids
        return ids[:count]
    while len(ids) < count:
        sentences = filler_sentences(rng, max(8, (count - len(ids)) // 8), number_rate)
        ids += _encode(tokenizer, " " + " ".join(sentences))
    return ids[:count]


_NUMBER = re.compile(r"\d(?:\s?\d)*")


def extract_values(text: str) -> list[str]:
    """Numbers in a model's answer, digits joined across single spaces (word-level tokenizers)."""
    return [m.group(0).replace(" ", "") for m in _NUMBER.finditer(text)]


def score_answer(answer: str, expected: list[str]) -> float:
    """1.0 for an exact answer, 0.0 for a wrong one; for several expected values, the fraction
    found (multi-value partial score). ``none`` is expected for absent needles."""
    if expected == [ABSENT_ANSWER]:
        words = answer.strip().lower().split()
        return 1.0 if words[:1] == [ABSENT_ANSWER] or (not extract_values(answer) and ABSENT_ANSWER in words) else 0.0
    found = extract_values(answer)
    if len(expected) == 1:
        return 1.0 if found[:1] == expected else 0.0
    return sum(1 for v in expected if v in found) / len(expected)
