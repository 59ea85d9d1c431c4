"""DuoAttention-style gate optimisation: the second way ``kvx profile-heads`` scores heads (``--method duo``).

Paper: Xiao et al., "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and
Streaming Heads" (2024), section 3.2.

Every compressible (layer, KV head) gets a gate ``a`` in [0, 1], starting at 1. Its attention
output becomes ``a x full + (1 - a) x streaming``, where *streaming* attends only to the first
``sink`` and the last ``recent`` keys of each query. The model's weights are frozen; the gates are
trained with Adam to keep the last hidden states at the answer positions of the teacher-forced
copy prompts (:func:`kvx.eval.profile_heads.copy_prompt`) equal to the full model's (mean squared
error), plus ``l1 x`` the mean gate, which pushes gates to 0 where full attention is not needed.
The trained gates are the scores (same file format, ``method=duo``).

The gated attention is a function registered with transformers' attention interface through
``kvx.compat`` (the model still computes its own q, k, v and RoPE), switched on for the training
only. Unlike the paper: the training data are kvx's needle prompts, not passkey retrieval over
book text, and it runs a few hundred steps of batch 1.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

from kvx.cache import KVCache
from kvx.compat import decoder_config, register_attention
from kvx.eval.profile_heads import copy_prompt
from kvx.kernels import reference
from kvx.patches import find_attention
from kvx.policies._head_scores import HeadScores, model_identity
from kvx.policy import check_positive_int
from kvx.storage.base import Storage

GATED_ATTENTION = "kvx_duo_gates"
GATES_ATTR = "_kvx_duo_gates"


@dataclass
class DuoSettings:
    """The gate training (recorded in the scores file)."""

    lengths: tuple[int, ...] = (1024,)
    steps: int = 200
    lr: float = 0.05
    l1: float = 0.05
    sink: int = 64
    recent: int = 256
    last: int = 32  # answer-end positions whose hidden states are matched
    seed: int = 0
    number_rate: float = 0.25

    def __post_init__(self) -> None:
        for name in ("steps", "recent", "last"):
            check_positive_int("profile-heads --method duo", name, getattr(self, name))
        check_positive_int("profile-heads --method duo", "sink", self.sink, minimum=0)
        if min(self.lengths) <= self.sink + self.recent:
            raise ValueError(f"profile-heads --method duo: every length must exceed sink + recent "
                             f"({self.sink} + {self.recent}) so streaming heads drop something; got {self.lengths}")


@dataclass
class _Gates:
    """What the gated attention function reads from a module: the gate table and this layer's row."""

    table: torch.Tensor  # [L, Hkv], requires grad
    layer: int | None  # None: not gated (a layer no policy compresses)
    sink: int
    recent: int


def streaming_mask(q_len: int, kv_len: int, sink: int, recent: int, device: torch.device) -> torch.Tensor:
    """``[1, 1, q, S]`` bool: each query (the last ``q`` of ``S`` positions) sees the first ``sink``
    keys and its own ``recent`` most recent ones, causally."""
    query_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    key_pos = torch.arange(kv_len, device=device)[None, :]
    causal = key_pos <= query_pos
    return (causal & ((key_pos < sink) | (key_pos > query_pos - recent)))[None, None]


def gated_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    softcap: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: ``query [B, H, q, D]``, ``key/value [B, Hkv, S, D]`` ->
    ``(out [B, q, H, D], None)``, each KV head's output a gated mix of full and streaming attention."""
    gates: _Gates = getattr(module, GATES_ATTR)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    full = reference.attention(query, key, value, attention_mask, scaling, softcap)
    if gates.layer is None:
        return full.transpose(1, 2).contiguous(), None
    q_len, kv_len = query.shape[-2], key.shape[-2]
    mask = streaming_mask(q_len, kv_len, gates.sink, gates.recent, query.device)
    if attention_mask is not None:
        mask = mask & attention_mask
    streaming = reference.attention(query, key, value, mask, scaling, softcap)
    gate = gates.table[gates.layer].clamp(0, 1).repeat_interleave(query.shape[1] // key.shape[1])  # [H]
    out = gate[None, :, None, None] * full + (1 - gate[None, :, None, None]) * streaming
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def gated(model: torch.nn.Module, table: torch.Tensor, sink: int, recent: int) -> Iterator[None]:
    """Run ``model`` with :func:`gated_attention` (gates ``table [L, Hkv]``) on the layers kvx would
    compress; everything is restored on exit."""
    register_attention(GATED_ATTENTION, gated_attention)
    compressible = [isinstance(layer, Storage) for layer in KVCache(model.config).layers]
    modules = find_attention(model).modules
    original = model.config._attn_implementation
    for module in modules:
        layer = module.layer_idx if compressible[module.layer_idx] else None
        setattr(module, GATES_ATTR, _Gates(table, layer, sink, recent))
    model.set_attn_implementation(GATED_ATTENTION)
    try:
        yield
    finally:
        model.set_attn_implementation(original)
        for module in modules:
            delattr(module, GATES_ATTR)


def last_hidden(model: torch.nn.Module, ids: torch.Tensor, last: int) -> torch.Tensor:
    """``[1, last, hidden]`` final hidden states of the last ``last`` positions."""
    out = model(ids, use_cache=False, output_hidden_states=True)
    return out.hidden_states[-1][:, -last:]


def train_gates(model: torch.nn.Module, tokenizer: Any, settings: DuoSettings | None = None,
                progress: bool = True) -> HeadScores:
    """Trained gates ``[L, Hkv]`` of ``model`` as scores (module docstring); layers kvx leaves to the
    model score NaN."""
    from kvx.eval.needle import progress_bar

    settings = settings or DuoSettings()
    config = decoder_config(model.config)
    layers, heads, kv_heads = config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads
    device = next(model.parameters()).device
    table = torch.ones(layers, kv_heads, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([table], lr=settings.lr)
    rng = random.Random(settings.seed)
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    try:
        for _ in progress_bar(list(range(settings.steps)), progress, "profile-heads (duo)"):
            prompt = copy_prompt(tokenizer, rng.choice(settings.lengths), rng.uniform(0, 100), rng,
                                 settings.number_rate)
            ids = torch.tensor([prompt.ids], device=device)
            with torch.no_grad():
                target = last_hidden(model, ids, settings.last)
            with gated(model, table, settings.sink, settings.recent):
                hidden = last_hidden(model, ids, settings.last)
            loss = (hidden - target).float().pow(2).mean() + settings.l1 * table.clamp(0, 1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                table.clamp_(0, 1)
    finally:
        for p, requires_grad in frozen:
            p.requires_grad_(requires_grad)
    scores = table.detach().cpu().clone()
    compressible = torch.tensor([isinstance(layer, Storage) for layer in KVCache(model.config).layers])
    scores[~compressible] = float("nan")
    query_scores = scores.repeat_interleave(heads // kv_heads, dim=1)
    return HeadScores(scores, query_scores, model_identity(model), "duo", asdict(settings))
