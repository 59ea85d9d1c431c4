"""A LongBench sample as the model's tokens, the official way (``pred.py``), and where its context ends.

1. The task's template is filled: ``head + context + tail`` (the tail holds the question).
2. Middle truncation: a prompt of more than ``max_length`` tokens keeps its first and last
   ``max_length // 2`` tokens, decoded back to text (the instructions at both ends survive).
3. The model's chat template wraps the prompt, except for the tasks the official code leaves
   plain (trec, triviaqa, samsum, lsht, lcc, repobench-p) and for a tokenizer without one.
4. The text is tokenized once; ``question_start`` is the first token after the context, so
   query-aware runs compress ``ids[:question_start]`` alone and append the rest uncompressed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvx.eval.longbench.tasks import Sample, Task


@dataclass
class Prompt:
    """A built prompt: token ids, the first token after the context (None where the question did
    not survive truncation or cannot be found after the chat template), whether it was truncated,
    and whether the chat template was applied."""

    ids: list[int]
    question_start: int | None
    truncated: bool
    chat: bool

    @property
    def question_tokens(self) -> int:
        return 0 if self.question_start is None else len(self.ids) - self.question_start


def fill_template(task: Task, sample: Sample) -> tuple[str, int]:
    """The task's prompt for ``sample`` and the character offset where its context ends."""
    head, tail = task.split_template()
    head = head.format(input=sample.input)
    return head + sample.context + tail.format(input=sample.input), len(head) + len(sample.context)


def tokenize_at(tokenizer: Any, text: str, split: int | None, special_tokens: bool) -> tuple[list[int], int | None]:
    """``text``'s token ids and the index of the first token that starts at or after character
    ``split`` (a token that straddles it belongs before it). Fast tokenizers give offsets; for
    others the text before ``split`` is tokenized on its own."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=special_tokens, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        if split is None:
            return ids, None
        offsets = enc["offset_mapping"]
        start = next((i for i, (a, b) in enumerate(offsets) if a >= split and b > a), len(ids))
        return ids, start
    ids = list(tokenizer(text, add_special_tokens=special_tokens)["input_ids"])
    if split is None:
        return ids, None
    return ids, min(len(tokenizer(text[:split], add_special_tokens=special_tokens)["input_ids"]), len(ids))


def truncate_middle(tokenizer: Any, text: str, split: int, max_length: int) -> tuple[str, int | None, bool]:
    """``(text, split, truncated)``: ``text`` cut to its first and last ``max_length // 2`` tokens
    (decoded, as the official code does) when it has more than ``max_length``; ``split`` moved with
    it, or None when the cut reaches into the question."""
    ids, question = tokenize_at(tokenizer, text, split, special_tokens=True)
    if len(ids) <= max_length:
        return text, split, False
    half = max_length // 2
    first = tokenizer.decode(ids[:half], skip_special_tokens=True)
    last = tokenizer.decode(ids[len(ids) - half:], skip_special_tokens=True)
    if question < len(ids) - half:  # the question itself was cut
        return first + last, None, True
    context_end = tokenizer.decode(ids[len(ids) - half:question], skip_special_tokens=True)
    new_split = len(first) + len(context_end) if last.startswith(context_end) else None
    return first + last, new_split, True


def apply_chat(tokenizer: Any, text: str, split: int | None) -> tuple[str, int | None]:
    """``text`` as the user turn of the model's chat template (generation prompt added), and
    ``split`` moved to where the question sits in it (None when the template changed it)."""
    chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)
    if split is None:
        return chat, None
    question = text[split:].rstrip()  # templates may trim the message
    where = chat.rfind(question) if question else -1
    return chat, (where if where >= 0 else None)


def uses_chat(tokenizer: Any, task: Task, use_chat_template: bool) -> bool:
    """Whether ``task``'s prompt goes through the tokenizer's chat template."""
    return bool(use_chat_template and task.chat and getattr(tokenizer, "chat_template", None))


def build_prompt(tokenizer: Any, task: Task, sample: Sample, max_length: int | None,
                 use_chat_template: bool = True) -> Prompt:
    """The tokens the model reads for ``sample`` (see the module docstring)."""
    text, split = fill_template(task, sample)
    truncated = False
    if max_length is not None:
        text, split, truncated = truncate_middle(tokenizer, text, split, max_length)
    chat = uses_chat(tokenizer, task, use_chat_template)
    if chat:
        text, split = apply_chat(tokenizer, text, split)
    ids, start = tokenize_at(tokenizer, text, split, special_tokens=not chat)
    if start is not None and not 0 < start < len(ids):
        start = None
    return Prompt(ids, start, truncated, chat)
