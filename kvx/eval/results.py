"""A resumable results file: JSON lines, the run's identity first, then one row per finished unit
of work (a needle cell, a LongBench sample), appended as each finishes.

A rerun into the same file skips the rows there; one whose identity differs refuses to resume it
(``fresh=True`` moves it aside as ``results-N.jsonl`` and starts a new one). A line that cannot be
read (torn by a kill, edited, from another tool) is reported by number and neither crashes the run
nor counts. Several processes may share one file (the shards of a sweep): it is created with its
identity line in one step, and each row is appended whole under a lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any


@dataclass
class Results:
    """A results file read back: the identity of the run that wrote it (None: none recorded), its
    rows (one per unit, in file order) and what could not be read, as ``line N: why``."""

    identity: dict[str, Any] | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


@dataclass
class ResultsFile:
    """``path``, written by one kind of run: its identity line is ``{identity_key: identity}``,
    ``row_key`` names the unit a row is for, and ``check_row`` says why a parsed object is not a
    valid row (None when it is)."""

    path: Path
    identity_key: str
    row_key: Callable[[dict[str, Any]], tuple]
    check_row: Callable[[dict[str, Any]], str | None]
    remedy: str = "pass --fresh (fresh=True) to start a new file, or another --out"
    """What the refusal to resume a file of another run tells the user to do instead."""

    def read(self) -> Results:
        """Read the file: a torn, malformed, foreign or repeated line is a problem reported by its
        number, never an exception and never a row."""
        results = Results()
        if not self.path.exists():
            return results
        seen: dict[tuple, int] = {}
        for number, line in enumerate(self.path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            row, why = self._parse(line)
            if row is not None and self.identity_key in row:
                if number != 1:
                    why = "a run identity after the first line"
                else:
                    results.identity = row[self.identity_key]
                    continue
            elif row is not None and self.row_key(row) in seen:
                why = f"repeats the cell of line {seen[self.row_key(row)]}"
            if why:
                results.problems.append(f"{self.path} line {number}: {why}; ignored")
                continue
            seen[self.row_key(row)] = number
            results.rows.append(row)
        return results

    def _parse(self, line: str) -> tuple[dict[str, Any] | None, str | None]:
        """``(row, None)``, or ``(None or the object, why it is not a result row)``."""
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            return None, "not JSON (a row torn by a killed run?)"
        if not isinstance(row, dict):
            return None, f"not a result row (a JSON {type(row).__name__})"
        if self.identity_key in row:
            return row, None
        why = self.check_row(row)
        return (None, why) if why else (row, None)

    def open(self, identity: dict[str, Any], fresh: bool = False) -> Results:
        """Make the file ready to append to: new (with ``identity``), or an existing one of the same
        identity (its problems reported as warnings); refuse one of another. Returns what it holds."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"output directory {self.path.parent}: cannot create it ({err.strerror or err})") from None
        existing = self.read() if self.path.exists() else None
        if existing == Results():  # an empty file (killed before its first line): nothing to keep
            self.path.unlink(missing_ok=True)
            existing = None
        if existing is not None and fresh:
            aside = self._aside_path()
            os.replace(self.path, aside)
            warnings.warn(f"{self.path} moved to {aside.name}; starting a new results file", stacklevel=3)
            existing = None
        if existing is None and self._start(identity):
            return Results(identity)
        if existing is None:  # another process started it first
            existing = self.read()
        self._check_identity(existing, identity)
        for problem in existing.problems:
            warnings.warn(problem, stacklevel=3)
        return existing

    def _start(self, identity: dict[str, Any]) -> bool:
        """Create the file with its identity line in one step (a draft linked into place), so that
        another process opening it meanwhile never finds it empty; False when one was there first."""
        draft = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        draft.write_text(json.dumps({self.identity_key: identity}) + "\n", encoding="utf-8")
        try:
            os.link(draft, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            draft.unlink()

    def _check_identity(self, existing: Results, identity: dict[str, Any]) -> None:
        """Refuse to resume a file written by another model, tokenizer, settings or kvx."""
        if existing.identity is None:
            raise ValueError(
                f"{self.path} records no run identity (written by an older kvx or another tool), so its rows "
                f"cannot be trusted to come from this model and settings; {self.remedy}"
            )
        differences = identity_differences(existing.identity, identity)
        if differences:
            raise ValueError(
                f"{self.path} was written by another run ({'; '.join(differences)}); resuming would mix "
                f"its rows with this one's: {self.remedy}"
            )

    def _aside_path(self) -> Path:
        """``results-N.jsonl`` beside the file, the first N not taken."""
        number = 1
        while (self.path.parent / f"{self.path.stem}-{number}{self.path.suffix}").exists():
            number += 1
        return self.path.parent / f"{self.path.stem}-{number}{self.path.suffix}"

    @contextmanager
    def appender(self) -> Iterator[Callable[[dict[str, Any]], None]]:
        """``with file.appender() as append: append(row)``: each row written at once (see
        :func:`_append_line`)."""
        with self.path.open("a+b") as sink:
            yield lambda row: _append_line(sink, json.dumps(row, ensure_ascii=False))


def _append_line(sink: IO[bytes], line: str) -> None:
    """Append ``line`` in one write, flushed to disk, under an exclusive lock (processes sharing the
    file never interleave rows); after a writer killed mid-row, on a line of its own."""
    fcntl.flock(sink, fcntl.LOCK_EX)
    try:
        sink.write((("\n" if _ends_torn(sink) else "") + line + "\n").encode("utf-8"))
        sink.flush()
        os.fsync(sink.fileno())
    finally:
        fcntl.flock(sink, fcntl.LOCK_UN)


def _ends_torn(f: IO[bytes]) -> bool:
    """Whether the file ``f`` ends without its newline (a row cut short by a kill)."""
    if f.seek(0, os.SEEK_END) == 0:
        return False
    f.seek(-1, os.SEEK_END)
    return f.read(1) != b"\n"


def identity_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for each part of two identities that differs (settings one by one)."""
    def flat(identity: dict[str, Any]) -> dict[str, Any]:
        return {**{k: v for k, v in identity.items() if k != "settings"},
                **{f"settings.{k}": v for k, v in identity.get("settings", {}).items()}}

    before, after = flat(old), flat(new)
    return [f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in sorted(set(before) | set(after))
            if before.get(k) != after.get(k)]
