"""LongBench v1's 21 tasks and LongBench-E's 13, as the official code runs them (THUDM/LongBench
``config/dataset2prompt.json``, ``config/dataset2maxlen.json``, ``pred.py``, ``eval.py``), and
reading their data from the official JSONL files.

Data layout (what the official ``data.zip`` unpacks to, or ``load_dataset('THUDM/LongBench', name)``
written out as JSON lines): one file per task in one directory, ``<task>.jsonl`` for LongBench and
``<task>_e.jsonl`` for LongBench-E, one sample per line::

    {"input": ..., "context": ..., "answers": [...], "length": 5632, "dataset": "qasper",
     "language": "en", "all_classes": null, "_id": "..."}
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NO_CHAT_TASKS = ("trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p")
"""Tasks the official ``pred.py`` prompts without the model's chat format."""
FIRST_LINE_TASKS = ("trec", "triviaqa", "samsum", "lsht")
"""Tasks whose prediction the official scorer cuts to its first line."""
CATEGORIES = ("Single-Doc QA", "Multi-Doc QA", "Summarization", "Few-shot Learning", "Synthetic", "Code")
LENGTH_BUCKETS = ("0-4k", "4-8k", "8k+")
"""LongBench-E's length ranges (of a sample's ``length``: words, or characters for Chinese)."""

_QA_EN = "Answer the question based on the given passages. Only give me the answer and do not output any other words."


@dataclass(frozen=True)
class Task:
    """One LongBench task: its prompt template (``{context}``, then ``{input}``), maximum new
    tokens, official metric, category and language."""

    name: str
    template: str
    max_new_tokens: int
    metric: str
    category: str
    language: str

    @property
    def chat(self) -> bool:
        """Whether the official protocol wraps this task's prompt in the model's chat format."""
        return self.name not in NO_CHAT_TASKS

    @property
    def first_line(self) -> bool:
        return self.name in FIRST_LINE_TASKS

    def split_template(self) -> tuple[str, str]:
        """``(head, tail)``: the template before and after ``{context}`` (the tail holds ``{input}``)."""
        head, tail = self.template.split("{context}")
        return head, tail


def _task(name: str, category: str, metric: str, max_new_tokens: int, template: str) -> Task:
    language = "code" if category == "Code" else "zh" if metric.endswith("_zh") or name == "lsht" else "en"
    return Task(name, template, max_new_tokens, metric, category, language)


TASKS: dict[str, Task] = {t.name: t for t in (
    _task("narrativeqa", "Single-Doc QA", "qa_f1", 128,
          "You are given a story, which can be either a novel or a movie script, and a question. Answer the question "
          "asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: "
          "{context}\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if "
          "possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:"),
    _task("qasper", "Single-Doc QA", "qa_f1", 128,
          "You are given a scientific article and a question. Answer the question as concisely as you can, using a "
          "single phrase or sentence if possible. If the question cannot be answered based on the information in the "
          "article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or "
          "\"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on "
          "the above article as concisely as you can, using a single phrase or sentence if possible. If the question "
          "cannot be answered based on the information in the article, write \"unanswerable\". If the question is a "
          "yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\n"
          "Question: {input}\n\nAnswer:"),
    _task("multifieldqa_en", "Single-Doc QA", "qa_f1", 64,
          "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on "
          "the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:"),
    _task("multifieldqa_zh", "Single-Doc QA", "qa_f1_zh", 64,
          "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。\n\n"
          "问题：{input}\n回答："),
    _task("hotpotqa", "Multi-Doc QA", "qa_f1", 32,
          f"{_QA_EN}\n\nThe following are given passages.\n{{context}}\n\n{_QA_EN}\n\nQuestion: {{input}}\nAnswer:"),
    _task("2wikimqa", "Multi-Doc QA", "qa_f1", 32,
          f"{_QA_EN}\n\nThe following are given passages.\n{{context}}\n\n{_QA_EN}\n\nQuestion: {{input}}\nAnswer:"),
    _task("musique", "Multi-Doc QA", "qa_f1", 32,
          f"{_QA_EN}\n\nThe following are given passages.\n{{context}}\n\n{_QA_EN}\n\nQuestion: {{input}}\nAnswer:"),
    _task("dureader", "Multi-Doc QA", "rouge_zh", 128,
          "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答："),
    _task("gov_report", "Summarization", "rouge", 512,
          "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n"
          "{context}\n\nNow, write a one-page summary of the report.\n\nSummary:"),
    _task("qmsum", "Summarization", "rouge", 512,
          "You are given a meeting transcript and a query containing a question or instruction. Answer the query in "
          "one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting "
          "transcript in one or more sentences.\n\nQuery: {input}\nAnswer:"),
    _task("multi_news", "Summarization", "rouge", 512,
          "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, "
          "write a one-page summary of all the news.\n\nSummary:"),
    _task("vcsum", "Summarization", "rouge_zh", 512,
          "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结："),
    _task("trec", "Few-shot Learning", "classification", 64,
          "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n"
          "{input}"),
    _task("triviaqa", "Few-shot Learning", "qa_f1", 32,
          "Answer the question based on the given passage. Only give me the answer and do not output any other words. "
          "The following are some examples.\n\n{context}\n\n{input}"),
    _task("samsum", "Few-shot Learning", "rouge", 128,
          "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n"
          "{input}"),
    _task("lsht", "Few-shot Learning", "classification", 64, "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}"),
    _task("passage_count", "Synthetic", "count", 32,
          "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully "
          "read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In "
          "other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final "
          "count of unique paragraphs after removing duplicates. The output format should only contain the number, "
          "such as 1, 2, 3, and so on.\n\nThe final answer is: "),
    _task("passage_retrieval_en", "Synthetic", "retrieval", 32,
          "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the "
          "abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of "
          "the paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", "
          "etc.\n\nThe answer is: "),
    _task("passage_retrieval_zh", "Synthetic", "retrieval_zh", 32,
          "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}\n\n"
          "请输入摘要所属段落的编号。答案格式必须是\"段落1\"，\"段落2\"等格式\n\n答案是："),
    _task("lcc", "Code", "code_sim", 64, "Please complete the code given below. \n{context}Next line of code:\n"),
    _task("repobench-p", "Code", "code_sim", 64,
          "Please complete the code given below. \n{context}{input}Next line of code:\n"),
)}
"""LongBench v1, in the official order."""

E_TASKS = ("qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec", "triviaqa",
           "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p")
"""The tasks LongBench-E has (files ``<task>_e.jsonl``)."""


def task_names(longbench_e: bool = False) -> tuple[str, ...]:
    return E_TASKS if longbench_e else tuple(TASKS)


def select_tasks(names: list[str] | None, longbench_e: bool = False) -> list[Task]:
    """The tasks named (all of the benchmark when None), or an error naming the unknown ones and the choices."""
    valid = task_names(longbench_e)
    if names is None:
        return [TASKS[n] for n in valid]
    unknown = [n for n in names if n not in valid]
    if unknown:
        which = "LongBench-E" if longbench_e else "LongBench"
        hint = " (in LongBench but not LongBench-E)" if longbench_e and all(n in TASKS for n in unknown) else ""
        raise ValueError(f"unknown {which} task(s) {', '.join(unknown)}{hint}; choose from {', '.join(valid)}")
    repeated = [n for i, n in enumerate(names) if n in names[:i]]
    if repeated:
        raise ValueError(f"task {repeated[0]} is listed twice; give each task once")
    return [TASKS[n] for n in names]


def templates_digest() -> str:
    """A fingerprint of every task's template and maximum length (part of a run's identity)."""
    text = json.dumps({t.name: [t.template, t.max_new_tokens, t.metric] for t in TASKS.values()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Sample:
    """One LongBench sample; ``index`` is its line's place among the file's samples, ``digest`` a
    fingerprint of what it asks (context, input, answers)."""

    task: str
    index: int
    context: str
    input: str
    answers: list[str]
    length: int
    all_classes: list[str] | None
    id: str
    digest: str


REQUIRED_FIELDS = {"context": str, "input": str, "answers": list, "length": int}


def task_file(data_dir: Path, task: str, longbench_e: bool = False) -> Path:
    return Path(data_dir) / f"{task}{'_e' if longbench_e else ''}.jsonl"


def check_data(data_dir: Path, tasks: list[Task], longbench_e: bool = False) -> None:
    """Raise, naming what is missing and the layout expected, unless every task's file is there."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        why = "not a directory" if data_dir.exists() else "no such directory"
        raise FileNotFoundError(f"--data {data_dir}: {why}; {_layout(longbench_e)}")
    missing = [task_file(data_dir, t.name, longbench_e).name for t in tasks
               if not task_file(data_dir, t.name, longbench_e).is_file()]
    if missing:
        raise FileNotFoundError(f"--data {data_dir}: no {', '.join(missing)}; {_layout(longbench_e)}")


def _layout(longbench_e: bool) -> str:
    example = "qasper_e.jsonl, hotpotqa_e.jsonl, ..." if longbench_e else "narrativeqa.jsonl, qasper.jsonl, ..."
    return (f"expected one JSONL file per task in that directory ({example}: the official data.zip's data/ folder, "
            "one sample per line with context, input, answers, length, all_classes); see docs/longbench.md")


def load_samples(data_dir: Path, task: Task, longbench_e: bool = False, limit: int | None = None) -> list[Sample]:
    """The samples of one task file (its first ``limit``), each checked: a line that is not a sample
    raises, naming the file, the line and what is wrong."""
    path = task_file(data_dir, task.name, longbench_e)
    samples: list[Sample] = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if limit is not None and len(samples) >= limit:
                break
            if line.strip():
                samples.append(_sample(path, number, line, task.name, len(samples)))
    if not samples:
        raise ValueError(f"{path}: no samples in it")
    return samples


def _sample(path: Path, number: int, line: str, task: str, index: int) -> Sample:
    """One JSON line as a :class:`Sample`, or an error naming ``path`` and line ``number``."""
    try:
        row: Any = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} line {number}: not JSON ({err.msg})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{path} line {number}: a sample is a JSON object, got a {type(row).__name__}")
    for key, kind in REQUIRED_FIELDS.items():
        if not isinstance(row.get(key), kind) or isinstance(row.get(key), bool):
            raise ValueError(f"{path} line {number}: {key!r} must be a {kind.__name__}, got {row.get(key)!r:.60}")
    if not all(isinstance(a, str) for a in row["answers"]):
        raise ValueError(f"{path} line {number}: 'answers' must be a list of strings")
    classes = row.get("all_classes")
    if TASKS[task].metric == "classification" and not (isinstance(classes, list) and classes):
        raise ValueError(f"{path} line {number}: {task} is scored by class, so 'all_classes' must list the classes")
    digest = hashlib.sha256(json.dumps([row["context"], row["input"], row["answers"]]).encode()).hexdigest()[:16]
    return Sample(task, index, row["context"], row["input"], list(row["answers"]), row["length"], classes,
                  str(row.get("_id", index)), digest)
