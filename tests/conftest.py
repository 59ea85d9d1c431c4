"""Shared helpers: tiny models and greedy generation that returns tokens and logits."""

import logging
import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run on the CPU interpreter; on a GPU, for real
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kvx import cache_of
from kvx.patches import coverage
from kvx.tiny import ARCH_OVERRIDES, tiny_model

MODEL_TYPES = sorted(ARCH_OVERRIDES)

# The coverage check's fast subset (tests/patches/test_coverage.py) and the outcome each must have; the method
# conformance test runs its verified ones too.
COVERAGE_FAST = {
    "llama": coverage.VERIFIED, "mistral": coverage.VERIFIED, "qwen2": coverage.VERIFIED,
    "qwen3": coverage.VERIFIED, "gemma2": coverage.VERIFIED, "gemma3_text": coverage.VERIFIED,
    "phi3": coverage.VERIFIED,
    "qwen3_next": coverage.VERIFIED,  # hybrid: gated delta-net layers keep transformers' own cache layers
    "gpt_oss": coverage.VERIFIED,  # attention sinks (s_aux)
    "opt": coverage.VERIFIED,  # the causal LM calls its decoder directly: hooks go on the decoder
    "deepseek_v3": coverage.REFUSED,  # MLA
    "bloom": coverage.REFUSED,  # legacy attention code
}


QUANTIZED_READERS = ["kivi:group=8,window=4", "kivi:bits=2,group=8,window=5,sink=3", "int8:group=8,window=3",
                     "kvquant:group=8,window=4,outliers=0.1"]
"""Quantized storage specs whose segments a decode-sparse method reads slot by slot (quest, tidal):
4- and 2-bit KIVI (with sinks), int8, KVQuant's outliers."""


class _DeprecatedCacheName(logging.Handler):
    """Collects transformers' log lines saying a deprecated cache name was used."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "past_key_values" in message and "deprecated" in message:
            self.records.append(message)


@pytest.fixture(autouse=True)
def no_deprecated_cache_name():
    """Fail a test in which kvx (or the test, through kvx's helpers) reads or passes the cache under
    a name the installed transformers deprecates: 5.24 logs it once per process, so the once-only
    memo is cleared around each test."""
    warning_once = getattr(logging.Logger, "warning_once", None)
    if hasattr(warning_once, "cache_clear"):
        warning_once.cache_clear()
    handler = _DeprecatedCacheName()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
    assert not handler.records, f"deprecated cache name used: {handler.records[0]}"


def random_ids(batch: int, length: int, seed: int = 0, vocab: int = 128) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy(model, ids: torch.Tensor, mask: torch.Tensor | None = None, new_tokens: int = 8):
    """Greedy generation: ``(sequences, logits [steps, B, V], cache)``."""
    if mask is None:
        mask = torch.ones_like(ids)
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
            pad_token_id=0,
        )
    return out.sequences, torch.stack(out.logits), cache_of(out)


def left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D id rows with left padding (pad id 0): ``(ids [B, T], attention_mask [B, T])``."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


STORAGE_TINY_OPTIONS = {"int8": "group=8", "kivi": "group=8,window=4", "mixed": "group=8,window=4",
                        "kvquant": "group=8,window=4"}
"""Options a storage policy needs on the tiny models (head dim 16); the rest run with defaults."""


def storage_specs(under_any_selection: bool = True) -> list[str]:
    """``dense`` and a spec of every registered storage policy (what the conformance suites run on);
    ``under_any_selection``: only those an evicting selection (snapkv) composes with (mixed storage
    takes its precision from mikv alone, and has its own tests)."""
    from kvx.compose import compose, from_spec
    from kvx.policy import list_policies, make_policy

    names = [p["name"] for p in list_policies() if p["axis"] == "storage"]
    specs = ["dense"] + [f"{n}:{STORAGE_TINY_OPTIONS[n]}" if n in STORAGE_TINY_OPTIONS else n for n in names]
    specs.append("kivi:group=8,window=4,ragged=true")  # quantized, each KV head unpadded (as under head_budget)
    if not under_any_selection:
        return specs
    composable = ["dense"]
    for spec in specs[1:]:
        try:
            compose(make_policy("snapkv", budget=1024, window=8), from_spec(spec))
        except ValueError:
            continue
        composable.append(spec)
    return composable


def on_storage(spec: str, selection, **options):
    """A selection (a name with ``options``, or a policy) stored as ``spec`` says."""
    from kvx.compose import compose, from_spec
    from kvx.policy import make_policy

    policy = make_policy(selection, **options)
    return policy if spec == "dense" else compose(policy, from_spec(spec))
