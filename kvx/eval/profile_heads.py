"""``kvx profile-heads``: which attention heads retrieve, measured on synthetic copy prompts.

Paper: Wu et al., "Retrieval Head Mechanistically Explains Long-Context Factuality" (2024).

Each prompt is a needle-in-a-haystack prompt of :mod:`kvx.eval.haystack` (one needle, at a depth
of the grid) followed by its answer, teacher-forced: while the model reads the answer, the query
at each answer position predicts the next value token, which it has to copy from the needle.
A query head *retrieves* at that step when its top-attended token lies in the needle and is the
token being copied (the paper's rule, so a repeated digit counts at either place). The score of a
(layer, query head) is the share of copy steps where it retrieves, over every prompt; a KV head's
score is the most (``reduce=max``) or the mean of its query heads'. Unlike the paper, every step of
the reference answer counts, whether or not the model would have produced it (one forward per
prompt instead of a generation), so a model that fails the task still gets scores.

Attention is read through kvx's own attention path: the model is patched with a probe selection
that reads the queries (RoPE applied) and keys each layer's attention function receives and keeps
everything, so nothing about the model's q/k/v or RoPE is re-implemented.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

import kvx
from kvx.compat import decoder_config
from kvx.eval.haystack import NEEDLE, PromptTemplate, build_prompt, make_needles
from kvx.kernels.reference import window_attention_probs
from kvx.policies._head_scores import HeadScores, model_identity
from kvx.policy import CompressionView, Policy, check_choice, check_positive_int

REDUCTIONS = ("max", "mean")
METHODS = ("retrieval", "duo")


@dataclass
class ProfileSettings:
    """The prompts of a profile (recorded in the scores file)."""

    lengths: tuple[int, ...] = (1024, 2048)
    depths: tuple[float, ...] = (0, 25, 50, 75, 100)
    samples: int = 2
    seed: int = 0
    number_rate: float = 0.25  # share of filler sentences with a number (kvx.eval.haystack)
    reduce: str = "max"  # query heads -> KV head

    def __post_init__(self) -> None:
        check_choice("profile-heads", "reduce", self.reduce, REDUCTIONS)
        check_positive_int("profile-heads", "samples", self.samples)
        if not self.lengths or not self.depths:
            raise ValueError("profile-heads: give at least one length and one depth")


@dataclass
class CopyPrompt:
    """A teacher-forced copy prompt: ``ids`` (prompt + answer but its last token); the last
    ``len(targets)`` queries each copy ``targets[k]`` from the needle at ``needle[0]:needle[1]``."""

    ids: list[int]
    targets: list[int]
    needle: tuple[int, int]


def copy_prompt(tokenizer: Any, length: int, depth: float, rng: random.Random, number_rate: float) -> CopyPrompt:
    """One single-needle prompt of ``length`` tokens with its value appended (teacher forcing)."""
    spec = make_needles("single", rng)
    prompt = build_prompt(tokenizer, length, depth, spec, rng, template=PromptTemplate(tokenizer),
                          number_rate=number_rate)
    key, value = spec.needles[0]
    start = prompt.needle_positions[0]
    needle_len = len(tokenizer(" " + NEEDLE.format(key=key, value=value), add_special_tokens=False)["input_ids"])
    needle = prompt.ids[start: start + needle_len]
    for text in (" " + value, value):
        answer = tokenizer(text, add_special_tokens=False)["input_ids"]
        if any(needle[i: i + len(answer)] == answer for i in range(len(needle) - len(answer) + 1)):
            return CopyPrompt(prompt.ids + answer[:-1], answer, (start, start + needle_len))
    raise ValueError(f"profile-heads: the tokenizer splits the needle's value {value!r} differently inside the needle "
                     "than alone, so the tokens being copied cannot be located")


@dataclass
class AttentionProbe(Policy):
    """A selection that keeps everything and records, for the last ``last`` queries of a forward,
    the key each query head attends to most: ``top[layer] [B, H, last]`` (positions in storage)."""

    name: ClassVar[str] = "profile_probe"
    summary: ClassVar[str] = "records top-attended keys (kvx profile-heads); keeps everything"

    last: int = 1

    def validate(self) -> None:
        check_positive_int(self.name, "last", self.last)
        self._top: dict[int, torch.Tensor] = {}

    def records(self) -> dict[int, torch.Tensor]:
        return self._top

    def select_mask(self, view: CompressionView) -> None:
        last = min(self.last, view.query.shape[-2])
        probs = window_attention_probs(view.query[..., -last:, :], view.keys, view.query_mask(last),
                                       view.scaling, view.softcap)  # [B, Hkv, G, last, S]
        batch, kv_heads, groups = probs.shape[:3]
        self._top[view.layer_idx] = probs.argmax(-1).reshape(batch, kv_heads * groups, last).cpu()
        return None


def retrieval_hits(top: torch.Tensor, prompt: CopyPrompt) -> torch.Tensor:
    """``[H]`` copy steps (of ``prompt``) where each query head's top key ``top [H, n]`` is a needle
    token equal to the token being copied."""
    ids = torch.tensor(prompt.ids)
    targets = torch.tensor(prompt.targets)
    in_needle = (top >= prompt.needle[0]) & (top < prompt.needle[1])
    return (in_needle & (ids[top] == targets)).sum(-1)


def profile_heads(model: torch.nn.Module, tokenizer: Any, settings: ProfileSettings | None = None,
                  progress: bool = True) -> HeadScores:
    """Retrieval scores ``[L, Hkv]`` of ``model`` over the prompts of ``settings`` (module docstring).
    Layers kvx leaves to the model (sliding windows) score NaN."""
    from kvx.eval.needle import progress_bar

    settings = settings or ProfileSettings()
    config = decoder_config(model.config)
    layers, heads, kv_heads = config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads
    hits = torch.zeros(layers, heads)
    seen = torch.zeros(layers)
    cells = [(n, d, s) for n in settings.lengths for d in settings.depths for s in range(settings.samples)]
    probe = AttentionProbe()
    with kvx.patched(model, probe, chunk_size=None), torch.inference_mode():
        for length, depth, sample in progress_bar(cells, progress, "profile-heads"):
            rng = random.Random(f"{settings.seed}:{length}:{depth:g}:{sample}")
            prompt = copy_prompt(tokenizer, length, depth, rng, settings.number_rate)
            probe.last = len(prompt.targets)
            probe.records().clear()
            model(torch.tensor([prompt.ids], device=model.device), use_cache=True)
            for layer, top in probe.records().items():
                hits[layer] += retrieval_hits(top[0], prompt)
                seen[layer] += len(prompt.targets)
    query_scores = hits / seen[:, None]  # NaN where no step was seen (layers kvx does not manage)
    grouped = query_scores.view(layers, kv_heads, heads // kv_heads)
    scores = grouped.amax(-1) if settings.reduce == "max" else grouped.mean(-1)
    return HeadScores(scores, query_scores, model_identity(model), "retrieval", asdict(settings))


def format_scores(scores: HeadScores, top: int = 10) -> str:
    """A table of every layer's KV-head scores, then the ``top`` heads by score."""
    table = scores.scores
    header = ["layer"] + [f"kv{h}" for h in range(table.shape[1])]
    rows = [header] + [[str(layer)] + ["-" if v != v else f"{v:.3f}" for v in row.tolist()]
                       for layer, row in enumerate(table)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    order = ranked_heads(table)[:top]
    lines.append(f"top {len(order)}: " + ", ".join(f"L{layer}.kv{head} ({table[layer, head]:.3f})"
                                                   for layer, head in order))
    return "\n".join(lines)


def ranked_heads(table: torch.Tensor) -> list[tuple[int, int]]:
    """``(layer, kv_head)`` of every scored head, best first (ties: lower layer, then head)."""
    flat = table.flatten()
    order = flat.masked_fill(flat.isnan(), -float("inf")).sort(descending=True, stable=True).indices
    return [divmod(int(i), table.shape[1]) for i in order if not flat[i].isnan()]


def write_heatmap(scores: HeadScores, path: Path) -> Path:
    """A PNG of the scores, layers (rows) x KV heads (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = scores.scores.numpy()
    fig, ax = plt.subplots(figsize=(1.5 + 0.5 * table.shape[1], 1.0 + 0.35 * table.shape[0]))
    image = ax.imshow(table, vmin=0, vmax=max(1e-6, float(scores.scores.nan_to_num(0).max())), cmap="viridis",
                      aspect="auto")
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_title(f"{scores.method} scores: {Path(str(scores.model.get('name_or_path') or 'model')).name}", fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- the command ---------------------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    """Register ``kvx profile-heads`` on the CLI's sub-parsers."""
    from kvx.cli import int_at_least, model_flags, progress_flag
    from kvx.eval.needle import DEFAULT_MODEL

    p = sub.add_parser(
        "profile-heads", help="score each (layer, KV head) as a retrieval head; write a pattern for retrieval_heads",
        description="Runs teacher-forced needle prompts and scores each head by how often its top attention lands on "
                    "the needle token being copied (Wu et al., 2024). Writes OUT (safetensors: scores, model "
                    "identity, prompt settings, schema version) and OUT with .png (a heatmap); prints a table.",
    )
    p.add_argument("model", nargs="?", default=str(DEFAULT_MODEL), help="local directory or hub id "
                   "(default: kvx's shipped needle model)")
    p.add_argument("--out", required=True, help="scores file to write (.safetensors)")
    p.add_argument("--tokenizer", help="tokenizer path, when not in the model directory")
    p.add_argument("--lengths", default="1k,2k", help="prompt lengths in tokens, comma-separated (default 1k,2k)")
    p.add_argument("--depths", default="0,25,50,75,100", help="needle depths in percent (default 0,25,50,75,100)")
    p.add_argument("--samples", type=int_at_least(1), default=2, help="prompts per length and depth (default 2)")
    p.add_argument("--seed", type=int, default=0, help="prompt seed (default 0)")
    p.add_argument("--reduce", choices=REDUCTIONS, default="max", help="query heads -> KV head (default max)")
    p.add_argument("--method", choices=METHODS, default="retrieval",
                   help="retrieval: the retrieval score (Wu et al.); duo: DuoAttention gate optimisation (default retrieval)")
    duo = p.add_argument_group("--method duo")
    duo.add_argument("--steps", type=int_at_least(1), default=200, help="training steps (default 200)")
    duo.add_argument("--lr", type=float, default=0.05, help="Adam learning rate of the gates (default 0.05)")
    duo.add_argument("--l1", type=float, default=0.05, help="weight of the L1 penalty on the gates (default 0.05)")
    duo.add_argument("--sink", type=int_at_least(0), default=64, help="streaming attention's sinks (default 64)")
    duo.add_argument("--recent", type=int_at_least(1), default=256, help="streaming attention's window (default 256)")
    p.add_argument("--top", type=int_at_least(1), default=10, help="heads listed after the table (default 10)")
    model_flags(p)
    progress_flag(p)
    p.set_defaults(func=run_command)


def run_command(args: Any) -> int:
    from kvx.cli import _parse_ints, _parse_numbers, safetensors_path
    from kvx.eval.needle import load_model

    out = safetensors_path(args.out)
    lengths = tuple(_parse_ints(args.lengths, "--lengths"))
    if args.method == "duo":
        from kvx.eval.duo_gates import DuoSettings, train_gates

        duo = DuoSettings(lengths, args.steps, args.lr, args.l1, args.sink, args.recent, seed=args.seed)
        model, tokenizer = load_model(args.model, args.tokenizer, args.dtype, args.device)
        scores = train_gates(model, tokenizer, duo, progress=not args.no_progress)
    else:
        settings = ProfileSettings(lengths, tuple(_parse_numbers(args.depths, "--depths")), args.samples, args.seed,
                                   reduce=args.reduce)
        model, tokenizer = load_model(args.model, args.tokenizer, args.dtype, args.device)
        scores = profile_heads(model, tokenizer, settings, progress=not args.no_progress)
    print(format_scores(scores, args.top))
    print(f"wrote {scores.save(out)}")
    print(f"wrote {write_heatmap(scores, out.with_suffix('.png'))}")
    print(f"settings: {json.dumps(scores.settings)}")
    return 0
