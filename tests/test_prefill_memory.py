"""Chunked prefill attends over the stored prefix and the new chunk without building anything of
``chunk x (stored + chunk)`` elements: no query-by-key mask, no score matrix (issue: peak memory
and time follow budget + chunk). Checked by recording every storage torch allocates."""

import pytest
import torch
from conftest import random_ids
from torch.utils._python_dispatch import TorchDispatchMode

import kvx
from kvx.compose import from_spec
from kvx.kernels import reference
from kvx.tiny import tiny_model

CHUNK, BUDGET, WINDOW = 256, 200, 8


class LargestAllocation(TorchDispatchMode):
    """The most elements any storage an op returned held (views of existing storage count theirs)."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.numel():
                elements = tensor.untyped_storage().nbytes() // tensor.element_size()
                if elements > self.largest:
                    self.largest, self.op = elements, func
        return out


@pytest.mark.parametrize("spec", [
    f"snapkv:budget={BUDGET},window={WINDOW}",  # dense storage
    f"head_budget:budget={BUDGET},window={WINDOW}",  # ragged storage
    f"snapkv:budget={BUDGET},window={WINDOW}+kivi:group=8,window=4",  # quantized storage
    f"h2o:budget={BUDGET},recent=8",  # column sums of the whole chunk
    f"streaming_llm:sink=4,window={BUDGET - 4}",
])
@pytest.mark.parametrize("padded", [False, True], ids=["one-row", "left-padded-batch"])
def test_chunked_prefill_never_builds_a_chunk_by_stored_tensor(spec, padded, monkeypatch):
    """Neither kvx nor transformers' mask builds a tensor of chunk x stored elements, with or
    without padding stored (a left-padded batch keeps its padding as the layer's ``valid``)."""
    # at long prompts the column sums' query blocks are small (their logits stay near 8 MB): make
    # this small shape behave the same
    monkeypatch.setattr(reference, "COLUMN_SUMS_BLOCK_ELEMENTS", 4096)
    model = tiny_model("llama")  # hidden 64, vocab 128: no activation comes near chunk x stored
    rows = 2 if padded else 1
    ids, mask = random_ids(rows, 3 * CHUNK, seed=5), None
    if padded:  # the second row starts 100 tokens in: its padding is stored, in every chunk's prefix
        mask = torch.ones_like(ids)
        mask[1, :100] = 0
    with kvx.patched(model, from_spec(spec)):
        probe = LargestAllocation()
        with probe:
            kvx.prefill(model, ids, attention_mask=mask, chunk_size=CHUNK)
    smallest_chunk_by_stored = rows * CHUNK * (BUDGET + CHUNK)  # every chunk after the first attends over at least this
    # with padding, a chunk's own mask (chunk x chunk per row) is needed; nothing over the stored tokens
    limit = rows * CHUNK * CHUNK if padded else smallest_chunk_by_stored / 2
    assert limit < smallest_chunk_by_stored and probe.largest <= limit, (spec, probe.op, probe.largest)


def test_a_prefix_and_causal_chunk_equal_attention_under_the_full_mask():
    g = torch.Generator().manual_seed(0)
    query = torch.randn(2, 8, 37, 16, generator=g)
    key, value = torch.randn(2, 2, 87, 16, generator=g), torch.randn(2, 2, 87, 16, generator=g)
    prefix_valid = torch.rand(2, 2, 50, generator=g) > 0.3
    prefix_valid[0, 1] = False  # a head that sees no prefix token at all
    full = torch.cat([reference.expand_kv_heads(prefix_valid, 4)[:, :, None, :].expand(2, 8, 37, 50),
                      reference.causal_mask(37, 37, query.device).expand(2, 8, 37, 37)], dim=-1)
    expected = reference.attention_with_lse(query, key, value, full, 0.25)[0]
    for softcap in (None, 30.0):
        got = reference.prefix_then_new_attention(query, key, value, prefix_valid, None, 0.25, softcap)
        want = expected if softcap is None else reference.attention_with_lse(query, key, value, full, 0.25, softcap)[0]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
