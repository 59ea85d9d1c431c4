"""Decode attention over a ragged per-head KV cache: dispatch between the Triton kernel and the
torch reference.

``KVX_BACKEND=torch|triton`` forces a backend; an explicit request that cannot be met raises.
Automatic choice: Triton on CUDA, the torch reference on CPU.
"""

from __future__ import annotations

import os

import torch

from kvx.kernels import reference

BACKENDS = ("torch", "triton")


def choose_backend(device: torch.device, requested: str | None = None) -> str:
    """``torch`` or ``triton`` for ``device``; ``requested`` (or ``KVX_BACKEND``) wins, or raises."""
    requested = requested or os.environ.get("KVX_BACKEND") or None
    if requested is None:
        return "triton" if device.type == "cuda" and _triton_available() else "torch"
    if requested not in BACKENDS:
        raise ValueError(f"unknown kvx backend {requested!r}; choose from {', '.join(BACKENDS)}")
    if requested == "triton":
        if not _triton_available():
            raise RuntimeError("KVX_BACKEND=triton was requested but triton is not installed")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"KVX_BACKEND=triton was requested for {device.type} tensors: Triton kernels run on CUDA, "
                "or on the CPU only under TRITON_INTERPRET=1"
            )
    return requested


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def ragged_decode_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor,
    scaling: float,
    softcap: float | None = None,
    backend: str | None = None,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per head ``[B, H, 1, D]`` over ragged ``keys/values [N, D]`` with ``offsets``
    ``[B * Hkv + 1]`` -> ``(out [B, H, 1, D], lse [B, H, 1])`` float32."""
    if choose_backend(query.device, backend) == "torch":
        return reference.ragged_attention(query, keys, values, offsets, scaling, softcap)
    return _triton_ragged_decode(query, keys, values, offsets, scaling, softcap, splits)


def _triton_ragged_decode(query, keys, values, offsets, scaling, softcap, splits):
    import triton

    from kvx.kernels.triton.ragged_decode import ragged_decode_kernel

    batch, heads, q_len, dim = query.shape
    if q_len != 1:
        raise ValueError(f"the ragged decode kernel takes one query per head, got {q_len}")
    segments = offsets.numel() - 1
    groups = heads * batch // segments
    if splits is None:
        longest = int(offsets.diff().max()) if segments else 0
        splits = max(1, min(16, triton.cdiv(longest, 512)))
    q = query.reshape(segments, groups, dim).contiguous()  # heads of a segment are consecutive
    acc = torch.empty(segments, splits, groups, dim, device=query.device, dtype=torch.float32)
    running_max = torch.empty(segments, splits, groups, device=query.device, dtype=torch.float32)
    running_sum = torch.empty_like(running_max)
    ragged_decode_kernel[(segments, splits)](
        q, keys.contiguous(), values.contiguous(), offsets.contiguous(), acc, running_max, running_sum,
        float(scaling), float(softcap or 1.0),
        G=groups, D=dim, BLOCK_G=max(16, triton.next_power_of_2(groups)), BLOCK_D=max(16, triton.next_power_of_2(dim)),
        BLOCK_N=32, SPLITS=splits, USE_SOFTCAP=softcap is not None,
    )
    out, lse = combine_splits(acc, running_max, running_sum)
    return out.reshape(batch, heads, 1, dim), lse.reshape(batch, heads, 1)


def combine_splits(acc: torch.Tensor, running_max: torch.Tensor, running_sum: torch.Tensor):
    """Partial results of a split-KV decode kernel, ``acc [R, splits, G, Dv]`` and ``running_max /
    running_sum [R, splits, G]`` -> ``(out [R, G, Dv], lse [R, G])`` float32; a row that saw nothing:
    out 0, lse -inf."""
    total_max = running_max.amax(dim=1, keepdim=True)
    weight = torch.exp(running_max - total_max).nan_to_num(0.0)
    denominator = (running_sum * weight).sum(dim=1)  # [R, G]
    out = (acc * weight[..., None]).sum(dim=1) / denominator[..., None].clamp_min(1e-30)
    lse = torch.log(denominator) + total_max[:, 0]
    out = torch.where(denominator[..., None] > 0, out, torch.zeros_like(out))
    return out, lse
