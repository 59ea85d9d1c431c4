"""LongBench's official metrics (THUDM/LongBench ``metrics.py`` and ``eval.py``), number for number.

Each metric scores one prediction against one reference answer in [0, 1]; :func:`score_sample`
takes the best over a sample's answers, after the official first-line cut of the few-shot tasks.
What the official code depends on, and what kvx uses instead:

- ``jieba`` (Chinese words): the same package.
- ``rouge`` 1.0.1 (``Rouge().get_scores(...)["rouge-l"]["f"]``): :func:`rouge_l` computes the same
  number: texts split into sentences at ``.``, words at spaces, and the summary-level union LCS
  counted over *distinct* words (the package's default ``exclusive=True``), ties in the LCS
  broken as it breaks them. Where the package raises (an empty text) the official score is 0, and
  so is kvx's. One difference: the package finds the LCS recursively, so a sentence pair of about
  1,000 words exceeds Python's recursion limit and the official code scores 0; kvx scores it.
- ``fuzzywuzzy`` ``fuzz.ratio`` (code similarity): the official requirements install fuzzywuzzy
  without python-Levenshtein, so it is difflib's ``SequenceMatcher(...).ratio()`` rounded to a
  whole percent; :func:`fuzz_ratio` computes exactly that with the standard library. (With
  python-Levenshtein, or thefuzz / rapidfuzz, the ratio is the Indel similarity instead, which
  can be higher: ``"cacbaac"`` vs ``"bababcaa"`` scores 53 there, 40 here and officially.)
"""

from __future__ import annotations

import difflib
import logging
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

ZH_PUNCTUATION = ("！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟"
                  "〰〾〿–—‘’‛“”„‟…‧﹏.")
_EN_PUNCTUATION = set(string.punctuation)
_ALL_PUNCTUATION = set(string.punctuation + ZH_PUNCTUATION)


def _jieba():
    """The jieba module, quiet, or an ImportError saying how to install it."""
    try:
        import jieba
    except ImportError:
        raise ImportError("LongBench's Chinese metrics need jieba: pip install 'kvx[eval]'") from None
    jieba.setLogLevel(logging.WARNING)
    return jieba


def chinese_words(text: str) -> list[str]:
    """``text`` cut into words by jieba (accurate mode, as the official metrics cut it)."""
    return list(_jieba().cut(text, cut_all=False))


def normalize_answer(text: str) -> str:
    """Lower case, punctuation removed, articles (a, an, the) removed, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in _EN_PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def normalize_zh_answer(text: str) -> str:
    """Lower case, English and Chinese punctuation removed, all whitespace removed."""
    return "".join("".join(ch for ch in text.lower() if ch not in _ALL_PUNCTUATION).split())


def token_f1(prediction: Sequence[str], reference: Sequence[str]) -> float:
    """F1 of the tokens two lists share (counted with multiplicity); 0 when they share none."""
    same = sum((Counter(prediction) & Counter(reference)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(reference)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, reference: str, **_) -> float:
    """English QA F1 over the words of the normalised texts."""
    return token_f1(normalize_answer(prediction).split(), normalize_answer(reference).split())


def qa_f1_zh(prediction: str, reference: str, **_) -> float:
    """Chinese QA F1 over jieba's words, each normalised, empty ones dropped."""

    def words(text: str) -> list[str]:
        return [w for w in (normalize_zh_answer(w) for w in chinese_words(text)) if w]

    return token_f1(words(prediction), words(reference))


def _sentences(text: str) -> list[list[str]]:
    """``text`` as the ``rouge`` package reads it: pieces between ``.``, each split at single spaces
    after its whitespace is collapsed (an all-space piece is one empty word)."""
    return [" ".join(piece.split()).split(" ") for piece in text.split(".") if piece]


def _lcs_words(x: list[str], y: list[str]) -> set[str]:
    """The words of the longest common subsequence of ``x`` and ``y``, traced back the way the
    ``rouge`` package traces it (on a tie, drop the last word of ``y``)."""
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]  # table[i][j]: LCS length of x[:i], y[:j]
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            table[i][j] = table[i - 1][j - 1] + 1 if x[i - 1] == y[j - 1] else max(table[i - 1][j], table[i][j - 1])
    words, i, j = set(), len(x), len(y)
    while i and j:
        if x[i - 1] == y[j - 1]:
            words.add(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def rouge_l(prediction: str, reference: str, **_) -> float:
    """ROUGE-L F (summary level) as ``rouge`` 1.0.1 computes it; 0 when either text has no sentence."""
    hyp, ref = _sentences(prediction), _sentences(reference)
    if not hyp or not ref:
        return 0.0
    union: set[str] = set()  # distinct words in the union LCS of every (reference, prediction) sentence pair
    for ref_sentence in ref:
        for hyp_sentence in hyp:
            union |= _lcs_words(ref_sentence, hyp_sentence)
    recall = len(union) / len({w for s in ref for w in s})
    precision = len(union) / len({w for s in hyp for w in s})
    return 2.0 * precision * recall / (precision + recall + 1e-8)


def rouge_l_zh(prediction: str, reference: str, **_) -> float:
    """ROUGE-L F over jieba's words (joined with spaces, then read as :func:`rouge_l` reads text)."""
    return rouge_l(" ".join(chinese_words(prediction)), " ".join(chinese_words(reference)))


def classification(prediction: str, reference: str, all_classes: Sequence[str] | None = None, **_) -> float:
    """1 / (classes named in the prediction) when the reference is among them, else 0; a class that
    is part of the reference's name (and not it) does not count against it."""
    if not all_classes:
        raise ValueError("classification needs the sample's all_classes (the task's labels); the sample has none")
    named = [c for c in all_classes if c in prediction]
    # The official loop removes from the list it iterates over, so the class right after a removed
    # one is never checked; kept as it is, since it decides the official number.
    for term in named:
        if term in reference and term != reference:
            named.remove(term)
    return 1.0 / len(named) if reference in named else 0.0


def _share_of(numbers: list[str], wanted: str) -> float:
    """The share of ``numbers`` equal to ``wanted`` (0 when there are none)."""
    return sum(1 for n in numbers if n == wanted) / len(numbers) if numbers else 0.0


def count(prediction: str, reference: str, **_) -> float:
    """The share of the numbers in the prediction that equal the reference count."""
    return _share_of(re.findall(r"\d+", prediction), str(reference))


def _retrieval(pattern: str) -> Callable[..., float]:
    def score(prediction: str, reference: str, **_) -> float:
        found = re.findall(pattern, reference)
        if not found:
            raise ValueError(f"retrieval answer {reference!r} does not name a paragraph (expected {pattern!r})")
        return _share_of(re.findall(r"\d+", prediction), found[0])

    return score


retrieval = _retrieval(r"Paragraph (\d+)")
retrieval.__doc__ = "The share of the numbers in the prediction that equal the paragraph the answer names."
retrieval_zh = _retrieval(r"段落(\d+)")
retrieval_zh.__doc__ = "As :func:`retrieval`, for answers written ``段落N``."


def fuzz_ratio(a: str, b: str) -> int:
    """fuzzywuzzy's ``fuzz.ratio`` without python-Levenshtein: 100 for equal texts, 0 when one is
    empty, else difflib's similarity as a whole percent (Python's rounding)."""
    if a == b:
        return 100
    if not a or not b:
        return 0
    return int(round(100 * difflib.SequenceMatcher(None, a, b).ratio()))


def code_sim(prediction: str, reference: str, **_) -> float:
    """Edit similarity of the prediction's first code line (the first without a backtick, ``#`` or
    ``//``) to the reference line."""
    lines = prediction.lstrip("\n").split("\n")
    line = next((x for x in lines if "`" not in x and "#" not in x and "//" not in x), "")
    return fuzz_ratio(line, reference) / 100


METRICS: dict[str, Callable[..., float]] = {
    "qa_f1": qa_f1, "qa_f1_zh": qa_f1_zh, "rouge": rouge_l, "rouge_zh": rouge_l_zh,
    "classification": classification, "retrieval": retrieval, "retrieval_zh": retrieval_zh,
    "count": count, "code_sim": code_sim,
}
"""Every official metric by name."""


def score_sample(metric: str, prediction: str, answers: Sequence[str], all_classes: Sequence[str] | None = None,
                 first_line: bool = False) -> float:
    """A sample's score: the best over its answers; ``first_line``: the prediction's first line
    only (leading newlines skipped), as the official scorer does for trec, triviaqa, samsum, lsht."""
    if metric not in METRICS:
        raise ValueError(f"unknown LongBench metric {metric!r}; choose from {', '.join(METRICS)}")
    if first_line:
        prediction = prediction.lstrip("\n").split("\n")[0]
    return max((METRICS[metric](prediction, answer, all_classes=all_classes) for answer in answers), default=0.0)
