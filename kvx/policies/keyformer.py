"""Keyformer: key tokens by Gumbel-regularised attention scores, plus a recent window.

Paper: Adnan et al., "Keyformer: KV Cache Reduction through Key Tokens Selection for Efficient
Generative Inference" (MLSys 2024).

Each scoring query adds Gumbel noise to its logits and takes a softmax at temperature ``tau``;
these regularised probabilities accumulate per token across forwards, and the ``recent``
newest tokens are always kept. Scoring queries: the last ``window`` queries of a prompt (so no
T x T matrix), and each decoded query. The noise is a seeded hash of head, query and key
position counted from the newest token: reproducible, and the same for a row alone or in a
padded batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvx.kernels.reference import grouped_logits
from kvx.policies._scoring import accumulate, keep_recent
from kvx.policy import BudgetedPolicy, CompressionView, check_number, check_positive_int, option, register_policy


def hashed_uniform(shape: torch.Size, layer_idx: int, seed: int, device: torch.device) -> torch.Tensor:
    """Uniform (0, 1) noise ``[Hkv, G, w, S]`` that is a hash of (head, query, key counted from the
    newest, layer, seed): the same for a row alone or inside a left-padded batch."""
    kv_heads, groups, window, num_keys = shape
    head = torch.arange(kv_heads * groups, device=device).reshape(kv_heads, groups, 1, 1)
    query = torch.arange(window, device=device).reshape(1, 1, window, 1)
    key_from_newest = torch.arange(num_keys - 1, -1, -1, device=device).reshape(1, 1, 1, num_keys)
    x = (key_from_newest * 73856093) ^ (query * 19349663) ^ (head * 83492791) ^ (layer_idx * 2654435761 + seed * 97)
    for _ in range(2):  # integer mixing (splitmix-style), kept in 32 bits
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    x = x ^ (x >> 16)
    return (x.double() + 0.5) / 2**32


@register_policy
@dataclass
class Keyformer(BudgetedPolicy):
    """Gumbel-softmax key-token scores, accumulated, + recent window (Adnan et al., 2024)."""

    name: ClassVar[str] = "keyformer"
    summary: ClassVar[str] = "Gumbel-regularised accumulated key scores + recent window (Adnan et al., 2024)"

    decode_interval: int = option(1, "also compress while generating, every N tokens past capacity (0: prompt only)")
    recent: int = option(32, "most recent tokens that are always kept")
    window: int = option(32, "last prompt queries that score the prompt")
    tau: float = option(1.0, "softmax temperature of the regularised scores (> 0)")
    seed: int = option(0, "seed of the Gumbel noise")

    always_kept_option: ClassVar[str] = "recent"

    def validate(self) -> None:
        super().validate()
        check_positive_int(self.name, "window", self.window)
        check_number(self.name, "tau", self.tau, low=0, low_open=True)
        check_positive_int(self.name, "seed", self.seed, minimum=0)

    def observe(self, view: CompressionView) -> None:
        window = min(self.window, view.query.shape[-2])
        heads = view.query.shape[1]
        kv_heads, num_keys = view.keys.shape[1], view.keys.shape[2]
        logits = grouped_logits(view.query[..., -window:, :], view.keys, view.scaling, view.softcap)  # [B, Hkv, G, w, S]
        gumbel = -torch.log(-torch.log(hashed_uniform(logits.shape[1:], view.layer_idx, self.seed, logits.device)))
        mask = view.query_mask(window)
        mask = mask.reshape(mask.shape[0], kv_heads if mask.shape[1] == heads else 1, -1, window, num_keys)
        probs = torch.softmax(((logits + gumbel.float()) / self.tau).masked_fill(~mask, -torch.inf), dim=-1)
        accumulate(view.state, "keyformer", torch.nan_to_num(probs, nan=0.0).sum(dim=(2, 3)))

    def score(self, view: CompressionView) -> torch.Tensor:
        return keep_recent(view.state["keyformer"], self.recent)
