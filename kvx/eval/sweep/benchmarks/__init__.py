"""The benchmark kinds a sweep runs, one module each: ``needle`` (:mod:`.needle`), ``lm_eval``
(:mod:`.lm_eval`) and ``longbench`` (:mod:`.longbench`), all :class:`~.base.Benchmark` subclasses."""

from kvx.eval.sweep.benchmarks.base import Benchmark, Context
from kvx.eval.sweep.benchmarks.lm_eval import LmEvalBenchmark
from kvx.eval.sweep.benchmarks.longbench import LongBenchBenchmark
from kvx.eval.sweep.benchmarks.needle import NeedleBenchmark

BENCHMARKS: dict[str, type[Benchmark]] = {b.kind: b for b in (NeedleBenchmark, LmEvalBenchmark, LongBenchBenchmark)}
"""Benchmark kinds by their YAML ``kind``; a new kind is one :class:`Benchmark` subclass and one entry."""

__all__ = ["BENCHMARKS", "Benchmark", "Context", "LmEvalBenchmark", "LongBenchBenchmark", "NeedleBenchmark"]
