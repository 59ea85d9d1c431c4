"""LongBench's official metrics against values worked out by hand (and ROUGE-L against the ``rouge``
package the official code calls)."""

import random

import pytest

from kvx.eval.longbench import metrics
from kvx.eval.longbench.metrics import score_sample


def test_qa_f1_normalises_then_counts_shared_words():
    # "the cat sat on the mat" -> cat sat on mat (articles, punctuation gone); "a cat on a mat" -> cat on mat
    # shared 3: precision 3/4, recall 3/3, F1 = 2 * 0.75 / 1.75 = 6/7
    assert metrics.qa_f1("The cat sat on the mat.", "a cat on a mat") == pytest.approx(6 / 7)
    assert metrics.qa_f1("a dog", "the cat") == 0.0
    assert metrics.qa_f1("Paris, France!", "paris france") == 1.0


def test_qa_f1_zh_counts_jieba_words_without_punctuation():
    assert metrics.chinese_words("首都是北京") == ["首都", "是", "北京"]
    assert metrics.qa_f1_zh("首都是北京", "北京") == pytest.approx(0.5)  # precision 1/3, recall 1: 2/3 / (4/3)
    assert metrics.qa_f1_zh("北京。", "北京") == 1.0  # "。" normalises to nothing and is dropped


def test_rouge_l_is_the_rouge_packages_summary_level_f():
    # one sentence each: distinct words 3 and 3, LCS "the cat": P = R = 2/3
    assert metrics.rouge_l("the cat sat", "the cat ran") == pytest.approx(2 / 3, abs=1e-7)
    # summary level: each reference sentence takes the union of its LCS with every predicted sentence
    # (a b | c d against a c | b d: {a, c} then {b, d}): all 4 words, F = 1 where one LCS gives 3/4
    assert metrics.rouge_l("a b. c d", "a c. b d") == pytest.approx(1.0, abs=1e-7)
    # words are counted once (the package's exclusive mode): "the the the" has one word
    assert metrics.rouge_l("the the the", "the") == pytest.approx(1.0, abs=1e-7)
    assert metrics.rouge_l("", "the cat") == 0.0 and metrics.rouge_l("...", "the cat") == 0.0


def test_rouge_l_zh_reads_jieba_words():
    assert metrics.chinese_words("会议决定增加投入") == ["会议", "决定", "增加", "投入"]
    # 4 predicted words all in the 5-word reference's LCS: P = 1, R = 4/5, F = 8/9
    assert metrics.rouge_l_zh("会议决定增加投入", "会议决定增加研发投入") == pytest.approx(8 / 9, abs=1e-7)


def test_rouge_l_matches_the_rouge_package_on_random_texts():
    rouge = pytest.importorskip("rouge")
    words = "a b c the cat sat on mat . ,".split(" ")
    rng = random.Random(0)
    for _ in range(300):
        hyp, ref = (" ".join(rng.choice(words) for _ in range(rng.randint(0, 14))) for _ in range(2))
        try:
            expected = rouge.Rouge().get_scores([hyp], [ref], avg=True)["rouge-l"]["f"]
        except ValueError:  # the official code scores what the package refuses as 0
            expected = 0.0
        assert metrics.rouge_l(hyp, ref) == pytest.approx(expected, abs=1e-12), (hyp, ref)


TREC = ["Entity", "Human", "Location"]


def test_classification_shares_the_point_among_the_classes_named():
    assert metrics.classification("Location", "Location", all_classes=TREC) == 1.0
    assert metrics.classification("Location or Human", "Human", all_classes=TREC) == 0.5
    assert metrics.classification("Entity", "Human", all_classes=TREC) == 0.0
    # a class inside the reference's name does not count against it
    assert metrics.classification("Human being", "Human being", all_classes=["Human", "Human being"]) == 1.0
    # the official loop skips the class after a removed one: "ab" survives, so 1/2 (a fixed loop gives 1)
    assert metrics.classification("abc", "abc", all_classes=["a", "ab", "abc"]) == 0.5
    with pytest.raises(ValueError, match="all_classes"):
        metrics.classification("Human", "Human", all_classes=None)


def test_retrieval_and_count_score_the_share_of_right_numbers():
    assert metrics.retrieval("Paragraph 3", "Paragraph 3") == 1.0
    assert metrics.retrieval("Paragraph 3 or Paragraph 13", "Paragraph 3") == 0.5
    assert metrics.retrieval("I do not know", "Paragraph 3") == 0.0
    assert metrics.retrieval_zh("答案是段落2和段落5", "段落2") == 0.5
    assert metrics.count("There are 3 unique paragraphs out of 10", "3") == 0.5
    assert metrics.count("three", "3") == 0.0
    with pytest.raises(ValueError, match="does not name a paragraph"):
        metrics.retrieval("Paragraph 1", "the first one")


def test_code_sim_takes_the_first_code_line_and_rounds_like_fuzzywuzzy():
    assert metrics.code_sim("\n# a comment\n    return result\n", "    return result") == 1.0
    # "return x" vs "return y": difflib matches 7 of 16 characters, 87.5 -> 88 (Python rounds half to even)
    assert metrics.code_sim("```python\nreturn x", "return y") == 0.88
    assert metrics.fuzz_ratio("cacbaac", "bababcaa") == 40  # difflib's matching, not the Indel ratio (53)
    assert metrics.code_sim("// only comments", "x = 1") == 0.0


def test_score_sample_takes_the_best_answer_and_the_first_line_where_official():
    assert score_sample("qa_f1", "the cat", ["a dog", "cat"]) == 1.0
    assert score_sample("classification", "\nLocation\nHuman", ["Location"], TREC, first_line=True) == 1.0
    assert score_sample("classification", "\nLocation\nHuman", ["Location"], TREC) == 0.5
    assert score_sample("qa_f1", "anything", []) == 0.0
    with pytest.raises(ValueError, match="unknown LongBench metric 'bleu'; choose from qa_f1"):
        score_sample("bleu", "x", ["x"])
