"""The bench harness produces well-formed, stamped rows; bad input gets clear errors.
Timings themselves are not asserted."""

import json

import pytest
import torch

from kvx.cli import main
from kvx.eval import bench
from kvx.eval.measure import TensorAllocationTracker, measure_peak
from kvx.tiny import tiny_model

STAMP = {"device", "torch", "triton", "transformers", "commit"}

# real timings of tiny shapes spread widely: the spread warning is tested on its own, with fixed times
pytestmark = pytest.mark.filterwarnings("ignore:.*interleaved repetitions:UserWarning")


def test_e2e_rows(tmp_path):
    model = tiny_model("llama")
    policies = bench.parse_policy_list("dense,snapkv:budget=32,window=8,streaming_llm:sink=2,window=30,"
                                       "h2o:budget=32,recent=8+ragged")
    assert [p.label for p in policies] == ["dense", "snapkv:budget=32,window=8", "streaming_llm:sink=2,window=30",
                                           "h2o:budget=32,recent=8+ragged"]
    rows = bench.bench_e2e(model, [96, 160], policies, new_tokens=3, repeats=1, warmup=0)
    assert len(rows) == 8
    for row in rows:
        assert STAMP <= set(row) and row["prefill_s"] > 0 and row["decode_tok_s"] > 0
        assert row["kv_bytes"] > 0 and row["peak_bytes"] > 0
    dense = {r["length"]: r for r in rows if r["policy"] == "dense"}
    for row in rows:
        assert row["kv_vs_dense"] == pytest.approx(row["kv_bytes"] / dense[row["length"]]["kv_bytes"])
        if row["policy"] != "dense":
            assert row["kv_bytes"] < dense[row["length"]]["kv_bytes"]
    weights = bench.weight_bytes_read_per_token(model)
    for row in rows:  # the decode step against the bytes it must read
        assert row["decode_step_bytes"] == weights + row["kv_bytes"]
        assert row["decode_roof_fraction"] == pytest.approx(row["decode_roof_ms"] / 1e3 * row["decode_tok_s"])
        assert row["decode_roof_fraction"] > 0
    paths = bench.write_results(rows, tmp_path, "e2e", bench.E2E_COLUMNS)
    assert [p.suffix for p in paths] == [".json", ".csv", ".md"]
    assert len(json.loads(paths[0].read_text())) == 8
    assert "| snapkv:budget=32,window=8 | 160 |" in paths[2].read_text()


@pytest.mark.parametrize("listed,specs", [
    ("dense,snapkv:budget=256,window=8+kivi:bits=4,group=16,streaming_llm", ["snapkv:budget=256,window=8+kivi:bits=4,group=16",
                                                                             "streaming_llm"]),
    ("h2o:budget=8,recent=4+ragged,tova", ["h2o:budget=8,recent=4+ragged", "tova"]),
])
def test_policies_list_reads_as_repeated_policy_specs(listed, specs):
    """--policies is --policy's specs joined by commas: the same runs, in the same order."""
    assert [r.label for r in bench.parse_policy_list(listed)] == [r.label for r in bench.parse_policy_specs(specs)]
    assert len(bench.parse_policy_specs(specs)) == len(specs) + 1  # dense first


def test_e2e_repetitions_are_interleaved_and_ratios_per_round(monkeypatch):
    """Every round runs each policy once, in an order rotated from round to round; each speed-up
    is the median of per-round ratios, with its lowest and highest."""
    model = tiny_model("llama")
    policies = bench.parse_policy_list("dense,snapkv:budget=16,window=4,streaming_llm:sink=2,window=14")
    order, original = [], bench._time_once

    def recording(model, ids, run, new_tokens, chunk_size):
        order.append(run.label)
        return original(model, ids, run, new_tokens, chunk_size)

    monkeypatch.setattr(bench, "_time_once", recording)
    rows = bench.bench_e2e(model, [64], policies, new_tokens=2, repeats=3, warmup=1)
    labels = [p.label for p in policies]
    assert order == labels + labels[1:] + labels[:1] + labels[2:] + labels[:2] + labels  # warm-up, 3 rounds
    for row in rows:
        assert row["repeats"] == 3
        assert row["prefill_speedup_low"] <= row["prefill_speedup"] <= row["prefill_speedup_high"]
        assert row["decode_speedup_low"] <= row["decode_speedup"] <= row["decode_speedup_high"]
    dense = rows[0]
    assert dense["prefill_speedup"] == dense["prefill_speedup_low"] == dense["prefill_speedup_high"] == 1


def test_a_wide_spread_is_warned(monkeypatch):
    model = tiny_model("llama")
    policies = bench.parse_policy_list("dense,snapkv:budget=16,window=4")
    # round 1: dense, snapkv; round 2 (rotated): snapkv, then dense 3x slower to prefill
    times = iter([(1.0, 1.0), (1.0, 1.0), (1.0, 1.0), (3.0, 1.0)])
    monkeypatch.setattr(bench, "_time_once", lambda *args: next(times))
    with pytest.warns(UserWarning, match=r"prefill speed-up against dense spread from 1.00 to 3.00 over 2 interleaved"):
        rows = bench.bench_e2e(model, [64], policies, new_tokens=2, repeats=2, warmup=0)
    assert rows[1]["prefill_speedup_spread"] == "1-3" and rows[1]["prefill_speedup"] == 2


def test_kernel_timings_take_turns(monkeypatch):
    """kvx's op and each dense baseline are timed in rotated turns, one warm-up round first; the
    ratio is the median of per-round ratios."""
    order = []
    clock = iter(range(1000))
    monkeypatch.setattr(bench, "time_call", lambda fn, device, repeats=1, warmup=0: (
        order.append(fn()), bench.Timing.of([float(next(clock) + 1)]))[1])
    times = bench._interleaved_times({"kvx": lambda: "kvx", "sdpa": lambda: "sdpa"}, torch.device("cpu"), 3)
    assert order == ["kvx", "sdpa", "sdpa", "kvx", "kvx", "sdpa", "sdpa", "kvx"]
    assert times == {"kvx": [4.0, 5.0, 8.0], "sdpa": [3.0, 6.0, 7.0]}


def test_kernel_rows(tmp_path, capsys):
    assert main(["bench", "kernels", "--lengths", "97,130", "--head-dims", "16", "--gqa", "1,4", "--repeats", "1",
                 "--out", str(tmp_path), "--quiet"]) == 0
    rows = json.loads(next(tmp_path.glob("kernels-*.json")).read_text())
    assert next(tmp_path.glob("kernels-*.png")).stat().st_size > 1000
    assert len(rows) == len(bench.KERNELS) * 2 * 2
    assert {r["op"] for r in rows} == set(bench.KERNELS)
    for row in rows:
        assert STAMP <= set(row) and row["tflops"] > 0 and row["gbs"] > 0 and row["vs_sdpa"] > 0
        assert 0 < row["fraction_of_peak"] and row["bound"] in ("memory", "compute")
    for row in rows:  # decode reads each key once per group of query heads: a few flops per byte, below any
        # machine's balance (the "bound" label compares with peaks measured in the run, so it moves with load)
        if row["op"] in ("attention_decode", "ragged_decode"):
            case = bench.KernelCase(row["op"], row["batch"], row["heads"], row["kv_heads"], row["q_len"], row["kv_len"],
                                    row["head_dim"])
            assert case.flops() / case.bytes(4) < 2.5  # (GQA up to 4 here)
    for row in rows:  # prefill-shaped ops run every query of the prompt; the others 1 or 32
        expected = row["kv_len"] if row["op"] in bench.CAUSAL_OPS else (32 if row["op"] == "snapkv_scores" else 1)
        assert row["q_len"] == expected


def test_tracker_counts_new_allocations_until_freed():
    def work():
        a = torch.empty(1000, dtype=torch.float32)  # 4000 bytes
        b = torch.empty(500, dtype=torch.float32)  # +2000 -> 6000
        del a
        c = torch.empty(250, dtype=torch.float32)  # 2000 + 1000
        return b, c

    with TensorAllocationTracker() as tracker:
        kept = work()
    assert tracker.peak == 6000 and tracker.current == 3000
    _, peak = measure_peak(lambda: torch.ones(10, 10), torch.device("cpu"), track_rss=False)
    assert peak.tracked == 400 and kept


@pytest.mark.parametrize(
    "argv,message",
    [
        (["bench", "e2e", "--policies", "dense,snapkvv", "--lengths", "64"], "unknown policy 'snapkvv'"),
        (["bench", "e2e", "--lengths", "4k,lots"], "cannot read 'lots' as a length"),
        (["bench", "e2e", "--model", "no-such-model", "--lengths", "64"], "unknown model 'no-such-model'.*llama3-8b"),
        (["bench", "kernels", "--ops", "attention_decode,warp"], r"unknown kernel\(s\) \['warp'\]"),
        (["bench", "e2e", "--model", "llama3-8b", "--lengths", "1000k"], "needs about .* GiB .* free"),
        (["bench", "e2e", "--dtype", "float64", "--lengths", "64"], "unknown dtype 'float64'"),
    ],
)
def test_bad_input(argv, message, capsys):
    assert main(argv + ["--quiet", "--out", "/tmp/kvx-bench-unused"]) == 2
    import re

    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize("tied", [True, False])
def test_weight_bytes_read_per_token_skip_an_untied_input_embedding(tied):
    """A decode step reads every weight once, but only a row of an input embedding that is not
    also the output head."""
    model = tiny_model("llama", tie_word_embeddings=tied)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    expected = total if tied else total - embedding.numel() * embedding.element_size()
    assert bench.weight_bytes_read_per_token(model) == expected
