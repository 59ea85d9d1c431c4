"""Mean score per policy, variant and length of `kvx needle` results files, as markdown tables.

    python scripts/needle_by_variant.py runs/needle/results.jsonl [more results.jsonl ...]
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def table(path: str) -> str:
    """One markdown table of ``path``'s rows (its first line, the run's identity, left out)."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()][1:]
    scores: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for row in rows:
        scores[(row["policy"], row["variant"], row["length"])].append(row["score"])
    lengths = sorted({length for _, _, length in scores})
    lines = [path, "", "| policy | variant | " + " | ".join(f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths)
             + " | prompts per cell |", "|---|---|" + "---|" * (len(lengths) + 1)]
    for policy, variant in sorted({(p, v) for p, v, _ in scores}):
        cells = [scores.get((policy, variant, n)) for n in lengths]
        counts = sorted({len(c) for c in cells if c})
        lines.append(f"| {policy} | {variant} | " + " | ".join(f"{sum(c) / len(c):.2f}" if c else "-" for c in cells)
                     + f" | {'/'.join(map(str, counts))} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print("\n".join(table(p) for p in sys.argv[1:]))
