"""The README's Python examples run as written on the installed transformers, with no deprecation
warning (the conftest fixture fails a test that triggers one)."""

import re
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_MODEL = ROOT / "kvx" / "assets" / "needle-llama"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_examples_run_in_order():
    blocks = _python_blocks()
    assert len(blocks) >= 2
    ids = torch.randint(10, 60, (1, 96), generator=torch.Generator().manual_seed(0))
    namespace = {
        "torch": torch, "path": str(SHIPPED_MODEL), "ids": ids, "mask": torch.ones_like(ids),
        "context_ids": ids[:, :80], "question_ids": ids[:, 80:],
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        for block in blocks:
            exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    cache = namespace["cache"]  # the last example's: the context compressed, question and answer appended
    assert cache.get_seq_length() > 96
    for layer in cache.stats():  # 64 kept of the 80 context tokens, then 16 question and <= 32 answer tokens
        assert layer["stored"] < layer["seen"] and layer["stored"] <= 64 + 16 + 32
