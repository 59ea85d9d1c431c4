"""``kvx sweep``: cells run on the shipped model, resume after an interruption without repeating or
losing one, shard into disjoint parts whose union is the grid, and bad configs are refused up front."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from harness_task import TASK, write_task

from kvx.cli import main
from kvx.eval import needle, sweep

LENGTH = 192
NEEDLE = "{kind: needle, depths: [50], samples: 1, use_chat_template: false}"


def write_config(directory: Path, body: str) -> Path:
    path = directory / "sweep.yaml"
    path.write_text(body)
    return path


def grid(directory: Path, policies: str = "[snapkv:window=8, streaming_llm:sink=4]", ratios: str = "[0.875]",
         needle_entry: str = NEEDLE) -> Path:
    return write_config(directory, f"policies: {policies}\nratios: {ratios}\nlengths: [{LENGTH}]\n"
                                   f"benchmarks:\n  - {needle_entry}\n")


def keys(rows) -> list[tuple]:
    return [sweep.row_key(r) for r in rows]


def labels(rows) -> list[tuple]:
    return [(r["benchmark"], r["length"], r["policy"]) for r in rows]


def test_expand_gives_ratios_to_the_policies_that_take_them():
    """A ratio becomes snapkv's ratio option, streaming_llm's window (sink included), nothing for kivi
    alone (one cell); grid options go to the parts that have them, unless a spec sets them."""
    runs = [needle.parse_policies([spec], [], with_dense=False)[0]
            for spec in ("snapkv", "streaming_llm:sink=4", "kivi:bits=2", "snapkv:window=16+kivi:bits=4")]
    cells = sweep.expand(runs, {"window": [8, 16]}, [0.5, 0.75], ["needle"], {"needle": [256]})
    labels = [c.policy for c in cells]
    assert labels[0] == "dense" and len(labels) == len(set(labels))
    assert "snapkv:ratio=0.75,window=8" in labels and "snapkv:ratio=0.5,window=16" in labels
    assert "streaming_llm:sink=4,window=124" in labels  # 256 x (1 - 0.5) = 128 tokens kept, 4 of them sinks
    assert [c.ratio for c in cells if c.line == "kivi:bits=2,window=8"] == [None]  # kivi's own window, no ratio
    composed = [c.policy for c in cells if c.line == "snapkv:window=16+kivi:bits=4,window=16"]
    assert composed == ["snapkv:ratio=0.5,window=16+kivi:bits=4,window=16", "snapkv:ratio=0.75,window=16+kivi:bits=4,window=16"]


@pytest.mark.parametrize("size,world", [(7, 2), (5, 3), (2, 4), (9, 1)])
def test_shards_are_disjoint_and_cover_the_grid(size, world):
    parts = [sweep.shard(list(range(size)), rank, world) for rank in range(world)]
    assert sorted(i for part in parts for i in part) == list(range(size))


def test_two_cell_sweep(tmp_path, capsys):
    """Dense and streaming_llm at ratio 0.875: two rows, the compressed one keeping 1/8 of the tokens,
    a summary table, the accuracy-vs-KV plot and the needle heatmaps."""
    config = grid(tmp_path, policies="[streaming_llm:sink=4]")
    out = tmp_path / "out"
    assert main(["sweep", str(config), "--out", str(out), "--no-progress"]) == 0
    rows = sweep.results_file(out / "results.jsonl").read().rows
    assert labels(rows) == [("needle", LENGTH, "dense"), ("needle", LENGTH, "streaming_llm:sink=4,window=20")]
    dense, compressed = rows
    assert compressed["kept_tokens"] == LENGTH // 8 and dense["kept_tokens"] >= LENGTH
    assert compressed["kv_bytes"] < dense["kv_bytes"] / 4 and compressed["samples"] == dense["samples"] == 1
    summary = (out / "summary.md").read_text()
    ratio = compressed["kv_bytes"] / dense["kv_bytes"]
    assert f"| streaming_llm:sink=4 |  | {compressed['score']:.3f} ({ratio:.2f}x) |" in summary
    assert (out / "accuracy-vs-kv-needle.png").stat().st_size > 1000
    assert len(list((out / "heatmaps").glob("*.png"))) == 2
    assert "wrote" in capsys.readouterr().out
    config.write_text(config.read_text().replace("depths: [50]", "depths: [60]"))  # other settings: new cells
    changed = sweep.Sweep(sweep.load_config(config), out)
    assert [c.policy for c in changed.pending()] == ["dense", "streaming_llm:sink=4,window=20"]
    assert changed.rows() == []  # the rows measured with depth 50 are not this grid's


def test_interrupted_sweep_resumes_without_repeating_or_losing_a_cell(tmp_path, monkeypatch):
    """An exception in the middle of the second cell (after its first needle prompt): the rerun
    skips the first cell, finishes the second from where it stopped, and runs the third."""
    config = grid(tmp_path, needle_entry=NEEDLE.replace("[50]", "[30, 70]"))
    out = tmp_path / "out"
    calls, original = [], needle.NeedleRunner.run_cell

    def failing(self, run, cell):
        calls.append((run.label, cell.depth))
        if len(calls) == 4:  # cell 1 = dense (2 prompts), then cell 2's second prompt
            raise RuntimeError("injected")
        return original(self, run, cell)

    monkeypatch.setattr(needle.NeedleRunner, "run_cell", failing)
    with pytest.raises(RuntimeError, match="injected"):
        sweep.run_sweep(config, out, progress=False)
    assert labels(sweep.results_file(out / "results.jsonl").read().rows) == [("needle", LENGTH, "dense")]
    calls.clear()
    monkeypatch.setattr(needle.NeedleRunner, "run_cell", lambda self, run, cell: (
        calls.append((run.label, cell.depth)), original(self, run, cell))[1])
    sweep.run_sweep(config, out, progress=False)
    assert calls == [("snapkv:ratio=0.875,window=8", 70.0), ("streaming_llm:sink=4,window=20", 30.0),
                     ("streaming_llm:sink=4,window=20", 70.0)]
    rows = sweep.results_file(out / "results.jsonl").read().rows
    assert sorted(keys(rows)) == sorted(c.key for c in sweep.load_config(config).cells())
    assert all(r["samples"] == 2 for r in rows)


def test_a_row_torn_by_a_kill_is_skipped_and_the_next_starts_a_line(tmp_path):
    """A process killed mid-write leaves half a row without its newline: reading skips it (reported by
    its line, a warning when the sweep resumes), and the next row written starts on a line of its own."""
    results = sweep.results_file(tmp_path / "results.jsonl")
    results.open({"model": "m"})
    row = {"benchmark": "needle", "length": 64, "policy": "dense", "line": "dense", "ratio": None, "score": 1.0,
           "kv_bytes": 10}
    with results.appender() as append:
        append(row)
    with results.path.open("a") as f:
        f.write('{"benchmark": "needle", "len')  # torn
    assert results.read().rows == [row]
    with pytest.warns(UserWarning, match="line 3: not JSON"):
        results.open({"model": "m"})
    with results.appender() as append:
        append({**row, "policy": "h2o"})
    assert [r["policy"] for r in results.read().rows] == ["dense", "h2o"]
    with results.path.open("a") as f:
        f.write('{"policy": "foreign"}\n')
    read = results.read()
    assert len(read.rows) == 2
    assert [problem.split(" line ")[1] for problem in read.problems] == [
        "3: not JSON (a row torn by a killed run?); ignored", "5: not a sweep row; ignored"]
    with pytest.raises(ValueError, match="written by another run .*: use another --out"):
        results.open({"model": "other"})


def test_longbench_cells_run_through_the_longbench_runner(tmp_path):
    """A longbench benchmark: one cell per task and policy, prompts cut to the cell's length, scored by
    the LongBench runner; the compressed cell holds fewer tokens and bytes than dense."""
    data = Path(__file__).parent / "fixtures" / "longbench"
    config = write_config(tmp_path, "policies: [snapkv:window=8]\nratios: [0.5]\nlengths: [256]\nbenchmarks:\n"
                                    f"  - {{kind: longbench, data: {data}, tasks: [trec], limit: 1, use_chat_template: false}}\n")
    sweep.run_sweep(config, tmp_path / "out", progress=False)
    dense, compressed = sweep.results_file(tmp_path / "out" / "results.jsonl").read().rows
    assert (dense["benchmark"], compressed["policy"]) == ("longbench/trec", "snapkv:ratio=0.5,window=8")
    assert compressed["kept_tokens"] < dense["kept_tokens"] and compressed["kv_bytes"] < dense["kv_bytes"]
    assert 0 <= compressed["score"] <= 1 and compressed["samples"] == 1


def test_lm_eval_cells_run_through_kvx_model_type(tmp_path, monkeypatch):
    """An lm_eval benchmark on a local task: the compressed cell's calls kept (1 - ratio) x length tokens."""
    write_task(tmp_path, needle.load_tokenizer(str(needle.DEFAULT_MODEL)))
    config = write_config(tmp_path, f"policies: [streaming_llm:sink=4]\nratios: [0.875]\nlengths: [{LENGTH}]\n"
                                    f"benchmarks:\n  - {{kind: lm_eval, tasks: [{TASK}], include_path: {tmp_path}, "
                                    "default_tasks: false}\n")
    from kvx.eval import lm_eval_bridge as bridge

    metadata, evaluate = [], bridge.evaluate
    monkeypatch.setattr(bridge, "evaluate", lambda lm, tasks, manager, **kw: (
        metadata.append(manager.metadata), evaluate(lm, tasks, manager, **kw))[1])
    sweep.run_sweep(config, tmp_path / "out", progress=False)
    assert metadata == [{"tokenizer": str(needle.DEFAULT_MODEL), "max_seq_lengths": [LENGTH]}] * 2  # what RULER reads
    dense, compressed = sweep.results_file(tmp_path / "out" / "results.jsonl").read().rows
    assert compressed["benchmark"] == f"lm_eval/{TASK}" and compressed["metric"] == "exact_match,none"
    assert compressed["kept_tokens"] == LENGTH // 8 and dense["kept_tokens"] >= LENGTH - 8
    assert dense["samples"] == compressed["samples"] == 3 and dense["score"] >= compressed["score"]


def test_two_shards_write_disjoint_cells_whose_union_is_the_grid(tmp_path, capsys):
    """Shards started by hand (--rank/--world): rank 0's summary says what is still missing, and
    --summary-only rewrites it from every shard's rows once they are all in."""
    config = grid(tmp_path)
    out = tmp_path / "out"
    for rank in (0, 1):
        assert main(["sweep", str(config), "--out", str(out), "--rank", str(rank), "--world", "2", "--no-progress"]) == 0
    assert "warning: 1 of 3 cells are not in" in capsys.readouterr().err  # rank 0 ran first
    rows = sweep.results_file(out / "results.jsonl").read().rows
    by_rank = {rank: {k for r, k in zip(rows, keys(rows)) if r["rank"] == rank} for rank in (0, 1)}
    assert by_rank[0] and by_rank[1] and not by_rank[0] & by_rank[1]
    assert by_rank[0] | by_rank[1] == {c.key for c in sweep.load_config(config).cells()}
    assert main(["sweep", str(config), "--out", str(out), "--summary-only"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert "| snapkv:window=8 |" in (out / "summary.md").read_text()


def test_torchrun_two_processes(tmp_path):
    """A real 2-process gloo group under torchrun: each rank its shard, rank 0 the summary."""
    config = grid(tmp_path, policies="[streaming_llm:sink=4]")
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "kvx.cli", "sweep", str(config), "--out", str(out), "--no-progress"],
                          capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = sweep.results_file(out / "results.jsonl").read().rows
    assert sorted(r["rank"] for r in rows) == [0, 1]
    assert (out / "summary.md").exists()


CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", ["sweep-needle", "sweep-ruler", "sweep-longbench"])
def test_example_configs_have_the_published_shape_and_patch(name, tmp_path):
    """The configs in configs/ read, compare SnapKV, PyramidKV, StreamingLLM, H2O, KIVI and an eviction
    policy composed with KIVI at ratios 0.25-0.875, and every policy of their grid patches a llama."""
    text = (CONFIGS / f"{name}.yaml").read_text()
    if "kind: longbench" in text:  # its data is downloaded by the user: without it, a clear error
        with pytest.raises(FileNotFoundError, match="--data data/longbench: no such directory"):
            sweep.load_config(CONFIGS / f"{name}.yaml")
        text = text.replace("data: data/longbench", f"data: {Path(__file__).parent / 'fixtures' / 'longbench'}, "
                                                    "tasks: [trec]")
    cells = sweep.load_config(write_config(tmp_path, text)).cells()
    lines = {c.line.split("+")[0].split(":")[0] for c in cells}
    assert {"dense", "snapkv", "pyramidkv", "streaming_llm", "h2o", "kivi"} <= lines
    assert any("+kivi" in c.line for c in cells)
    assert sorted({c.ratio for c in cells if c.ratio is not None}) == [0.25, 0.5, 0.75, 0.875]
    model = needle.load_causal_lm(str(needle.DEFAULT_MODEL))
    needle.check_patchable(model, needle.parse_policies(sorted({c.policy for c in cells if c.policy != "dense"}), []))


@pytest.mark.parametrize("body,error", [
    (f"lengths: [{LENGTH}]\nbenchmarks: [{NEEDLE}]\npolicys: [snapkv]\n",
     r"unknown key\(s\) \['policys'\]; valid keys: benchmarks, device, dtype, lengths, model, options, policies"),
    (f"lengths: [{LENGTH}]\nbenchmarks: [{{kind: needle, depth: [1]}}]\n",
     r"benchmarks\[0\] \(needle\): unknown key\(s\) \['depth'\]; valid keys: compress, depths, distractors"),
    (f"lengths: [{LENGTH}]\nbenchmarks: [{{kind: ruler}}]\n", r"unknown kind 'ruler'; choose from needle, lm_eval, longbench"),
    (f"lengths: [{LENGTH}]\nbenchmarks: [{NEEDLE}]\npolicies: ['snapkv:budget']\n",
     r"options are written key=value, got 'budget'"),
    (f"lengths: [{LENGTH}]\nbenchmarks: [{NEEDLE}]\npolicies: [snapkvv]\n", r"unknown policy 'snapkvv'"),
    (f"lengths: [{LENGTH}]\nbenchmarks: [{NEEDLE}]\npolicies: [snapkv]\noptions: {{budgt: [1]}}\n",
     r"options: 'budgt' is an option of none of the listed policies \(snapkv\)"),
    (f"lengths: [{LENGTH}]\nbenchmarks: [{NEEDLE}]\npolicies: [snapkv]\nratios: [1.5]\n", r"ratios: 1.5 is not a compression"),
    (f"lengths: [{LENGTH}]\nbenchmarks: [{{kind: longbench, data: /no/such/dir}}]\n", r"--data /no/such/dir: no such directory"),
    (f"lengths: [{LENGTH}]\nbenchmarks: [{{kind: longbench, data: /tmp, tasks: [trek]}}]\n", r"unknown LongBench task\(s\) trek"),
    (f"lengths: [{LENGTH}]\nbenchmarks: [{{kind: lm_eval, tasks: [x], include_path: /no/such/dir}}]\n",
     r"include path /no/such/dir: no such directory"),
])
def test_bad_configs_are_refused(tmp_path, capsys, body, error):
    import re

    config = write_config(tmp_path, body)
    assert main(["sweep", str(config), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    message = capsys.readouterr().err
    assert message.startswith("kvx sweep: error: ") and re.search(error, message), message
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_an_unknown_lm_eval_task_is_refused_before_any_cell(tmp_path, capsys):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    config = write_config(tmp_path, f"lengths: [{LENGTH}]\nbenchmarks:\n  - {{kind: lm_eval, tasks: [no_such_task], "
                                    f"include_path: {tasks}, default_tasks: false}}\n")
    assert main(["sweep", str(config), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "unknown lm-eval task(s) 'no_such_task'" in capsys.readouterr().err
    assert not sweep.results_file(tmp_path / "out" / "results.jsonl").read().rows
