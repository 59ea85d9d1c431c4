"""The Triton column-sum kernels against the torch reference (CPU interpreter or GPU)."""

import pytest
import torch

from kvx.kernels import reference
from kvx.kernels.column_sums import attention_column_sums

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(
    "heads,kv_heads,q_len,kv_len,dim",
    [(4, 1, 13, 13, 64), (8, 2, 5, 37, 80), (2, 2, 40, 70, 16), (8, 1, 1, 97, 64)],
)
@pytest.mark.parametrize("softcap", [None, 20.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference(heads, kv_heads, q_len, kv_len, dim, softcap, dtype):
    g = torch.Generator().manual_seed(q_len * kv_len)
    q = torch.randn(2, heads, q_len, dim, generator=g).to(DEVICE, dtype)
    k = torch.randn(2, kv_heads, kv_len, dim, generator=g).to(DEVICE, dtype)
    valid = torch.ones(2, kv_heads, kv_len, dtype=torch.bool, device=DEVICE)
    valid[1, :, : min(7, kv_len - 1)] = False  # left padding in row 1
    got = attention_column_sums(q, k, valid, dim**-0.5, softcap, backend="triton")
    want = reference.attention_column_sums(q.float(), k.float(), valid, dim**-0.5, softcap)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
