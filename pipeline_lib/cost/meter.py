"""Measuring what one stage used: wall seconds, CPU seconds, GPU seconds, peak memory.

- ``cpu_s``: user + system CPU time of this process and of the child processes that ended during the stage (the
  vLLM worker, the multi-process trainer): ``getrusage(RUSAGE_SELF)`` and ``getrusage(RUSAGE_CHILDREN)`` deltas.
  The flow process's other threads (Prefect's log shipping, MLflow) are included: a little over the stage's own.
- ``gpu_s``: for a stage that runs on GPUs, wall seconds x the GPUs it asked for (tensor-parallel size, training
  processes), at most those visible; 0 on a CPU-only machine. The device-seconds a budget is charged for, not a
  utilisation.
- ``peak_rss_gib``: the largest resident set of this process plus all its descendants, sampled every
  ``every_s`` (default 0.25 s) by a background thread while the stage runs; a spike shorter than that can be
  missed. ``peak_gpu_mem_gib``: ``torch.cuda.max_memory_allocated`` of this process (training in-process); the vLLM
  worker's GPU memory is its own process's and is not seen here.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from dataclasses import dataclass, field


def _cpu_seconds() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def tree_rss_bytes(pid: int | None = None) -> int:
    """Resident set size of a process and all its descendants (0 for those that end while being read)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def gpus_visible() -> int:
    """GPUs this process may use (0 without CUDA)."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no torch, or a broken driver: no GPU seconds to charge
        return 0


@dataclass
class StageMeter:
    """Start when a stage starts, :meth:`read` when it ends (reading stops the sampler)."""

    uses_gpu: bool = False
    gpus: int = 1  # GPUs the stage asked for (tensor_parallel_size, num_processes)
    every_s: float = 0.25
    t0: float = field(default_factory=time.perf_counter)
    cpu0: float = field(default_factory=_cpu_seconds)
    peak_rss: int = 0
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _result: dict | None = field(default=None, repr=False)

    def start(self) -> "StageMeter":
        self.peak_rss = tree_rss_bytes()
        if self.uses_gpu and gpus_visible():
            import torch

            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._sample, name="alignflow-stage-meter", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak_rss = max(self.peak_rss, tree_rss_bytes())

    def read(self) -> dict[str, float]:
        """The stage's figures; the first call stops the sampler, later calls return the same figures."""
        if self._result is not None:
            return self._result
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self.peak_rss = max(self.peak_rss, tree_rss_bytes())
        wall = time.perf_counter() - self.t0
        gpus = min(self.gpus, gpus_visible()) if self.uses_gpu else 0
        out = {"wall_s": wall, "cpu_s": _cpu_seconds() - self.cpu0, "gpu_s": wall * gpus,
               "peak_rss_gib": self.peak_rss / 2**30}
        if gpus:
            import torch

            out["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self._result = out
        return out


_PEAK: dict[str, float] = {}


def matmul_peak_tflops(dtype_name: str = "bfloat16") -> float:
    """Dense matmul throughput (TFLOP/s) measured once per process and dtype: the denominator of MFU. Set
    ``ALIGNFLOW_PEAK_TFLOPS`` to use a datasheet figure instead (e.g. 989 for an H100's dense bf16)."""
    if os.environ.get("ALIGNFLOW_PEAK_TFLOPS"):
        return float(os.environ["ALIGNFLOW_PEAK_TFLOPS"])
    if dtype_name not in _PEAK:
        _PEAK[dtype_name] = measure_matmul_tflops(dtype_name)
    return _PEAK[dtype_name]


def measure_matmul_tflops(dtype_name: str = "bfloat16", n: int | None = None, reps: int | None = None) -> float:
    """TFLOP/s of ``reps`` dense n x n matmuls after a warm-up one (2 n^3 FLOPs each); n and reps default to a
    second's work: 8192 x 20 on a GPU, 1024 x 6 on a CPU."""
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    n = n or (8192 if dev == "cuda" else 1024)
    reps = reps or (20 if dev == "cuda" else 6)
    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n, dtype=dtype, device=dev), torch.randn(n, n, dtype=dtype, device=dev)
    a @ b
    if dev == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    if dev == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12
