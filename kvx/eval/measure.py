"""Measuring: who ran (device, versions, commit), how long, and how much memory at peak.

Peak memory, the same way for a dense and a compressed run:
- CUDA: the caching allocator's ``max_memory_allocated`` since a reset;
- CPU: every tensor storage that torch ops allocate is tracked (a ``TorchDispatchMode``), live
  bytes counted until the storage is freed, and the peak of that sum reported; plus the
  process's peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs`` where Linux allows).
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    """A dtype from its command-line name, or a clear error listing the choices."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[name]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {name} ({torch.get_num_threads()} threads)"


def git_commit() -> str:
    """The short commit of the kvx checkout (``-dirty`` when its code has changes), or
    ``KVX_COMMIT`` where the tree is a copy without git (e.g. shipped to a GPU machine)."""
    if os.environ.get("KVX_COMMIT"):
        return os.environ["KVX_COMMIT"]
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        # code only: benchmark outputs under docs/ are rewritten by the runs themselves
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--",
                                "kvx", "scripts", "configs", "pyproject.toml"], capture_output=True, text=True)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def stamp(device: torch.device) -> dict[str, str]:
    """What every benchmark row carries, so results from different machines never mix."""
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers.__version__,
        "commit": git_commit(),
    }


@dataclass
class Timing:
    median: float
    low: float
    high: float
    repeats: int

    @classmethod
    def of(cls, samples: list[float]) -> Timing:
        return cls(statistics.median(samples), min(samples), max(samples), len(samples))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, repeats: int = 3, warmup: int = 1) -> Timing:
    """Seconds per call: warm-up calls excluded, median and spread of ``repeats`` timed calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - start)
    return Timing.of(samples)


class TensorAllocationTracker(TorchDispatchMode):
    """Peak bytes of live tensor storages allocated by torch ops inside the ``with`` block.

    Storages that existed before (model weights, inputs) are not counted: the peak is what the
    computation itself added on top. A storage counts from the op that created it until it is
    freed (checked through weak storage references after every op).
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[int, int]] = {}  # data_ptr -> (weak ref handle, bytes)
        self.current = 0
        self.peak = 0
        self._known: set[int] = set()

    def __enter__(self):
        self._known = set()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs or {}))[0]
                  if isinstance(t, torch.Tensor) and t.device.type == "cpu"}
        out = func(*args, **(kwargs or {}))
        self._collect_freed()
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                if ptr and ptr not in self.live and ptr not in inputs:
                    self.live[ptr] = (storage._weak_ref(), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out

    def _collect_freed(self) -> None:
        for ptr, (ref, nbytes) in list(self.live.items()):
            if torch.UntypedStorage._expired(ref):
                torch.UntypedStorage._free_weak_ref(ref)
                del self.live[ptr]
                self.current -= nbytes


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _proc_kib_field(path: str, field: str) -> int | None:
    """Bytes of a ``field: N kB`` line of a /proc file, or None where it cannot be read."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _peak_rss() -> int | None:
    return _proc_kib_field("/proc/self/status", "VmHWM")


@dataclass
class PeakMemory:
    tracked: int  # bytes: CUDA allocator peak above the start, or tracked CPU tensor allocations
    rss: int | None = None  # process peak RSS (CPU), when the OS lets it be reset


def measure_peak(fn: Callable[[], Any], device: torch.device, track_rss: bool = True) -> tuple[Any, PeakMemory]:
    """Run ``fn`` once; return its result and the peak memory it added."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        result = fn()
        synchronize(device)
        return result, PeakMemory(torch.cuda.max_memory_allocated(device) - start)
    rss_reset = track_rss and _reset_peak_rss()
    with TensorAllocationTracker() as tracker:
        result = fn()
    return result, PeakMemory(tracker.peak, _peak_rss() if rss_reset else None)


def available_bytes(device: torch.device) -> int:
    """Memory that can still be allocated on ``device``."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    available = _proc_kib_field("/proc/meminfo", "MemAvailable")
    return available if available is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
