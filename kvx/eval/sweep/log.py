"""``OUT/results.jsonl`` of a sweep: the model's identity, then one row per finished cell, appended
by every shard (a :class:`kvx.eval.results.ResultsFile`: created in one step, rows appended whole
under a lock, so shards never interleave them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvx.eval.results import ResultsFile
from kvx.eval.sweep.grid import row_key

IDENTITY_KEY = "kvx_sweep"
ROW_KEYS = {"benchmark", "length", "policy", "line", "ratio", "score", "kv_bytes"}
"""What every results row holds (a line without them is reported and skipped)."""


def check_row(row: dict[str, Any]) -> str | None:
    """Why a JSON object is not a sweep row (None when it is)."""
    return None if ROW_KEYS <= set(row) else "not a sweep row"


def results_file(path: Path) -> ResultsFile:
    """``path`` as a sweep's results file (identity ``kvx_sweep``, one row per cell). A sweep has no
    ``--fresh``: a file of another model or kvx is refused, naming another ``--out`` as the way out."""
    return ResultsFile(Path(path), IDENTITY_KEY, row_key, check_row, remedy="use another --out")
