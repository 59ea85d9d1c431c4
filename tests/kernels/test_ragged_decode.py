"""The Triton ragged decode kernel against the torch reference, on odd shapes, under the CPU
interpreter (TRITON_INTERPRET=1, set in conftest) or on a GPU when there is one."""

import os

import pytest
import torch

from kvx.kernels import reference
from kvx.kernels.ragged_decode import choose_backend, ragged_decode_attention

triton = pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(batch, kv_heads, groups, dim, lengths, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, kv_heads * groups, 1, dim, generator=g)
    counts = torch.tensor(lengths).reshape(batch, kv_heads)
    total = int(counts.sum())
    keys, values = torch.randn(total, dim, generator=g), torch.randn(total, dim, generator=g)
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.long)
    offsets[1:] = counts.flatten().cumsum(0)
    to = lambda t: t.to(DEVICE, dtype)  # noqa: E731
    return to(query), to(keys), to(values), offsets.to(DEVICE)


@pytest.mark.parametrize(
    "batch,kv_heads,groups,dim,lengths",
    [
        (1, 2, 4, 64, [97, 3]),  # GQA 4
        (2, 1, 8, 80, [300, 0]),  # head dim 80, an empty segment
        (1, 3, 1, 64, [1, 45, 130]),  # MHA
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_kernel_matches_reference(batch, kv_heads, groups, dim, lengths, dtype, softcap):
    query, keys, values, offsets = _case(batch, kv_heads, groups, dim, lengths, dtype)
    out, lse = ragged_decode_attention(query, keys, values, offsets, dim**-0.5, softcap, backend="triton", splits=3)
    want_out, want_lse = reference.ragged_attention(query.float(), keys.float(), values.float(), offsets, dim**-0.5, softcap)
    # bf16 inputs are converted to fp32 at load: both sides see the same rounded inputs
    torch.testing.assert_close(out, want_out, rtol=2e-5, atol=2e-5)
    finite = torch.isfinite(want_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    torch.testing.assert_close(lse[finite], want_lse[finite], rtol=2e-5, atol=2e-5)


def test_split_count_does_not_change_the_result():
    query, keys, values, offsets = _case(1, 2, 4, 64, [200, 77], torch.float32, seed=1)
    one, _ = ragged_decode_attention(query, keys, values, offsets, 0.125, backend="triton", splits=1)
    many, _ = ragged_decode_attention(query, keys, values, offsets, 0.125, backend="triton", splits=5)
    torch.testing.assert_close(one, many, rtol=1e-5, atol=1e-5)


def test_backend_choice(monkeypatch):
    cpu = torch.device("cpu")
    assert choose_backend(cpu, "torch") == "torch"
    with pytest.raises(ValueError, match="unknown kvx backend 'cuda'; choose from torch, triton"):
        choose_backend(cpu, "cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        choose_backend(cpu, "triton")
    monkeypatch.delenv("KVX_BACKEND", raising=False)
    assert choose_backend(cpu) == "torch"
    assert os.environ.get("TRITON_INTERPRET") == "0"
