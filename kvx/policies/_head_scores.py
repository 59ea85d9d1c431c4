"""Per-head scores of a model (``kvx profile-heads``), saved as safetensors, and the model identity
that ties them to one model.

File layout (schema version :data:`SCHEMA_VERSION`):

- tensor ``scores``: ``[L, Hkv]`` float32, one score per (layer, KV head), higher = more a
  retrieval head; NaN for layers kvx leaves to the model (sliding-window layers), which no policy
  compresses;
- tensor ``query_scores``: ``[L, H]`` float32, the same per query head before the GQA reduction;
- metadata (strings): ``schema_version``, ``method`` (``retrieval`` or ``duo``), ``model`` (JSON of
  :func:`model_identity`), ``settings`` (JSON of the prompt / training settings), ``kvx`` (version).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SCHEMA_VERSION = 1
IDENTITY_FIELDS = ("model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size",
                   "vocab_size")
"""Config fields a pattern must share with the model it is used on (the shape of its heads)."""


def model_identity(model: Any) -> dict[str, Any]:
    """What ties scores to a model: its decoder config's shape fields, its name or path, and a
    fingerprint of its weights (``kvx.eval.needle.weights_fingerprint``)."""
    from kvx.compat import decoder_config
    from kvx.eval.needle import weights_fingerprint

    config = decoder_config(model.config)
    identity = {name: getattr(config, name, None) for name in IDENTITY_FIELDS}
    identity["name_or_path"] = str(getattr(model, "name_or_path", "") or getattr(config, "_name_or_path", "") or "")
    identity["weights"] = weights_fingerprint(model)
    return identity


@dataclass
class HeadScores:
    """Scores ``[L, Hkv]`` (and ``query_scores [L, H]``) of one model, with how they were made."""

    scores: torch.Tensor
    query_scores: torch.Tensor
    model: dict[str, Any]
    method: str = "retrieval"
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return self.scores.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.scores.shape[1]

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        import kvx

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"schema_version": str(SCHEMA_VERSION), "method": self.method, "kvx": kvx.__version__,
                    "model": json.dumps(self.model, sort_keys=True), "settings": json.dumps(self.settings, sort_keys=True)}
        tensors = {"scores": self.scores.float().contiguous(), "query_scores": self.query_scores.float().contiguous()}
        save_file(tensors, str(path), metadata=metadata)
        return path

    def check_model(self, model: Any, path: str | Path = "the pattern") -> None:
        """Raise a ``ValueError`` naming the fields that differ when ``model`` is not the model these
        scores were profiled on (its head shape); a weights fingerprint that differs is a warning
        (a fine-tune of the same model may share its retrieval heads)."""
        check_identity(self.model, model, f"head pattern {path} was profiled",
                       "profile this model with `kvx profile-heads MODEL --out FILE`", "its retrieval heads")


def check_identity(saved: dict[str, Any], model: Any, made: str, remedy: str, what_differs: str,
                   stacklevel: int = 5) -> None:
    """Raise a ``ValueError`` naming the fields that differ when ``model`` is not the one whose
    identity (:func:`model_identity`) was ``saved`` (its head shape): ``"{made} on another model
    (...): fields; {remedy}"``; a weights fingerprint that differs is a warning that
    ``what_differs`` may differ here (a fine-tune of the same model)."""
    import warnings

    theirs = model_identity(model)
    differ = [f"{name}: pattern {saved.get(name)!r}, model {theirs[name]!r}"
              for name in IDENTITY_FIELDS if saved.get(name) != theirs[name]]
    if differ:
        raise ValueError(f"{made} on another model ({saved.get('name_or_path')!r}): {'; '.join(differ)}; {remedy}")
    if saved.get("weights") not in (None, theirs["weights"]):
        warnings.warn(f"{made} on a model with other weights ({saved.get('name_or_path')!r}, same shape): "
                      f"{what_differs} may differ here", UserWarning, stacklevel=stacklevel)


def read_tensor_file(path: Path, label: str, command: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """``(metadata, tensors)`` of a safetensors file that ``command`` makes (``kvx profile-heads``,
    ``kvx search-patterns``); a missing or unreadable file raises a ``ValueError`` starting
    ``"{label} {path}:"`` that says how to make one."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise ValueError(f"{label} {path}: no such file; make one with `{command} MODEL --out {path}`")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{label} {path}: not a safetensors file ({err})") from None
    return metadata, tensors


def load_scores(path: str | Path) -> HeadScores:
    """Read a scores file; a missing file, another format or an unknown schema version raises a
    ``ValueError`` that names the file and what was expected."""
    path = Path(path)
    metadata, tensors = read_tensor_file(path, "head pattern", "kvx profile-heads")
    version = metadata.get("schema_version")
    if version != str(SCHEMA_VERSION):
        raise ValueError(f"head pattern {path}: schema version {version!r} is not one this kvx reads "
                         f"({SCHEMA_VERSION}); profile the model again with this kvx (`kvx profile-heads`)")
    missing = sorted({"scores", "query_scores"} - set(tensors)) + sorted({"model", "method"} - set(metadata))
    if missing:
        raise ValueError(f"head pattern {path}: missing {', '.join(missing)} (schema {SCHEMA_VERSION})")
    scores = tensors["scores"]
    if scores.dim() != 2:
        raise ValueError(f"head pattern {path}: scores must be [layers, KV heads], got shape {tuple(scores.shape)}")
    return HeadScores(scores.float(), tensors["query_scores"].float(), json.loads(metadata["model"]),
                      metadata["method"], json.loads(metadata.get("settings", "{}")))
