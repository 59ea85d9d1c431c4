"""``kvx search-patterns``: per (layer, query head), the block-sparse pattern and size that best keep
its attention on calibration prompts, for the ``head_patterns`` method.

Paper: Jiang et al., "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via Dynamic
Sparse Attention" (NeurIPS 2024), its offline kernel-aware pattern search; the sizes are spread over
the heads under one mean density, as MoA (Fu et al., "MoA: Mixture of Sparse Attention for Automatic
Large Language Model Compression", 2024) spreads attention spans.

What is measured. For every calibration prompt and every managed layer, the dense attention of the
last ``last_queries`` queries (``queries=last``, the default: where a prompt's answer is read), or of
every query (``queries=all``), RoPE applied and read through kvx's own attention path as ``kvx
profile-heads`` does, is summed per tile of the block grid: ``mass [H, Qb, Nb]``, each query's row
summing to 1. A *candidate* is a pattern at a size: ``a_shape`` with a number of local blocks,
``vertical_slash`` or ``block_topk`` at a density; its block lists are those the method builds on
that prompt (the same online estimates and index builder as
:func:`kvx.methods.head_patterns.head_lists`; a test checks it). Its **recall** on a head is the
share of the head's attention mass that falls in its blocks (the mean over the counted queries of
the attention each keeps), its **computed** share the blocks it computes over the causal ones (of
every query block); both are averaged over the prompts. On kvx's needle model, counting every query
equally chose ``a_shape`` and ``block_topk`` for heads whose few long-range reads carry the answer
(mean recall over all queries is dominated by filler queries that read locally) and lost needles;
counting the last queries did not (docs/block-sparse.md).

What is chosen. Each head takes the candidate that maximises ``recall - lambda x computed``, with
the one ``lambda >= 0`` (found by bisection) that brings the mean computed share over every head to
the *budget* or below, then what that leaves of the budget goes greedily to the switches with the
most recall per extra block (a multiple-choice knapsack, solved on its convex hull and then filled).
The budget is what ``vertical_slash`` / ``block_topk`` at the target ``density`` compute on the same
prompts, their sink and local floors included, so the choice costs what one pattern at that density
costs. Recalls are compared rounded to :data:`RECALL_TIE` (0.1%); ties go to the cheaper candidate,
then to the pattern listed first (``a_shape``: no estimate to run). With ``sizes=(1,)`` every dynamic
head keeps the target density and only the pattern varies.

The file (:mod:`kvx.methods._pattern_file`) carries the choice, every candidate's recall and
computed share (so a choice can be checked), the model's identity and the settings.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

import kvx
from kvx.compat import decoder_config
from kvx.eval.haystack import PromptTemplate, build_prompt, make_needles
from kvx.kernels.block_index import block_index, first_real_block
from kvx.kernels.reference import block_grid, causal_mask, window_attention_probs
from kvx.methods._pattern_file import NOT_SEARCHED, PATTERNS, PatternFile
from kvx.policies._head_scores import model_identity
from kvx.policy import CompressionView, Policy, check_choice, check_number, check_positive_int

DEFAULT_SIZES = (0.5, 1.0, 2.0)
"""Candidate densities by default, as multiples of the target (``--sizes``)."""
QUERIES = ("all", "last")
RECALL_TIE = 1e-3
"""Recalls are compared rounded to this (0.1% of a head's attention): closer ones tie, and the cheaper wins."""
CHUNK_ELEMENTS = 2**24
"""float32 attention probabilities per chunk of queries when summing the dense mass."""


@dataclass(frozen=True)
class Candidate:
    """A pattern at a size: ``local`` blocks for ``a_shape``, ``density`` for the others."""

    pattern: str
    local: int
    density: float

    @property
    def label(self) -> str:
        if self.pattern == "a_shape":
            return f"a_shape:local={self.local}"
        return f"{self.pattern}:density={self.density:g}"


@dataclass
class SearchSettings:
    """How a search runs (recorded in the pattern file)."""

    density: float = 0.1
    block_size: int = 64
    sink: int = 1
    local: int = 2
    last_queries: int = 64
    sizes: tuple[float, ...] = DEFAULT_SIZES  # candidate densities, as multiples of ``density``
    queries: str = "last"  # whose attention the recall counts: the last ``last_queries`` of a prompt, or all
    kinds: tuple[str, ...] = PATTERNS  # candidate patterns
    lengths: tuple[int, ...] = (1024, 2048)
    depths: tuple[float, ...] = (0, 50, 100)
    samples: int = 1
    seed: int = 0
    number_rate: float = 0.25
    text: str | None = None  # a calibration text file: windows of it instead of needle prompts

    def __post_init__(self) -> None:
        from kvx.kernels.block_sparse import check_block_size

        name = "search-patterns"
        check_number(name, "density", self.density, low=0, high=1, low_open=True)
        check_block_size(self.block_size, name)
        check_positive_int(name, "sink", self.sink, minimum=0)
        check_positive_int(name, "local", self.local, minimum=1)
        check_positive_int(name, "last_queries", self.last_queries)
        check_positive_int(name, "samples", self.samples)
        check_choice(name, "queries", self.queries, QUERIES)
        for size in self.sizes:
            check_number(name, "sizes", size, low=0, low_open=True)
        unknown = [p for p in self.kinds if p not in PATTERNS]
        if unknown or not self.kinds:
            raise ValueError(f"{name}: candidate patterns must be among {', '.join(PATTERNS)}; got "
                             f"{', '.join(unknown) or 'none'}")
        if not self.lengths or not self.sizes or (self.text is None and not self.depths):
            raise ValueError(f"{name}: give at least one length, size and depth")
        too_short = [n for n in self.lengths if n < 2 * self.block_size]
        if too_short:
            raise ValueError(f"{name}: lengths {', '.join(map(str, too_short))} are shorter than two blocks of "
                             f"{self.block_size} tokens: nothing to choose there")


def candidates(settings: SearchSettings) -> list[Candidate]:
    """Every candidate of a search: per size ``m``, density ``d = min(1, m x density)``; ``a_shape``
    with the local blocks that make sink + local about ``d`` of the causal blocks of an average query
    block at the mean calibration length (at least ``local``, the floor of the others: a query at the
    start of its block sees a block behind it), the others at ``d``. Duplicates dropped."""
    mean_blocks = sum(math.ceil(n / settings.block_size) for n in settings.lengths) / len(settings.lengths)
    mean_visible = (mean_blocks + 1) / 2  # causal key blocks of a query block, on average over the blocks
    out: list[Candidate] = []
    for size in sorted(settings.sizes):
        density = min(1.0, size * settings.density)
        for pattern in settings.kinds:
            if pattern == "a_shape":
                local = max(settings.local, round(density * mean_visible) - settings.sink)
                cand = Candidate(pattern, local, 0.0)
            else:
                cand = Candidate(pattern, settings.local, density)
            if cand not in out:
                out.append(cand)
    order = {p: i for i, p in enumerate(PATTERNS)}
    return sorted(out, key=lambda c: (order[c.pattern], c.local, c.density))


# --- what one layer's attention says ----------------------------------------------------------------


def attention_mass(query: torch.Tensor, keys: torch.Tensor, scaling: float, softcap: float | None,
                   block_size: int, last: int | None = None, chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """``[B, H, Qb, Nb]`` float32: the dense causal attention of every query (the last ``q`` of the
    ``S`` keys; with ``last``, of the last ``last`` queries alone) summed per tile of the end-aligned
    block grid; each query contributes 1 in all.

    Args:
        query: ``[B, H, q, D]``; keys: ``[B, Hkv, S, D]`` (no padding: a calibration prompt).
    """
    batch, heads, q_len, _ = query.shape
    kv_len = keys.shape[-2]
    num_qb, num_kb, pad = block_grid(q_len, kv_len, block_size)
    q_pad = num_qb * block_size - q_len  # the query grid is the key grid's last Qb blocks
    mass = torch.zeros(batch, heads, num_qb, num_kb, device=query.device)
    step = max(1, chunk_elements // (batch * heads * kv_len))
    for start in range(0 if last is None else max(0, q_len - last), q_len, step):
        stop = min(start + step, q_len)
        mask = causal_mask(q_len, kv_len, query.device, rows=(start, stop))
        probs = window_attention_probs(query[:, :, start:stop], keys, mask, scaling, softcap)  # [B, Hkv, G, c, S]
        probs = F.pad(probs.reshape(batch, heads, stop - start, kv_len), (pad, 0))
        rows = probs.view(batch, heads, stop - start, num_kb, block_size).sum(-1)  # [B, H, c, Nb]
        query_block = (q_pad + torch.arange(start, stop, device=query.device)) // block_size  # [c]
        mass.index_add_(2, query_block, rows)
    return mass


def list_recall(index: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """``[B, H]`` the share of the attention ``mass [B, H, Qb, Nb]`` in the blocks of ``index [B, H,
    Qb, K]`` (``-1`` = none)."""
    kept = mass.gather(-1, index.long().clamp(min=0)).masked_fill(index < 0, 0.0)
    return kept.sum((-1, -2)) / mass.sum((-1, -2)).clamp(min=1e-30)


def causal_blocks(num_qb: int, num_kb: int) -> int:
    """Causal key blocks summed over the query blocks of one head (no padding)."""
    own = num_kb - num_qb + torch.arange(num_qb)
    return int((own + 1).sum())


def candidate_stats(query: torch.Tensor, keys: torch.Tensor, scaling: float, softcap: float | None,
                    settings: SearchSettings, cands: list[Candidate]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(recall, computed)``, each ``[H, C]``, of every candidate on one layer of one prompt (row 0):
    the block lists as ``head_patterns`` builds them, against the dense attention mass."""
    query, keys = query[:1], keys[:1]
    heads, q_len, kv_len = query.shape[1], query.shape[2], keys.shape[2]
    n = settings.block_size
    num_qb, num_kb, _ = block_grid(q_len, kv_len, n)
    mass = attention_mass(query, keys, scaling, softcap, n, None if settings.queries == "all" else settings.last_queries)
    first = first_real_block(None, 1, heads, kv_len, n, query.device)
    causal = causal_blocks(num_qb, num_kb)
    recall = torch.empty(heads, len(cands))
    computed = torch.empty(heads, len(cands))
    estimates: dict[str, torch.Tensor] = {}
    for c, cand in enumerate(cands):
        if cand.pattern == "a_shape":
            index = block_index(None, num_qb, num_kb, first, settings.sink, cand.local)
        else:
            if cand.pattern not in estimates:  # every head on one pattern: the lists at density 1 rank its scores
                estimates[cand.pattern] = _scores(cand.pattern, query, keys, scaling, softcap, settings, num_qb, num_kb,
                                                  first)
            index = block_index(estimates[cand.pattern], num_qb, num_kb, first, settings.sink, settings.local,
                                cand.density)
        recall[:, c] = list_recall(index, mass)[0].cpu()
        computed[:, c] = ((index >= 0).sum((-1, -2))[0] / causal).cpu()
    return recall, computed


def _scores(pattern: str, query, keys, scaling, softcap, settings: SearchSettings, num_qb, num_kb, first):
    """The online estimate of ``pattern`` for every head (what ``head_patterns`` computes for its heads)."""
    from kvx.kernels.block_index import pooled_query_scores, vertical_slash_scores

    if pattern == "vertical_slash":
        return vertical_slash_scores(query, keys, None, scaling, settings.block_size, settings.last_queries, softcap)
    return pooled_query_scores(query, keys, None, scaling, settings.block_size, softcap)


@dataclass
class RecallProbe(Policy):
    """A selection that keeps everything and, at each prefill, adds every candidate's recall and
    computed share per (layer, query head) to running sums (:meth:`totals`)."""

    name: ClassVar[str] = "search_patterns_probe"
    summary: ClassVar[str] = "measures block-pattern recall (kvx search-patterns); keeps everything"

    settings: SearchSettings | None = None
    cands: tuple[Candidate, ...] = ()

    def validate(self) -> None:
        self._sums: dict[int, list] = {}  # layer -> [recall [H, C], computed [H, C], prompts]

    def totals(self) -> dict[int, list]:
        return self._sums

    def select_mask(self, view: CompressionView) -> None:
        if view.phase != "prefill":
            return None
        recall, computed = candidate_stats(view.query, view.keys, view.scaling, view.softcap, self.settings,
                                           list(self.cands))
        sums = self._sums.setdefault(view.layer_idx, [torch.zeros_like(recall), torch.zeros_like(computed), 0])
        sums[0] += recall
        sums[1] += computed
        sums[2] += 1
        return None


# --- choosing -------------------------------------------------------------------------------------


def allocate(recall: torch.Tensor, computed: torch.Tensor, target: float, iterations: int = 60) -> torch.Tensor:
    """``[N]`` the candidate of each head (rows of ``recall`` / ``computed [N, C]``) maximising
    ``recall - lambda x computed``, with the smallest ``lambda >= 0`` (bisection) whose choices' mean
    computed share is at most ``target`` (where no ``lambda`` reaches it, the cheapest candidates), then
    what that leaves of the budget spent greedily (:func:`_fill`). Ties: the cheaper candidate, then
    the lower index; recalls are compared rounded to :data:`RECALL_TIE`."""
    if recall.numel() == 0:
        return torch.zeros(recall.shape[0], dtype=torch.long)
    order = torch.arange(recall.shape[1], dtype=torch.float64)
    recall = (recall.double() / RECALL_TIE).round() * RECALL_TIE  # closer than RECALL_TIE: a tie
    computed = computed.double()
    target = target + 1e-6  # float rounding of the means compared

    def choose(lam: float) -> torch.Tensor:
        utility = recall - (lam + 1e-7) * computed - 1e-12 * order
        return utility.argmax(-1)

    def mean_computed(choice: torch.Tensor) -> float:
        return float(computed.gather(-1, choice[:, None]).mean())

    if mean_computed(choose(0.0)) <= target:
        return choose(0.0)
    low, high = 0.0, 1.0
    while mean_computed(choose(high)) > target and high < 1e6:
        low, high = high, high * 4
    for _ in range(iterations):
        mid = (low + high) / 2
        low, high = (mid, high) if mean_computed(choose(mid)) > target else (low, mid)
    return _fill(choose(high), recall, computed, target)


def _fill(choice: torch.Tensor, recall: torch.Tensor, computed: torch.Tensor, target: float) -> torch.Tensor:
    """``choice`` with the budget the trade-off left unused spent greedily: while one fits, the
    switch of one head to a candidate of higher recall with the most recall per extra block."""
    rows = torch.arange(recall.shape[0])
    room = target * recall.shape[0] - float(computed[rows, choice].sum())
    while True:
        gain = recall - recall[rows, choice][:, None]  # [N, C]
        cost = computed - computed[rows, choice][:, None]
        fits = (gain > 1e-12) & (cost <= room)
        if not bool(fits.any()):
            return choice
        rate = torch.where(cost > 0, gain / cost.clamp(min=1e-12), torch.inf)
        best = int(rate.masked_fill(~fits, -torch.inf).flatten().argmax())
        head, cand = divmod(best, recall.shape[1])
        room -= float(cost[head, cand])
        choice[head] = cand


def computed_budget(computed: torch.Tensor, cands: list[Candidate], density: float) -> float:
    """The mean computed share the choice may reach: what a dynamic pattern at ``density`` computes
    on the calibration prompts (``computed [N, C]``), sink and local floors included, so the choice
    costs what ``vertical_slash`` / ``block_topk`` at that density cost there; ``density`` itself
    when no such candidate was measured."""
    at_target = [c for c, cand in enumerate(cands) if cand.pattern != "a_shape" and abs(cand.density - density) < 1e-12]
    if not at_target or computed.numel() == 0:
        return density
    return float(computed[:, at_target[0]].double().mean())


def calibration_prompts(tokenizer: Any, settings: SearchSettings) -> list[list[int]]:
    """Token ids of every calibration prompt: single-needle prompts (:mod:`kvx.eval.haystack`) per
    length x depth x sample, or, with ``settings.text``, windows of that text's tokens per length x
    sample (evenly spaced; the text must hold the longest length)."""
    if settings.text is not None:
        from kvx.cli import read_text

        ids = tokenizer(read_text(settings.text, "--text"), add_special_tokens=False)["input_ids"]
        if len(ids) < max(settings.lengths):
            raise ValueError(f"--text {settings.text}: {len(ids)} tokens, fewer than the longest --lengths "
                             f"({max(settings.lengths)}); give a longer text or shorter lengths")
        prompts = []
        for length in settings.lengths:
            room = len(ids) - length
            starts = [room * s // max(1, settings.samples - 1) if settings.samples > 1 else 0
                      for s in range(settings.samples)]
            prompts += [ids[s: s + length] for s in starts]
        return prompts
    prompts = []
    for length in settings.lengths:
        for depth in settings.depths:
            for sample in range(settings.samples):
                rng = random.Random(f"{settings.seed}:{length}:{depth:g}:{sample}")
                spec = make_needles("single", rng)
                prompts.append(build_prompt(tokenizer, length, depth, spec, rng, template=PromptTemplate(tokenizer),
                                            number_rate=settings.number_rate).ids)
    return prompts


def search_patterns(model: torch.nn.Module, tokenizer: Any, settings: SearchSettings | None = None,
                    progress: bool = True, prompts: list[list[int]] | None = None) -> PatternFile:
    """Measure every candidate on the calibration prompts (``prompts``, or those of ``settings``) and
    choose each head's pattern and size (module docstring). Layers kvx leaves to the model (sliding
    windows) are not searched (pattern ``-1``)."""
    from kvx.eval.needle import progress_bar

    settings = settings or SearchSettings()
    config = decoder_config(model.config)
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    cands = candidates(settings)
    prompts = calibration_prompts(tokenizer, settings) if prompts is None else prompts
    probe = RecallProbe(settings, tuple(cands))
    with kvx.patched(model, probe, chunk_size=None), torch.inference_mode():
        for ids in progress_bar(prompts, progress, "search-patterns"):
            model(torch.tensor([ids], device=model.device), use_cache=True)
    cand_recall = torch.full((layers, heads, len(cands)), math.nan)
    cand_computed = torch.full((layers, heads, len(cands)), math.nan)
    for layer, (recall, computed, count) in probe.totals().items():
        cand_recall[layer], cand_computed[layer] = recall / count, computed / count
    return choose_patterns(cand_recall, cand_computed, cands, settings, model_identity(model),
                           {"prompts": len(prompts)})


def choose_patterns(cand_recall: torch.Tensor, cand_computed: torch.Tensor, cands: list[Candidate],
                    settings: SearchSettings, identity: dict[str, Any], extra: dict[str, Any] | None = None) -> PatternFile:
    """The pattern file of a search from its measured ``[L, H, C]`` tables (NaN rows: not searched)."""
    layers, heads, _ = cand_recall.shape
    searched = ~cand_recall[..., 0].isnan()  # [L, H]
    budget = computed_budget(cand_computed[searched], cands, settings.density)
    choice = torch.zeros(layers, heads, dtype=torch.long)
    choice[searched] = allocate(cand_recall[searched], cand_computed[searched], budget)
    pattern = torch.tensor([PATTERNS.index(c.pattern) for c in cands], dtype=torch.int32)[choice]
    local = torch.tensor([c.local for c in cands], dtype=torch.int32)[choice]
    density = torch.tensor([c.density for c in cands], dtype=torch.float64)[choice]
    pattern[~searched] = NOT_SEARCHED
    local[~searched], density[~searched] = settings.local, 1.0
    recall = cand_recall.gather(-1, choice[..., None])[..., 0]
    computed = cand_computed.gather(-1, choice[..., None])[..., 0]
    recorded = {**asdict(settings), "candidates": [c.label for c in cands], "budget": budget, **(extra or {})}
    return PatternFile(pattern, local, density, recall, computed, cand_recall, cand_computed, identity, recorded)


def format_patterns(patterns: PatternFile) -> str:
    """A table: per layer, each query head's choice with its recall; then the totals, and the recall
    the same mean density gives with one pattern for every head, where a candidate has it."""
    names = patterns.names()
    lines = []
    for layer in range(patterns.num_layers):
        cells = []
        for head in range(patterns.num_heads):
            name = names[layer][head]
            if name == "dense":
                cells.append("-")
                continue
            size = (f"local={int(patterns.local[layer, head])}" if name == "a_shape"
                    else f"density={float(patterns.density[layer, head]):g}")
            cells.append(f"{name}:{size} ({float(patterns.recall[layer, head]):.3f})")
        lines.append(f"layer {layer}: " + "  ".join(f"h{h} {c}" for h, c in enumerate(cells)))
    searched = patterns.pattern >= 0
    if bool(searched.any()):
        counts = {p: int((patterns.pattern == i).sum()) for i, p in enumerate(PATTERNS)}
        lines.append(f"chosen: {', '.join(f'{p} {n}' for p, n in counts.items())} of {int(searched.sum())} heads; "
                     f"mean recall {float(patterns.recall[searched].mean()):.3f} at a mean computed share "
                     f"{float(patterns.computed[searched].mean()):.3f} (target density {patterns.settings['density']}, "
                     f"budget {patterns.settings['budget']:.3f})")
        for c, label in enumerate(patterns.settings["candidates"]):
            if label.endswith(f"density={patterns.settings['density']:g}"):
                lines.append(f"  every head {label}: mean recall {float(patterns.candidate_recall[searched][:, c].mean()):.3f} "
                             f"at {float(patterns.candidate_computed[searched][:, c].mean()):.3f}")
    return "\n".join(lines)


# --- the command ---------------------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    """Register ``kvx search-patterns`` on the CLI's sub-parsers."""
    from kvx.cli import int_at_least, model_flags, progress_flag
    from kvx.eval.needle import DEFAULT_MODEL

    p = sub.add_parser(
        "search-patterns",
        help="choose each head's block-sparse pattern and size offline; write a pattern file for head_patterns",
        description="For each (layer, query head), measures how much of its dense attention on calibration prompts "
                    "each candidate block pattern keeps (its recall: the share of the attention mass inside the "
                    "blocks it computes, with the online estimates of vertical_slash and block_topk as they run; "
                    "the attention of the last queries of each prompt, or of all with --queries all), for a_shape "
                    "(sink + local blocks), vertical_slash and block_topk at a few sizes, and picks per head the "
                    "pattern and size that maximise the total recall while computing, over all heads, no more "
                    "blocks than one pattern at --density does (MInference's offline search; sizes spread over heads "
                    "as in MoA). Writes OUT (safetensors: "
                    "the choice, every candidate's recall and computed share, the model's identity, the settings, "
                    "a schema version) and prints the choice. Use it with "
                    "--policy head_patterns:patterns=OUT (with the same block_size, sink and local).",
        epilog="example: kvx search-patterns kvx/assets/needle-llama --out patterns.safetensors --density 0.1 "
               "--block-size 16 --lengths 1k,2k",
    )
    p.add_argument("model", nargs="?", default=str(DEFAULT_MODEL), help="local directory or hub id "
                   "(default: kvx's shipped needle model)")
    p.add_argument("--out", required=True, help="pattern file to write (.safetensors)")
    p.add_argument("--tokenizer", help="tokenizer path, when not in the model directory")
    p.add_argument("--density", type=float, default=0.1,
                   help="target density, in (0, 1]: over all heads the file computes the blocks one pattern at this "
                        "density computes on the calibration prompts (default 0.1)")
    p.add_argument("--sizes", default=",".join(f"{s:g}" for s in DEFAULT_SIZES),
                   help="candidate densities as multiples of --density, comma-separated: heads take different sizes "
                        "under the same mean (default 0.5,1,2; 1 alone: every head at the target density, only its "
                        "pattern chosen)")
    p.add_argument("--candidates", default=",".join(PATTERNS),
                   help=f"candidate patterns, comma-separated, from {', '.join(PATTERNS)} (default all three)")
    p.add_argument("--block-size", type=int, default=64, help="tokens per block, a power of two >= 16 (default 64; "
                   "the method must use the same)")
    p.add_argument("--sink", type=int_at_least(0), default=1, help="sink blocks of every pattern (default 1)")
    p.add_argument("--local", type=int_at_least(1), default=2,
                   help="local blocks of vertical_slash and block_topk heads (default 2)")
    p.add_argument("--last-queries", type=int_at_least(1), default=64,
                   help="last queries of a prompt: vertical_slash estimates its lines from them, and --queries last "
                        "counts their recall (default 64)")
    p.add_argument("--queries", choices=QUERIES, default="last",
                   help="whose attention the recall counts: last (the last --last-queries queries of a prompt, where "
                        "its answer is read) or all (every query, equally) (default last: on kvx's needle model, all "
                        "chose patterns that lost needles; docs/block-sparse.md)")
    calib = p.add_argument_group("calibration prompts")
    calib.add_argument("--lengths", default="1k,2k", help="prompt lengths in tokens, comma-separated (default 1k,2k)")
    calib.add_argument("--depths", default="0,50,100", help="needle depths in percent (default 0,50,100)")
    calib.add_argument("--samples", type=int_at_least(1), default=1, help="prompts per length and depth (default 1)")
    calib.add_argument("--seed", type=int, default=0, help="prompt seed (default 0)")
    calib.add_argument("--text", help="a UTF-8 text file: calibrate on windows of it (--samples per length) instead "
                                      "of needle prompts")
    model_flags(p)
    progress_flag(p)
    p.set_defaults(func=run_command)


def run_command(args: Any) -> int:
    from kvx.cli import _parse_ints, _parse_numbers, _split, input_file, safetensors_path
    from kvx.eval.needle import load_model

    out = safetensors_path(args.out)
    if args.text is not None:
        input_file(args.text, "--text")
    settings = SearchSettings(
        density=args.density, block_size=args.block_size, sink=args.sink, local=args.local,
        last_queries=args.last_queries, queries=args.queries, sizes=tuple(_parse_numbers(args.sizes, "--sizes")),
        kinds=tuple(_split(args.candidates, "--candidates")), lengths=tuple(_parse_ints(args.lengths, "--lengths")),
        depths=tuple(_parse_numbers(args.depths, "--depths")), samples=args.samples, seed=args.seed, text=args.text)
    model, tokenizer = load_model(args.model, args.tokenizer, args.dtype, args.device)
    patterns = search_patterns(model, tokenizer, settings, progress=not args.no_progress)
    print(format_patterns(patterns))
    print(f"wrote {patterns.save(out)}")
    print(f"use: --policy head_patterns:patterns={out},block_size={settings.block_size},sink={settings.sink},"
          f"local={settings.local}" + (",min_length=0" if max(settings.lengths) < 4096 else ""))
    print(f"settings: {json.dumps(patterns.settings)}")
    return 0
