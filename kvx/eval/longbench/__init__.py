"""LongBench and LongBench-E under kvx policies, the official way (``kvx longbench``).

- :mod:`.tasks`: the 21 tasks (templates, generation lengths, metrics, categories), reading the
  official JSONL files;
- :mod:`.prompts`: a sample as tokens (middle truncation, chat template, where the context ends);
- :mod:`.metrics`: the official metrics;
- :mod:`.runner`: the resumable run; :mod:`.summary`: the score tables; :mod:`.cli`: the command.
"""

from kvx.eval.longbench.runner import LongBenchConfig, LongBenchRunner
from kvx.eval.longbench.summary import format_summary, summarize
from kvx.eval.longbench.tasks import E_TASKS, TASKS

__all__ = ["E_TASKS", "TASKS", "LongBenchConfig", "LongBenchRunner", "format_summary", "summarize"]
