"""``OUT/results.jsonl`` of a sweep: the model's identity, then one row per finished cell, appended
by every shard under a file lock."""

from __future__ import annotations

import fcntl
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvx.eval.sweep.grid import row_key

IDENTITY_KEY = "kvx_sweep"
ROW_KEYS = {"benchmark", "length", "policy", "line", "ratio", "score", "kv_bytes"}
"""What every results row holds (a line without them is reported and skipped)."""


@dataclass
class ResultsLog:
    """``results.jsonl`` of a sweep: first line the model's identity, then one row per finished cell.
    Shards append whole lines under an exclusive lock, so rows never interleave."""

    path: Path

    def rows(self) -> list[dict[str, Any]]:
        """The cell rows that can be read (a line torn by a kill, or a repeat, is skipped with a warning)."""
        rows, seen = [], set()
        if not self.path.exists():
            return rows
        for number, line in enumerate(self.path.read_text(errors="replace").splitlines(), 1):
            try:
                row = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                warnings.warn(f"{self.path} line {number}: not JSON (a row torn by a killed run?); ignored", stacklevel=2)
                continue
            if isinstance(row, dict) and IDENTITY_KEY in row and number == 1:
                continue
            if not isinstance(row, dict) or not ROW_KEYS <= set(row):
                warnings.warn(f"{self.path} line {number}: not a sweep row; ignored", stacklevel=2)
                continue
            key = row_key(row)
            if key not in seen:
                seen.add(key)
                rows.append(row)
        return rows

    def identity(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        first = self.path.read_text(errors="replace").split("\n", 1)[0]
        try:
            return json.loads(first).get(IDENTITY_KEY)
        except (json.JSONDecodeError, AttributeError):
            return None

    def open(self, identity: dict[str, Any]) -> None:
        """Start the file with ``identity``, or check an existing file was written for the same model."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        draft = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        draft.write_text(json.dumps({IDENTITY_KEY: identity}) + "\n")
        try:
            os.link(draft, self.path)  # created with its first line in one step: a shard never sees it empty
            return
        except FileExistsError:
            pass
        finally:
            draft.unlink()
        old = self.identity()
        if old != identity:
            from kvx.eval.results import identity_differences

            why = "; ".join(identity_differences(old, identity)) if old else "it records no sweep identity"
            raise ValueError(f"{self.path} was written by another model or kvx ({why}); resuming would mix their "
                             "cells: use another --out")

    def append(self, row: dict[str, Any]) -> None:
        """One row, one write, under an exclusive lock; a torn last line is ended first."""
        with self.path.open("a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                torn = False
                if f.seek(0, os.SEEK_END) > 0:  # a row cut short by a kill ends the file without its newline
                    f.seek(-1, os.SEEK_END)
                    torn = f.read(1) != b"\n"
                f.write((("\n" if torn else "") + json.dumps(row) + "\n").encode())
                f.flush()
                os.fsync(f.fileno())
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
