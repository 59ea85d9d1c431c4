"""``kvx bench``: speed and memory of every policy and op against dense, in one run.

- ``e2e``: per policy and context length: prefill time (time to first token, compression
  included), decode tokens/s over N new tokens, KV-cache bytes (from the cache) and peak memory;
  ratios against dense are computed inside the same run. Each decode step is also set against
  its bytes roofline: the bytes a step must read (the weights once, plus every stored KV byte)
  at the device's copy bandwidth, measured in the same run (``decode_roof_fraction``: 1.0 is a
  step that costs nothing beyond reading them).
- ``kernels``: each kvx attention op against its dense counterpart (torch SDPA; flash-attn
  when importable), with achieved TFLOP/s and GB/s and the fraction of the device's peak,
  where the peak (a large GEMM, a large copy) is measured on the device in the same run.

Every row carries the device name, torch / triton / transformers versions and the git commit.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import kvx
from kvx.cache import cache_nbytes
from kvx.compat import cache_kwargs, cache_of
from kvx.eval.measure import Timing, available_bytes, measure_peak, stamp, time_call
from kvx.eval.needle import DENSE, PolicyRun, check_patchable, first_repeat
from kvx.kernels import reference
from kvx.policy import check_positive_int

# Random-weight model shapes by name (speed needs shapes, not trained weights).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny-llama": dict(model_type="llama", num_hidden_layers=4, hidden_size=512, intermediate_size=1024,
                       num_attention_heads=8, num_key_value_heads=2, head_dim=64, vocab_size=1024),
    "llama3-8b": dict(model_type="llama", num_hidden_layers=32, hidden_size=4096, intermediate_size=14336,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                      rope_theta=500000.0),
    "qwen3-4b": dict(model_type="qwen3", num_hidden_layers=36, hidden_size=2560, intermediate_size=9728,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936),
}


def model_config(spec: str, layers: int | None = None):
    """A config from a preset name (``llama3-8b``) or a local model directory."""
    from transformers import AutoConfig

    if spec in PRESETS:
        settings = dict(PRESETS[spec])
        model_type = settings.pop("model_type")
        settings.update(max_position_embeddings=262144, pad_token_id=0, eos_token_id=1, bos_token_id=2)
        if layers:
            settings["num_hidden_layers"] = layers
        return AutoConfig.for_model(model_type, **settings)
    if not Path(spec).exists():
        raise ValueError(f"unknown model {spec!r}: not a local directory, nor a preset ({', '.join(PRESETS)})")
    config = AutoConfig.from_pretrained(spec)
    if layers:
        config.num_hidden_layers = layers
    return config


def estimate_bytes(config, max_length: int, batch: int, dtype: torch.dtype) -> int:
    """Weights + a dense KV cache at ``max_length`` + the largest prefill activations (rough)."""
    elem = torch.empty((), dtype=dtype).element_size()
    hidden, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    params = config.vocab_size * hidden * 2 + layers * (4 * hidden * hidden + 3 * hidden * config.intermediate_size)
    kv = 2 * layers * batch * config.num_key_value_heads * max_length * head_dim * elem
    activations = batch * max_length * max(config.intermediate_size * 3, hidden * 4) * elem
    return params * elem + kv + activations


def build_model(spec: str, device: torch.device, dtype: torch.dtype, max_length: int, layers: int | None = None):
    """A random-weight model from a preset or a local path; refuses, before allocating, a model
    that would not fit."""
    from transformers import AutoModelForCausalLM

    config = model_config(spec, layers)
    need, have = estimate_bytes(config, max_length, 1, dtype), available_bytes(device)
    if need > have:
        raise ValueError(
            f"{spec} at {max_length} tokens needs about {need / 2**30:.1f} GiB on {device} "
            f"but {have / 2**30:.1f} GiB is free; use fewer --layers, shorter --lengths or another device"
        )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def parse_policy_list(text: str) -> list[PolicyRun]:
    """``--policies``: specs separated by commas, ``dense,snapkv:budget=1024,window=32+ragged,streaming_llm``
    -> runs, dense first. The same spec syntax as ``--policy``: an item that starts with ``key=value``
    (``window=32``, ``window=32+ragged``) continues the spec before it, any other item starts a spec
    (a policy name never holds ``=``, an option value never ``:`` or ``+``), so the list reads one way only."""
    if ";" in text:
        raise ValueError(f"--policies {text!r}: ';' no longer separates options; write them with ',' as everywhere "
                         "else (snapkv:budget=512,window=16), or give each policy with --policy SPEC")
    specs: list[str] = []
    for item in (p.strip() for p in text.split(",") if p.strip()):
        head = item.split("+", 1)[0]
        if "=" in head and ":" not in head and specs:
            specs[-1] += "," + item  # an option of the spec before it
        else:
            specs.append(item)
    return parse_policy_specs(specs, flag="--policies")


def parse_policy_specs(specs: list[str], flag: str = "--policy") -> list[PolicyRun]:
    """One run per spec (``name[:key=value,...][+name...]``, the syntax of ``kvx.compose.from_spec``),
    dense first whether listed or not; a policy listed twice is an error naming ``flag``."""
    from kvx.eval.needle import parse_policies

    runs = parse_policies([s for s in specs if s.strip() != DENSE], [], with_dense=True)
    repeated = first_repeat(run.label for run in runs)
    if repeated is not None:
        raise ValueError(f"{flag} lists {repeated} twice; give each policy once")
    return runs


def check_counts(**counts: Any) -> None:
    """Raise, naming the setting and its value, unless each count is a positive int (``warmup`` may
    be 0, ``chunk_size`` None; a list, such as ``lengths``, must be non-empty and positive)."""
    for name, value in counts.items():
        if name == "chunk_size" and value is None:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        if not values:
            raise ValueError(f"bench: {name} must list at least one value")
        for item in values:
            check_positive_int("bench", name, item, minimum=0 if name == "warmup" else 1)


def check_kernel_grid(ops: list[str], gqa: list[int], heads: int = 32) -> None:
    """Raise unless every op is known and every GQA ratio divides the query heads."""
    unknown = [op for op in ops if op not in KERNELS]
    if unknown:
        raise ValueError(f"unknown kernel(s) {unknown}; choose from {', '.join(KERNELS)}")
    bad = [ratio for ratio in gqa if heads % ratio]
    if bad:
        divisors = [str(d) for d in range(1, heads + 1) if heads % d == 0]
        raise ValueError(f"gqa {', '.join(map(str, bad))}: query heads per KV head must divide the {heads} query "
                         f"heads; choose from {', '.join(divisors)}")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# ---------------------------------------------------------------- end to end


def _prefill(model, ids: torch.Tensor, chunk_size: int | None = None):
    """One prompt through the model: in chunks with compression between them when patched."""
    if chunk_size and kvx.is_patched(model):
        return kvx.prefill(model, ids, chunk_size=chunk_size)
    with torch.inference_mode():
        return model(ids, logits_to_keep=1)


def _decode(model, out, steps: int):
    """Greedy decode ``steps`` tokens from a prefill output; returns the cache."""
    cache, logits = cache_of(out), out.logits
    with torch.inference_mode():
        for _ in range(steps):
            token = logits[:, -1:].argmax(-1)
            step = model(token, **cache_kwargs(cache))
            cache, logits = cache_of(step), step.logits
    return cache


def bench_e2e(
    model,
    lengths: list[int],
    policies: list[PolicyRun],
    new_tokens: int = 32,
    repeats: int = 3,
    warmup: int = 1,
    progress: Callable[[str], None] | None = None,
    chunk_size: int | None = None,
) -> list[dict[str, Any]]:
    """One row per (policy, length); see the module docstring. ``chunk_size``: policies prefill in
    chunks with compression between them (dense always runs in one piece, as users run it).

    Repetitions are interleaved: each round runs every policy once, in an order rotated from round
    to round, so a burst of load on a shared machine hits all of them alike; a ratio against dense
    is computed per round, and its median and spread are reported (a warning when the spread is
    wide)."""
    check_counts(lengths=lengths, new_tokens=new_tokens, repeats=repeats, warmup=warmup, chunk_size=chunk_size)
    check_patchable(model, policies, chunk_size=chunk_size)
    device = next(model.parameters()).device
    header = stamp(device)
    bandwidth = measured_peaks(device, next(model.parameters()).dtype)["peak_gbs"] * 1e9
    rows = []
    for length in lengths:
        ids = torch.randint(3, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
        ids = ids.to(device)
        samples = _interleaved_samples(model, ids, policies, new_tokens, repeats, warmup, chunk_size, progress)
        dense = next((samples[run.label] for run in policies if run.name == DENSE), None)
        baseline: dict[str, Any] | None = None
        for run in policies:
            row = _row(model, ids, run, samples[run.label], new_tokens, chunk_size)
            if run.name == DENSE:
                baseline = row
            if baseline is not None and dense is not None:
                row.update(_ratios(samples[run.label], dense, f"{run.label} @ {length}"))
                row["kv_vs_dense"] = row["kv_bytes"] / baseline["kv_bytes"]
                row["peak_vs_dense"] = row["peak_bytes"] / baseline["peak_bytes"] if baseline["peak_bytes"] else None
            row.update(decode_roofline(model, row, new_tokens, bandwidth))
            rows.append({**header, "model": model.config.model_type, "layers": model.config.num_hidden_layers,
                         "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "length": length,
                         "new_tokens": new_tokens, "chunk_size": chunk_size if run.name != DENSE else None, **row})
    return rows


def weight_bytes_read_per_token(model) -> int:
    """Bytes of weights one decode step reads: every parameter once, except an input embedding
    not shared with the output head (a step reads one row of it)."""
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is not None and output.weight.data_ptr() == embedding.data_ptr()
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total if tied else total - embedding.numel() * embedding.element_size()


def decode_roofline(model, row: dict[str, Any], new_tokens: int, bandwidth: float) -> dict[str, Any]:
    """A row's decode step against its bytes roofline: ``decode_step_bytes`` (weights read per
    step + the KV bytes the cache holds after decoding), ``decode_roof_ms`` (those bytes at
    ``bandwidth`` bytes/s, read + written as the copy measures it) and ``decode_roof_fraction``
    (roof time / measured step time)."""
    step_bytes = weight_bytes_read_per_token(model) + row["kv_bytes"]
    roof_s = step_bytes / bandwidth
    return {"decode_step_bytes": step_bytes, "decode_roof_ms": roof_s * 1e3,
            "decode_roof_fraction": roof_s * row["decode_tok_s"]}


SPREAD_WARNING = 1.5
"""A ratio whose highest repetition exceeds its lowest by this factor is reported as unreliable."""


def rotated_rounds(items: list, rounds: int):
    """``(round, item)`` for every item in every round, the order rotated by one each round (so a
    burst of load on a shared machine falls on every item alike)."""
    for round_index in range(rounds):
        shift = round_index % len(items)
        for item in items[shift:] + items[:shift]:
            yield round_index, item


def _interleaved_samples(model, ids, policies: list[PolicyRun], new_tokens: int, repeats: int, warmup: int,
                         chunk_size: int | None, progress) -> dict[str, dict[str, list[float]]]:
    """Per policy label: ``{"prefill": [s, ...], "decode": [s, ...]}``, one entry per timed round
    (warm-up rounds dropped), every policy once per round in a rotated order."""
    samples = {run.label: {"prefill": [], "decode": []} for run in policies}
    for round_index, run in rotated_rounds(policies, warmup + repeats):
        if progress:
            timed = round_index - warmup + 1
            progress(f"{run.label} @ {ids.shape[1]} " + (f"(repetition {timed}/{repeats})" if timed > 0 else "(warm-up)"))
        prefill_s, decode_s = _time_once(model, ids, run, new_tokens, chunk_size)
        if round_index >= warmup:
            samples[run.label]["prefill"].append(prefill_s)
            samples[run.label]["decode"].append(decode_s)
    return samples


def _patched_for(model, run: PolicyRun, chunk_size: int | None):
    if run.name == DENSE:
        return contextlib.nullcontext()
    return kvx.patched(model, run.policy(), chunk_size=chunk_size)


def _time_once(model, ids, run: PolicyRun, new_tokens: int, chunk_size: int | None) -> tuple[float, float]:
    """Seconds of one fresh prefill and of decoding ``new_tokens`` on its cache, under ``run``."""
    chunk_size = chunk_size if run.name != DENSE else None
    with _patched_for(model, run, chunk_size):
        outputs = []
        prefill = time_call(lambda: outputs.append(_prefill(model, ids, chunk_size)), ids.device, repeats=1, warmup=0)
        decode = time_call(lambda: _decode(model, outputs[0], new_tokens), ids.device, repeats=1, warmup=0)
    return prefill.median, decode.median


def _row(model, ids, run: PolicyRun, samples: dict[str, list[float]], new_tokens: int,
         chunk_size: int | None) -> dict[str, Any]:
    """Times from ``samples``; KV bytes and peak memory from one more (untimed) prefill and decode."""
    chunk_size = chunk_size if run.name != DENSE else None
    with _patched_for(model, run, chunk_size):
        cache, peak = measure_peak(lambda: _decode(model, _prefill(model, ids, chunk_size), new_tokens), ids.device)
    prefill = Timing.of(samples["prefill"])
    decode = samples["decode"]
    return {
        "policy": run.label,
        "prefill_s": prefill.median,
        "prefill_low_s": prefill.low,
        "prefill_high_s": prefill.high,
        "decode_tok_s": new_tokens / Timing.of(decode).median,
        "decode_tok_s_low": new_tokens / max(decode),
        "decode_tok_s_high": new_tokens / min(decode),
        "kv_bytes": cache_nbytes(cache),
        "peak_bytes": peak.tracked,
        "peak_rss_bytes": peak.rss,
        "repeats": len(decode),
    }


def _ratios(samples: dict[str, list[float]], dense: dict[str, list[float]], what: str) -> dict[str, float]:
    """Speed-ups against dense computed round by round (dense time / policy time): median, lowest
    and highest; a warning when they spread wider than ``SPREAD_WARNING``."""
    out = {}
    for phase in ("prefill", "decode"):
        ratios = [d / p for d, p in zip(dense[phase], samples[phase])]
        timing = Timing.of(ratios)
        out[f"{phase}_speedup"], out[f"{phase}_speedup_low"], out[f"{phase}_speedup_high"] = (
            timing.median, timing.low, timing.high)
        out[f"{phase}_speedup_spread"] = f"{timing.low:.3g}-{timing.high:.3g}"
        if timing.low > 0 and timing.high / timing.low > SPREAD_WARNING:
            warnings.warn(
                f"{what}: the {phase} speed-up against dense spread from {timing.low:.2f} to {timing.high:.2f} over "
                f"{len(ratios)} interleaved repetitions: the machine is busy; use fewer threads or more --repeats",
                UserWarning, stacklevel=2)
    return out


# ---------------------------------------------------------------- kernels


@dataclass(frozen=True)
class KernelCase:
    op: str
    batch: int
    heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int

    @property
    def keys_read(self) -> float:
        """Keys each KV head reads (a ragged cache keeps fewer than ``kv_len`` on average)."""
        return self.kv_len * (RAGGED_SHARE if self.op == "ragged_decode" else 1.0)

    def flops(self) -> float:
        """Useful work: ``2 x D`` per (query, key) pair for the logits, as much again where the op
        also multiplies by V (column sums do not)."""
        pairs = self.q_len * self.keys_read
        if self.op in CAUSAL_OPS:
            pairs = self.q_len * (self.kv_len + 1) / 2  # causal
        per_pair = 2.0 if self.op == "h2o_column_sums" else 4.0
        return per_pair * self.batch * self.heads * pairs * self.head_dim

    def bytes(self, elem: int) -> float:
        q_and_out = 2 * self.batch * self.heads * self.q_len * self.head_dim
        kv = 2 * self.batch * self.kv_heads * self.keys_read * self.head_dim
        kv_elem = PACKED_BYTES.get(self.op, elem)
        return float(q_and_out * elem + kv * kv_elem)


def _attention_inputs(case: KernelCase, device, dtype, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)  # noqa: E731
    q = make(case.batch, case.heads, case.q_len, case.head_dim)
    k = make(case.batch, case.kv_heads, case.kv_len, case.head_dim)
    v = make(case.batch, case.kv_heads, case.kv_len, case.head_dim)
    return q, k, v


def _sdpa_dense(q, k, v, causal: bool):
    """The dense counterpart: torch SDPA (flash backend on GPU), GQA expanded as users do."""
    groups = q.shape[1] // k.shape[1]
    k, v = reference.expand_kv_heads(k, groups), reference.expand_kv_heads(v, groups)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _flash_attn_dense(q, k, v, causal: bool):
    from flash_attn import flash_attn_func  # [B, S, H, D], GQA native

    return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)


def _ragged_decode(q, k, v):
    """Decode over a head-budget cache holding, per KV head, a different share of the same tokens
    (from 1/2 to all of them, ~3/4 on average): packed, then read by the ragged kernel."""
    from kvx.kernels.ragged_decode import ragged_decode_attention

    batch, kv_heads, length = k.shape[:3]
    share = torch.linspace(0.5, 1.0, kv_heads, device=k.device)[None, :, None]
    keep = torch.arange(length, device=k.device)[None, None, :] >= (1 - share) * length  # newest tokens
    keep = keep.expand(batch, -1, -1)
    packed_k, offsets = reference.pack_ragged(k, keep)
    packed_v, _ = reference.pack_ragged(v, keep)
    return lambda: ragged_decode_attention(q, packed_k, packed_v, offsets, q.shape[-1] ** -0.5)


def _column_sums(q, k, v):
    """H2O's accumulated attention of a whole prompt (the Triton kernel on GPU, the reference on CPU)."""
    from kvx.kernels.column_sums import attention_column_sums

    return lambda: attention_column_sums(q, k, None, q.shape[-1] ** -0.5)


def _packed_decode(bits: int = 4, key_axis: str = "channel"):
    """Decode over a packed cache of the same tokens (KIVI by default: keys per channel, values per
    token; int8: both per token; groups of 32, float16 scale and zero point), packed outside the
    timing and dequantized inside the op (the Triton kernel on GPU, the torch path on CPU). A length
    that is not whole key groups is packed padded, then its real tokens kept (a ``group_index``, as
    after an eviction)."""
    from kvx.kernels import quant
    from kvx.kernels.quant_kernels import packed_decode_attention

    def op(q, k, v):
        batch, kv_heads, length, dim = k.shape
        group = math.gcd(KIVI_GROUP, dim)  # per-token groups must divide the head dim (80: 16)
        if key_axis == "token":
            keys = quant.quantize(k, bits, group, "token")
        else:
            padded = -(-length // KIVI_GROUP) * KIVI_GROUP
            keys = quant.quantize(torch.nn.functional.pad(k, (0, 0, 0, padded - length)), bits, KIVI_GROUP, "channel")
            if padded != length:
                keys = quant.gather_tokens(keys, torch.arange(length, device=k.device).expand(batch, kv_heads, length))
        values = quant.quantize(v, bits, group, "token")
        return lambda: packed_decode_attention(q, keys, values, None, dim**-0.5)

    return op


KERNELS: dict[str, Callable] = {
    # op -> a function of (q, k, v) returning the zero-argument call to time (inputs prepared outside it)
    "attention_prefill": lambda q, k, v: lambda: reference.attention(q, k, v, None, q.shape[-1] ** -0.5),
    "attention_decode": lambda q, k, v: lambda: reference.attention(q, k, v, None, q.shape[-1] ** -0.5),
    "snapkv_scores": lambda q, k, v: lambda: reference.window_attention_probs(
        q, k, reference.causal_mask(q.shape[-2], k.shape[-2], q.device), q.shape[-1] ** -0.5
    ),
    "ragged_decode": _ragged_decode,
    "h2o_column_sums": _column_sums,
    "packed_decode": _packed_decode(4),  # KIVI 4-bit
    "packed_decode_kivi2": _packed_decode(2),
    "packed_decode_int8": _packed_decode(8, key_axis="token"),
}
CAUSAL_OPS = ("attention_prefill", "h2o_column_sums")  # the prompt attends to itself; dense runs causal
RAGGED_SHARE = 0.75  # mean share of the tokens each head keeps in the ragged_decode case
KIVI_GROUP = 32  # the packed_decode case's group size
PACKED_BYTES = {  # bytes per cached element of the packed cases: code, then a float16 scale and zero per group
    "packed_decode": 4 / 8 + 2 * 2 / KIVI_GROUP, "packed_decode_kivi2": 2 / 8 + 2 * 2 / KIVI_GROUP,
    "packed_decode_int8": 1 + 2 * 2 / KIVI_GROUP,
}


@functools.lru_cache(maxsize=None)
def measured_peaks(device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """The device's achievable peaks, measured once per process: GEMM FLOP/s, and copy bytes/s (read + written)
    into a buffer allocated beforehand (a fresh allocation would time page faults, not memory:
    on CPU a clone reads 3x slower than a copy), each buffer larger than the last-level cache."""
    n = 4096 if device.type == "cuda" else 1536
    a = torch.randn(n, n, device=device, dtype=dtype)
    gemm = time_call(lambda: a @ a, device, repeats=5, warmup=2).median
    src = torch.ones(256 * 2**20 if device.type == "cpu" else 1024 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy = time_call(lambda: dst.copy_(src), device, repeats=5, warmup=2).median
    return {"peak_tflops": 2 * n**3 / gemm / 1e12, "peak_gbs": 2 * src.numel() / copy / 1e9}


def kernel_cases(op: str, lengths: list[int], head_dims: list[int], gqa: list[int], heads: int = 32) -> list[KernelCase]:
    cases = []
    for length in lengths:
        for head_dim in head_dims:
            for ratio in gqa:
                q_len = length if op in CAUSAL_OPS else {"snapkv_scores": 32}.get(op, 1)
                cases.append(KernelCase(op, 1, heads, heads // ratio, q_len, length, head_dim))
    return cases


def bench_kernels(
    ops: list[str],
    lengths: list[int],
    head_dims: list[int],
    gqa: list[int],
    device: torch.device,
    dtype: torch.dtype,
    heads: int = 32,
    repeats: int = 5,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    check_kernel_grid(ops, gqa, heads)
    check_counts(lengths=lengths, head_dims=head_dims, repeats=repeats)
    header = {**stamp(device), "dtype": str(dtype).replace("torch.", "")}
    peaks = measured_peaks(device, dtype)
    elem = torch.empty((), dtype=dtype).element_size()
    try:
        import flash_attn  # noqa: F401

        baselines = {"sdpa": _sdpa_dense, "flash_attn": _flash_attn_dense}
    except ImportError:
        baselines = {"sdpa": _sdpa_dense}
    rows = []
    for op in ops:
        for case in kernel_cases(op, lengths, head_dims, gqa, heads):
            if progress:
                progress(f"{op} L={case.kv_len} d={case.head_dim} gqa={case.heads // case.kv_heads}")
            q, k, v = _attention_inputs(case, device, dtype)
            causal = op in CAUSAL_OPS
            calls = {"kvx": KERNELS[op](q, k, v),
                     **{name: (lambda fn=fn: fn(q, k, v, causal)) for name, fn in baselines.items()}}
            times = _interleaved_times(calls, device, repeats)
            ours = Timing.of(times["kvx"])
            row = {**header, **case.__dict__, "impl": "kvx", "seconds": ours.median}
            row.update(_rates(case, ours.median, elem, peaks))
            for name in baselines:
                ratios = Timing.of([d / o for d, o in zip(times[name], times["kvx"])])
                row[f"{name}_seconds"] = Timing.of(times[name]).median
                row[f"vs_{name}"] = ratios.median
                row[f"vs_{name}_spread"] = f"{ratios.low:.3g}-{ratios.high:.3g}"
            rows.append(row)
    return rows


def _interleaved_times(calls: dict[str, Callable[[], Any]], device: torch.device, repeats: int) -> dict[str, list[float]]:
    """Seconds of each call, ``repeats`` times each after one warm-up, the calls taking turns in a
    rotated order (see :func:`rotated_rounds`)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_index, name in rotated_rounds(list(calls), repeats + 1):
        seconds = time_call(calls[name], device, repeats=1, warmup=0).median
        if round_index > 0:
            times[name].append(seconds)
    return times


def _rates(case: KernelCase, seconds: float, elem: int, peaks: dict[str, float]) -> dict[str, float]:
    tflops = case.flops() / seconds / 1e12
    gbs = case.bytes(elem) / seconds / 1e9
    memory_bound = case.flops() / case.bytes(elem) < peaks["peak_tflops"] * 1e12 / (peaks["peak_gbs"] * 1e9)
    fraction = gbs / peaks["peak_gbs"] if memory_bound else tflops / peaks["peak_tflops"]
    return {"tflops": tflops, "gbs": gbs, "bound": "memory" if memory_bound else "compute",
            "fraction_of_peak": fraction, **peaks}


# ---------------------------------------------------------------- output


def write_results(rows: list[dict[str, Any]], out_dir: Path, kind: str, columns: list[str]) -> list[Path]:
    """``<kind>-<device>.json``, ``.csv`` and ``.md`` under ``out_dir``: one file set per device."""
    if not rows:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / f"{kind}-{_slug(rows[0]['device'])}"
    json_path, csv_path, md_path = base.with_suffix(".json"), base.with_suffix(".csv"), base.with_suffix(".md")
    json_path.write_text(json.dumps(rows, indent=2, default=str))
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    md_path.write_text(markdown_table(rows, kind, columns))
    return [json_path, csv_path, md_path]


def markdown_table(rows: list[dict[str, Any]], kind: str, columns: list[str]) -> str:
    first = rows[0]
    lines = [
        f"# kvx bench {kind}: {first['device']}",
        "",
        f"torch {first['torch']}, triton {first['triton']}, transformers {first['transformers']}, "
        f"commit {first['commit']}. Ratios are against dense in the same run"
        + (", computed per round of interleaved repetitions (median, and lowest-highest as spread)." if kind == "e2e"
           else "."),
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int) and value >= 10000:
        return f"{value:,}"
    return str(value)


E2E_COLUMNS = ["policy", "length", "chunk_size", "prefill_s", "prefill_speedup", "prefill_speedup_spread", "decode_tok_s",
               "decode_speedup", "decode_speedup_spread", "decode_roof_fraction", "kv_bytes", "kv_vs_dense", "peak_bytes",
               "peak_vs_dense", "peak_rss_bytes"]
KERNEL_COLUMNS = ["op", "kv_len", "q_len", "head_dim", "heads", "kv_heads", "seconds", "tflops", "gbs", "bound",
                  "fraction_of_peak", "vs_sdpa", "vs_sdpa_spread", "vs_flash_attn"]


def write_plot(rows: list[dict[str, Any]], out_dir: Path, kind: str) -> Path | None:
    """A PNG beside the tables: e2e: prefill time, decode tokens/s and KV bytes per policy vs length;
    kernels: achieved fraction of peak per op vs length. None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if kind == "e2e":
        panels = [("prefill_s", "prefill (s)"), ("decode_tok_s", "decode (tokens/s)"), ("kv_bytes", "KV cache (bytes)")]
        series_key, x_key = "policy", "length"
    else:
        panels = [("fraction_of_peak", "fraction of measured peak"), ("vs_sdpa", "speed vs SDPA")]
        series_key, x_key = "op", "kv_len"
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (metric, title) in zip(axes, panels):
        for name in dict.fromkeys(r[series_key] for r in rows):
            mine = [r for r in rows if r[series_key] == name and r.get(metric) is not None]
            points: dict[int, list[float]] = {}
            for r in mine:
                points.setdefault(r[x_key], []).append(r[metric])
            xs = sorted(points)
            ax.plot(xs, [sum(points[x]) / len(points[x]) for x in xs], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("context length (tokens)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"kvx bench {kind}: {rows[0]['device']} (commit {rows[0]['commit']})", fontsize=9)
    fig.tight_layout()
    path = out_dir / f"{kind}-{_slug(rows[0]['device'])}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
