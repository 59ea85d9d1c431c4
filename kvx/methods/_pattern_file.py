"""Per-head block-sparse patterns of a model (``kvx search-patterns``), saved as safetensors with the
model's identity, and read back by the ``head_patterns`` method.

File layout (schema version :data:`SCHEMA_VERSION`, ``kind`` :data:`KIND`):

- tensor ``pattern``: ``[L, H]`` int32, per (layer, query head) the index in :data:`PATTERNS` of
  its pattern (0 ``a_shape``, 1 ``vertical_slash``, 2 ``block_topk``), ``-1`` for layers kvx leaves
  to the model (sliding-window layers: attended densely by the model itself);
- tensor ``local``: ``[L, H]`` int32, the local key blocks (its own included) each query block of
  that head computes: an ``a_shape`` head's size, the shared ``local`` of the others;
- tensor ``density``: ``[L, H]`` float64 (so 0.3 reads back as the 0.3 the method counts with), the share of the causal key blocks a ``vertical_slash`` /
  ``block_topk`` head keeps per query block (its size); 0 for ``a_shape`` heads (sink + local only);
- tensor ``recall``: ``[L, H]`` float32, the chosen pattern's mean attention recall on the
  calibration prompts (the share of the dense attention mass its blocks cover), NaN where not
  searched; ``computed``: ``[L, H]`` float32, the share of the causal blocks it computed there;
- tensors ``candidate_recall`` / ``candidate_computed``: ``[L, H, C]`` float32, the same for every
  candidate (``settings["candidates"]`` names them, in order), so a choice can be checked;
- metadata (strings): ``schema_version``, ``kind``, ``model`` (JSON of
  :func:`kvx.policies._head_scores.model_identity`, the identity ``kvx profile-heads`` files carry),
  ``settings`` (JSON: ``block_size``, ``sink``, ``local``, ``last_queries``, the target ``density``,
  the candidates and the calibration prompts), ``kvx`` (version).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvx.policies._head_scores import check_identity, read_tensor_file

SCHEMA_VERSION = 1
KIND = "block_patterns"
PATTERNS = ("a_shape", "vertical_slash", "block_topk")
"""Pattern ids of the ``pattern`` tensor, in this order."""
NOT_SEARCHED = -1
TENSORS = ("pattern", "local", "density", "recall", "computed", "candidate_recall", "candidate_computed")
REMEDY = "search this model with `kvx search-patterns MODEL --out FILE`"


@dataclass
class PatternFile:
    """Per-(layer, query head) patterns of one model, with how they were searched (module docstring)."""

    pattern: torch.Tensor  # [L, H] int32
    local: torch.Tensor  # [L, H] int32
    density: torch.Tensor  # [L, H] float64
    recall: torch.Tensor  # [L, H] float32
    computed: torch.Tensor  # [L, H] float32
    candidate_recall: torch.Tensor  # [L, H, C] float32
    candidate_computed: torch.Tensor  # [L, H, C] float32
    model: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return self.pattern.shape[0]

    @property
    def num_heads(self) -> int:
        return self.pattern.shape[1]

    @property
    def block_size(self) -> int:
        return int(self.settings["block_size"])

    @property
    def sink(self) -> int:
        return int(self.settings["sink"])

    def names(self) -> list[list[str]]:
        """``[L][H]`` the pattern names (``dense`` where not searched)."""
        return [[PATTERNS[p] if p >= 0 else "dense" for p in row] for row in self.pattern.tolist()]

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        import kvx

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"schema_version": str(SCHEMA_VERSION), "kind": KIND, "kvx": kvx.__version__,
                    "model": json.dumps(self.model, sort_keys=True), "settings": json.dumps(self.settings, sort_keys=True)}
        tensors = {name: getattr(self, name).detach().cpu().clone().contiguous() for name in TENSORS}  # no shared memory
        tensors["pattern"], tensors["local"] = tensors["pattern"].int(), tensors["local"].int()
        tensors["density"] = tensors["density"].double()
        save_file(tensors, str(path), metadata=metadata)
        return path

    def check_model(self, model: Any, path: str | Path = "the pattern file") -> None:
        """Raise a ``ValueError`` when ``model`` is not the model this file was searched on: its
        layer or query-head count first (named as such), then any other identity field (model type,
        KV heads, hidden size, vocabulary); other weights of the same shape are a warning."""
        from kvx.compat import decoder_config

        config = decoder_config(model.config)
        layers, heads = config.num_hidden_layers, config.num_attention_heads
        if (self.num_layers, self.num_heads) != (layers, heads):
            raise ValueError(f"pattern file {path} holds {self.num_layers} layers x {self.num_heads} query heads, but "
                             f"the model has {layers} layers x {heads} query heads (head count mismatch: another "
                             f"model, {self.model.get('name_or_path')!r}); {REMEDY}")
        check_identity(self.model, model, f"pattern file {path} was searched", REMEDY, "its best patterns")

    def check_heads(self, layer_idx: int, heads: int, path: str | Path = "the pattern file") -> None:
        """Raise when layer ``layer_idx`` with ``heads`` query heads is not in this file."""
        if layer_idx >= self.num_layers or heads != self.num_heads:
            raise ValueError(f"pattern file {path} holds {self.num_layers} layers x {self.num_heads} query heads, but "
                             f"layer {layer_idx} has {heads} query heads (head count mismatch); {REMEDY}")


def load_patterns(path: str | Path) -> PatternFile:
    """Read a pattern file; a missing file, another format (a ``kvx profile-heads`` scores file
    included), an unknown schema version or inconsistent tensors raise a ``ValueError`` naming the
    file and what was expected."""
    path = Path(path)
    metadata, tensors = read_tensor_file(path, "pattern file", "kvx search-patterns")
    kind = metadata.get("kind")
    if kind != KIND:
        made_by = " (a `kvx profile-heads` scores file?)" if "scores" in tensors else ""
        raise ValueError(f"pattern file {path}: not a `kvx search-patterns` file{made_by}: its kind is {kind!r}, "
                         f"expected {KIND!r}")
    version = metadata.get("schema_version")
    if version != str(SCHEMA_VERSION):
        raise ValueError(f"pattern file {path}: schema version {version!r} is not one this kvx reads "
                         f"({SCHEMA_VERSION}); search the model again with this kvx (`kvx search-patterns`)")
    missing = sorted(set(TENSORS) - set(tensors)) + sorted({"model", "settings"} - set(metadata))
    if missing:
        raise ValueError(f"pattern file {path}: missing {', '.join(missing)} (schema {SCHEMA_VERSION})")
    settings = json.loads(metadata["settings"])
    lost = sorted({"block_size", "sink"} - set(settings))
    if lost:
        raise ValueError(f"pattern file {path}: its settings lack {', '.join(lost)} (schema {SCHEMA_VERSION})")
    shape = tuple(tensors["pattern"].shape)
    bad = [name for name in TENSORS if tuple(tensors[name].shape[:2]) != shape or tensors[name].dim() != 2 + name.startswith("candidate")]
    if len(shape) != 2 or bad:
        raise ValueError(f"pattern file {path}: pattern must be [layers, query heads] and {', '.join(bad) or 'the rest'} "
                         f"the same, got pattern of shape {shape}")
    ids = tensors["pattern"]
    if bool(((ids < NOT_SEARCHED) | (ids >= len(PATTERNS))).any()):
        raise ValueError(f"pattern file {path}: pattern ids must be in -1..{len(PATTERNS) - 1}")
    return PatternFile(ids.int(), tensors["local"].int(), tensors["density"].double(), tensors["recall"].float(),
                       tensors["computed"].float(), tensors["candidate_recall"].float(),
                       tensors["candidate_computed"].float(), json.loads(metadata["model"]), settings)
